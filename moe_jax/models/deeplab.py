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
  """[B, h, w, C] -> [B, height, width, C], half-pixel centres (PyTorch align_corners=False)."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "bilinear")


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
    x = self.decoder(jnp.concatenate([up, low], axis=-1))
    logits = self.classifier(_dropout(self.decoder_dropout, x, decoder_key))
    return resize_bilinear(logits, *out_size), aspp

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    low_level, features = self.encode(images)
    return self.head(low_level, features, images.shape[1:3])
