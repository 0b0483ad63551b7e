"""ResNet-18/50/101 in the torchvision v1.5 layout (stride in the bottleneck's 3x3), NHWC.

Output stride 16 as in DeepLabv3+: layer4 keeps the resolution of layer3 and dilates its
3x3 convolutions by 2 instead (torchvision's replace_stride_with_dilation=[F, F, T]; as
there, the first block of layer4 keeps dilation 1). Torchvision refuses
dilation in the basic block of ResNet-18/34; here it is allowed so that the small CPU
presets can use ResNet-18 at output stride 16 too.

Module and parameter names follow torchvision (conv1, bn1, layer1..4, downsample) so
ImageNet weights can be imported by name.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from moe_jax.config_checks import ConfigError

# Blocks per stage. "resnet10", one basic block per stage, is the smoke preset's (tests):
# it compiles ~20 % faster than ResNet-18; torchvision publishes no weights for it.
DEPTHS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3),
          "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BOTTLENECK = {"resnet10": False, "resnet18": False, "resnet34": False, "resnet50": True,
              "resnet101": True}


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1,
         dilation: int = 1, bias: bool = False, fan: str = "fan_in") -> nnx.Conv:
  """A convolution padded like PyTorch's (k // 2 * dilation on every side).

  Weights start as PyTorch's kaiming_normal_ (an untruncated normal, std sqrt(2 / fan));
  torchvision's ResNet uses fan_out, the DeepLab head fan_in. The untruncated normal also
  compiles far faster than JAX's truncated one, which dominated model creation time.
  """
  pad = kernel // 2 * dilation
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride, kernel_dilation=dilation,
                  padding=((pad, pad), (pad, pad)), use_bias=bias,
                  kernel_init=nnx.initializers.variance_scaling(2.0, fan, "normal"),
                  rngs=rngs)


def batch_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # PyTorch's momentum 0.1 and eps 1e-5.
  return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch, planes, *, stride=1, dilation=1, rngs):
    self.conv1 = conv(in_ch, planes, 3, stride=stride, dilation=dilation, fan="fan_out", rngs=rngs)
    self.bn1 = batch_norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, dilation=dilation, fan="fan_out", rngs=rngs)
    self.bn2 = batch_norm(planes, rngs=rngs)
    self.downsample = _downsample(in_ch, planes, stride, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_ch, planes, *, stride=1, dilation=1, rngs):
    self.conv1 = conv(in_ch, planes, 1, fan="fan_out", rngs=rngs)
    self.bn1 = batch_norm(planes, rngs=rngs)
    self.conv2 = conv(planes, planes, 3, stride=stride, dilation=dilation, fan="fan_out", rngs=rngs)
    self.bn2 = batch_norm(planes, rngs=rngs)
    self.conv3 = conv(planes, planes * 4, 1, fan="fan_out", rngs=rngs)
    self.bn3 = batch_norm(planes * 4, rngs=rngs)
    self.downsample = _downsample(in_ch, planes * 4, stride, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + (x if self.downsample is None else self.downsample(x)))


class Downsample(nnx.Module):
  """The 1x1 projection shortcut (torchvision's downsample.0 / downsample.1)."""

  def __init__(self, in_ch, out_ch, stride, *, rngs):
    self.conv = conv(in_ch, out_ch, 1, stride=stride, fan="fan_out", rngs=rngs)
    self.bn = batch_norm(out_ch, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


def _downsample(in_ch, out_ch, stride, *, rngs):
  return Downsample(in_ch, out_ch, stride, rngs=rngs) if stride != 1 or in_ch != out_ch else None


class ResNet(nnx.Module):
  """ResNet feature extractor at output stride 16.

  Call: images float32 [B, H, W, 3] -> (low_level [B, H/4, W/4, C1], out [B, H/16, W/16, C4])
  with C1 = 64·width·expansion and C4 = 512·width·expansion (expansion 1 for ResNet-18/34,
  4 for ResNet-50/101). H and W must be multiples of 16.
  """

  def __init__(self, name: str = "resnet101", *, width: float = 1.0, rngs: nnx.Rngs):
    if name not in DEPTHS:
      raise ConfigError(f"config key model.backbone={name!r} is unknown; use one of "
                       f"{', '.join(DEPTHS)}.")
    block = Bottleneck if BOTTLENECK[name] else BasicBlock
    planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
    self.conv1 = conv(3, planes[0], 7, stride=2, fan="fan_out", rngs=rngs)
    self.bn1 = batch_norm(planes[0], rngs=rngs)
    in_ch = planes[0]
    layers = []
    for index, (depth, channels) in enumerate(zip(DEPTHS[name], planes)):
      dilated = index == 3  # output stride 16: layer4 dilates instead of striding
      stride = 1 if index == 0 or dilated else 2
      blocks = []
      for b in range(depth):
        # As torchvision: the first block of the dilated layer keeps dilation 1.
        blocks.append(block(in_ch, channels, stride=stride if b == 0 else 1,
                            dilation=2 if dilated and b > 0 else 1, rngs=rngs))
        in_ch = channels * block.expansion
      layers.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.low_level_channels = planes[0] * block.expansion
    self.out_channels = in_ch

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    x = nnx.max_pool(x, (3, 3), strides=(2, 2))
    for block in self.layer1:
      x = block(x)
    low_level = x
    for layer in (self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x)
    return low_level, x
