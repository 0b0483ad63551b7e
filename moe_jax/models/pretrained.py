"""ImageNet backbone weights from a torchvision ResNet checkpoint (`model.backbone_weights`).

torchvision's `resnet18/34/50/101` state dicts (`.pth`, read with torch when it is
installed, or the same tensors as `.safetensors`, read without torch) map one to one onto
`backbone.ResNet` at width 1: `conv1`, `bn1`, `layer<i>.<b>.conv<j>`/`bn<j>`,
`layer<i>.<b>.downsample.0`/`.1`; the classifier `fc.*` is not used. Convolution kernels
go from PyTorch's [out, in, kh, kw] to [kh, kw, in, out]; BatchNorm's weight, bias,
running_mean and running_var become scale, bias, mean and var.

Nothing in the file is executed: `.pth` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path
import pickle
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config_checks import ConfigError

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _key(path) -> str:
  return f"config key model.backbone_weights={str(path)!r}"


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{torchvision name: float32 array} of a `.pth`/`.pt` (needs torch) or `.safetensors`."""
  path = Path(path).expanduser()
  if not path.is_file():
    raise ConfigError(f"{_key(path)}: no such file; point it at a torchvision ResNet "
                      "checkpoint (.pth or .safetensors).")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  if path.suffix in (".pth", ".pt"):
    try:
      import torch
    except ImportError:
      raise ConfigError(f"{_key(path)}: reading .pth needs PyTorch (pip install torch), or "
                        "convert the file to .safetensors.") from None
    try:  # weights_only: tensors and containers only; any other object is refused unbuilt
      state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
      what = f" ({found.group(1)})" if found else ""
      raise ConfigError(f"{_key(path)}: refused: the file holds Python objects besides "
                        f"tensors{what}, and they are not loaded; save a plain state_dict() "
                        "of tensors.") from None
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
  raise ConfigError(f"{_key(path)}: unknown file type {path.suffix!r}; use a .pth or "
                    ".safetensors torchvision checkpoint.")


def torchvision_name(path: tuple) -> str:
  """Our ResNet's state path, e.g. ("layer1", 0, "downsample", "bn", "mean"), as
  torchvision's "layer1.0.downsample.1.running_mean"."""
  *module, leaf = [str(p) for p in path]
  module = ".".join(module).replace("downsample.conv", "downsample.0").replace(
      "downsample.bn", "downsample.1")
  is_bn = module.split(".")[-1].startswith("bn") or module.endswith("downsample.1")
  return f"{module}.{_BN_NAMES[leaf] if is_bn else 'weight'}"


def load_backbone(backbone: nnx.Module, path: str | os.PathLike) -> None:
  """Sets a `backbone.ResNet`'s parameters and BatchNorm statistics from a torchvision
  checkpoint, in place. Works on stacked members too (leaves [K, ...]: every member gets
  the same weights).

  Raises:
    ValueError: a missing tensor or a shape that does not fit (another depth or width).
  """
  weights = read_state_dict(path)
  state = nnx.state(backbone, (nnx.Param, nnx.BatchStat))

  def convert(key_path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in key_path)
    name = torchvision_name(keys[:-1] if keys[-1] == "value" else keys)  # the Variable's value
    if name not in weights:
      raise ConfigError(f"{_key(path)}: no tensor {name!r}; is it a torchvision ResNet of "
                        "the config's depth (model.backbone)?")
    value = weights[name]
    if value.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
      value = value.transpose(2, 3, 1, 0)
    shape = leaf.shape[leaf.ndim - value.ndim:]
    if value.shape != shape:
      raise ConfigError(f"{_key(path)}: {name!r} has shape {list(value.shape)} but the "
                        f"backbone needs {list(shape)}; ImageNet weights need "
                        "model.width=1.0 and the same depth as model.backbone.")
    return jnp.broadcast_to(jnp.asarray(value, leaf.dtype), leaf.shape)

  nnx.update(backbone, jax.tree_util.tree_map_with_path(convert, state))
