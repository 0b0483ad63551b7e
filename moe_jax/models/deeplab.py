"""DeepLabv3+ as in the paper's code (VainF-style): ASPP + a one-conv decoder, NHWC.

ASPP: 1x1, three 3x3 atrous (rates 6/12/18 at output stride 16) and image pooling, each
256 channels + BN + ReLU, concatenated, projected 1x1 to 256 + BN + ReLU + dropout(0.1).
Decoder: layer1 projected 1x1 to 48, ASPP upsampled to its size, concatenated, one 3x3
conv to 256 + BN + ReLU, 1x1 classifier (with bias); logits upsampled bilinearly
(half-pixel centres, like align_corners=False) to the input size. No conv has a bias but
the classifier. `width` scales every channel count, for CPU-sized presets.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from moe_jax.models.backbone import ResNet, batch_norm, conv


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w, C] -> [B, height, width, C], half-pixel centres (PyTorch align_corners=False).

  Upsampling by whole factors (DeepLab's x4 steps) blends shifted copies of x and
  interleaves them in one fused pass, as fast as copying the output; other sizes take
  jax.image.resize, the same function as dense interpolation matrices (3.7x slower at
  [16, 24, 40, 38] -> x4 on XLA CPU, ~10x the FLOPs).
  """
  batch, h, w, channels = x.shape
  if height % h or width % w:
    return jax.image.resize(x, (batch, height, width, channels), "bilinear")
  fh, fw = height // h, width // w
  rows = [jnp.stack(_phases(row, 2, fw), axis=3) for row in _phases(x, 1, fh)]
  return jnp.stack(rows, axis=2).reshape(batch, height, width, channels)


def _phases(x: jax.Array, axis: int, factor: int) -> list[jax.Array]:
  """Bilinear upsampling of one axis by a whole factor, as `factor` phases (edges clamped).

  Phase r holds outputs o = factor * j + r, which sample input position j + d_r with
  d_r = (2r + 1 - factor) / (2 factor): x[j] blended with its neighbour below (d_r < 0)
  or above (d_r > 0).
  """
  if factor == 1:
    return [x]
  n = x.shape[axis]
  take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
  below = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
  above = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
  phases = []
  for r in range(factor):
    d = (2 * r + 1 - factor) / (2 * factor)
    phases.append(x if d == 0 else (1 - abs(d)) * x + abs(d) * (below if d < 0 else above))
  return phases


def _dropout(layer: nnx.Dropout, x: jax.Array, key: jax.Array | None) -> jax.Array:
  """The layer as its mode says, or stochastic with `key` when one is given."""
  if key is None:
    return layer(x)
  return layer(x, deterministic=False, rngs=key)


class ConvBNReLU(nnx.Module):

  def __init__(self, in_ch, out_ch, kernel, *, dilation=1, rngs):
    self.conv = conv(in_ch, out_ch, kernel, dilation=dilation, rngs=rngs)
    self.bn = batch_norm(out_ch, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling: [B, h, w, in_ch] -> [B, h, w, channels]."""

  def __init__(self, in_ch: int, channels: int, *, rates=(6, 12, 18), dropout: float = 0.1,
               rngs: nnx.Rngs):
    self.branches = nnx.List([ConvBNReLU(in_ch, channels, 1, rngs=rngs)] + [
        ConvBNReLU(in_ch, channels, 3, dilation=r, rngs=rngs) for r in rates])
    self.pooling = ConvBNReLU(in_ch, channels, 1, rngs=rngs)
    self.project = ConvBNReLU(channels * (len(rates) + 2), channels, 1, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x, dropout_key: jax.Array | None = None):
    pooled = self.pooling(jnp.mean(x, axis=(1, 2), keepdims=True))
    # Upsampling a 1x1 map bilinearly is a broadcast.
    pooled = jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[-1:])
    features = jnp.concatenate([b(x) for b in self.branches] + [pooled], axis=-1)
    return _dropout(self.dropout, self.project(features), dropout_key)


class DeepLabV3Plus(nnx.Module):
  """One expert (or the baseline).

  Call: images float32 [B, H, W, 3] in [0, 1] -> (logits [B, H, W, C], aspp [B, H/16, W/16, A])
  where A = aspp channels; `aspp` is what the gate reads. H, W multiples of 16.
  """

  def __init__(self, num_classes: int, *, backbone: str = "resnet101", width: float = 1.0,
               aspp_channels: int = 256, low_level_channels: int = 48,
               aspp_dropout: float = 0.1, decoder_dropout: float = 0.0, rngs: nnx.Rngs):
    self.backbone = ResNet(backbone, width=width, rngs=rngs)
    self.aspp = ASPP(self.backbone.out_channels, aspp_channels, dropout=aspp_dropout,
                     rngs=rngs)
    self.low_level = ConvBNReLU(self.backbone.low_level_channels, low_level_channels, 1,
                                rngs=rngs)
    self.decoder = ConvBNReLU(aspp_channels + low_level_channels, aspp_channels, 3, rngs=rngs)
    # Optional extra MC-dropout site before the classifier (the reference's placement is
    # unknown; the ASPP dropout is the one its stock model has).
    self.decoder_dropout = nnx.Dropout(decoder_dropout, rngs=rngs)
    self.classifier = conv(aspp_channels, num_classes, 1, bias=True, rngs=rngs)
    self.aspp_channels = aspp_channels

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The deterministic part: images -> (low_level [B,H/4,W/4,*], backbone out [B,H/16,W/16,*])."""
    return self.backbone(images)

  def head(self, low_level: jax.Array, features: jax.Array, out_size: tuple[int, int],
           dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """ASPP + decoder: the part that carries dropout (MC dropout reruns only this).

    dropout_key: when given, dropout is on and drawn from this key whatever the module's
    mode (MC dropout in eval mode: BatchNorm keeps its running statistics).
    """
    aspp_key = decoder_key = None
    if dropout_key is not None:
      aspp_key, decoder_key = jax.random.split(dropout_key)
    aspp = self.aspp(features, aspp_key)
    low = self.low_level(low_level)
    up = resize_bilinear(aspp, low.shape[1], low.shape[2])
    x = self._decode(up, low)
    logits = self.classifier(_dropout(self.decoder_dropout, x, decoder_key))
    return resize_bilinear(logits, *out_size), aspp

  def _decode(self, up: jax.Array, low: jax.Array) -> jax.Array:
    """The decoder on concat([up, low]), its 3x3 conv split into the two inputs' parts.

    The same function (conv is linear in its input channels), but under vmap over dropout
    keys (MC dropout) the low-level part does not depend on the key, so it runs once.
    """
    conv = self.decoder.conv
    kernel = conv.kernel.value
    split = up.shape[-1]
    apply = lambda x, k: jax.lax.conv_general_dilated(
        x, k.astype(x.dtype), (1, 1), conv.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = apply(up, kernel[:, :, :split]) + apply(low, kernel[:, :, split:])
    return nnx.relu(self.decoder.bn(y))

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    low_level, features = self.encode(images)
    return self.head(low_level, features, images.shape[1:3])
