"""Restore a trained run and predict, with every uncertainty map, on images of any size.

  import moe_jax
  predictor = moe_jax.restore("runs/demo")             # the MoE of the run's first gate
  out = predictor.predict(images)                      # uint8 [H,W,3] or [B,H,W,3]
  out["segmentation"], out["predictive_entropy"], out["member_probs"], ...

The model is rebuilt from the run's `config.json` (no config file or training code needed)
and its best checkpoint restored onto this machine's default device, whatever device and
sharding trained it. Images are resized to the model's input size, the members' logits
resized back to the images' size (as the model itself upsamples its logits), and every map
computed there, so that the returned maps follow from the returned `member_probs` and
`gate_weights` by `moe_jax.uncertainty`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import checkpoint, input_pipeline, measures, methods, stages, uncertainty
from moe_jax.models import build, routers

DEFAULT_PASSES = 10


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A restored model with its prediction function (see `restore`).

  Attributes:
    method: what it predicts as, named as in results.json ("moe_simple", "ensemble",
      "expert_highway", "mc_dropout_10", "deep_ensemble").
    config: the run's config.
    image_size: (H, W) the model runs at.
    class_names: the C class names.
    meta: the restored checkpoint's meta (step, metrics).
  """
  method: str
  config: ml_collections.ConfigDict
  image_size: tuple[int, int]
  class_names: tuple[str, ...]
  meta: dict
  _model: nnx.Module
  _members: Callable  # (model, images float32 [B,h,w,3], key) -> member logits etc.

  def predict(self, images: np.ndarray, *, seed: int = 0,
              member_probs: bool = True) -> dict[str, np.ndarray]:
    """Segmentation and uncertainty of uint8 images [H,W,3] or [B,H,W,3], any H and W.

    Args:
      images: uint8 RGB, one image or a batch (one compile per distinct shape).
      seed: MC dropout's key (the other methods are deterministic). MC dropout draws its
        masks for the whole batch, so an image's maps depend on the seed and the batch.
      member_probs: also return the members' probabilities (K x the size of the input
        in float32 x C classes; False to save the memory).

    Returns:
      numpy arrays at the images' size: "segmentation" int32 [B,H,W];
      "predictive_entropy", "mutual_information", "expert_variance" float32 [B,H,W] in
      [0, 1] (PE ÷ log C, MI ÷ log C, EV ÷ 0.5); for an MoE also "gate_entropy" [B,H,W]
      (÷ log K) and "gate_weights", the router's weights (averaged over its samples):
      [B,K] ("image" router: simple), [B,C,K] ("class": classwise) or [B,H,W,K] ("pixel");
      "member_probs" [K,B,H,W,C] (experts, or MC-dropout passes) unless member_probs=False.
    """
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"predict takes uint8 RGB images [H,W,3] or [B,H,W,3]; got "
                       f"{images.dtype} {list(images.shape)}")
    if 0 in images.shape:
      raise ValueError(f"predict needs at least one image of at least 1x1 pixels; got an "
                       f"empty batch {list(images.shape)}")
    out = _predict(self._members, self._model, jnp.asarray(images), build.key(seed),
                   self.image_size, len(self.class_names))
    if not member_probs:
      out.pop("member_probs")
    return jax.device_get(out)


@functools.partial(nnx.jit, static_argnums=(0, 4, 5))
def _predict(members: Callable, model: nnx.Module, images: jax.Array, key: jax.Array,
             image_size: tuple[int, int], num_classes: int) -> dict[str, jax.Array]:
  batch, height, width, _ = images.shape
  x = images.astype(jnp.float32) / 255.0
  if (height, width) != image_size:
    x = jax.image.resize(x, (batch, *image_size, 3), "linear", antialias=True)
  found = members(model, x, key)
  back = lambda logits: jax.image.resize(
      logits, (*logits.shape[:-3], height, width, num_classes), "linear", antialias=True)
  member_logits = back(found["member_logits"])
  probs = uncertainty.probabilities(member_logits)
  if "routing" in found:  # an MoE: its own prediction, members weighted by the router
    routing = routers.resized(found["routing"], (height, width))
    out = methods.mixture_outputs({"logits": back(found["logits"]),
                                   "expert_logits": member_logits, "routing": routing},
                                  experts=False)["moe"]
    extra = {name: out[name] for name in measures.of_source("routing")}
    extra["gate_weights"] = routers.expected_weights(routing)
  else:
    out = methods.members_output(probs)
    extra = {}
  return {"segmentation": out["prediction"].astype(jnp.int32),
          **{m: out[m] for m in measures.of_source("members")}, **extra, "member_probs": probs}


def _single_members(model, x, key):
  del key
  return {"member_logits": model(x)[0][None]}


# ------------------------------------------------------------------------------ restore

def restore(path: str | os.PathLike, *, stage: str = "gate", expert: str | None = None,
            passes: int = DEFAULT_PASSES) -> Predictor:
  """A predictor from a run's workdir (or one of its `checkpoints/<stage>` dirs).

  Args:
    path: the `--workdir` of `python -m moe_jax.main`, or `<workdir>/checkpoints/<stage>`
      (which then sets the stage).
    stage: "gate" (the MoE of the run's first gate type), "gate_simple",
      "gate_classwise", "experts" (the experts as a uniform ensemble, or one of them with
      `expert`), "baseline" (MC dropout with `passes` passes), "deep_ensemble".
    expert: with stage="experts", one expert's name ("highway", "urban"; Cityscapes
      "group0", ...) to predict with it alone.
    passes: MC dropout's T for stage="baseline".

  Raises:
    checkpoint.CheckpointError: no run in `path`, the stage has not finished there, or its
      checkpoint does not fit the run's config.
    ValueError: an unknown stage or expert, or passes < 1.
  """
  if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
    raise ValueError(f"passes={passes!r}: MC dropout's number of passes must be an integer "
                     ">= 1")
  workdir, name = _locate(Path(path).expanduser(), stage)
  config = ml_collections.ConfigDict(checkpoint.load_config(workdir))
  names = input_pipeline.expert_names(config.data)
  if name == "gate":
    name = stages.STAGES["gate"].checkpoints(config)[0]
  try:
    _, entry = stages.stage_of(config, name)
  except KeyError:
    raise ValueError(f"unknown stage {name!r}; this run's stages: 'gate', "
                     f"{', '.join(map(repr, stages.all_checkpoints(config)))}.") from None
  if entry.predictor is None:
    raise ValueError(f"stage {name!r} has no predictor")
  if expert is not None and name != "experts":
    raise ValueError(f"expert={expert!r} needs stage='experts'")
  method, members = entry.predictor(config, name, passes)
  model, meta = checkpoint.restore_model(workdir, name,
                                         functools.partial(entry.model, config, name))
  if expert is not None:
    if expert not in names:
      raise ValueError(f"unknown expert {expert!r}; this run's experts: {', '.join(names)}")
    model, method, members = _one_expert(config, model, names.index(expert)), \
        f"expert_{expert}", _single_members
  model.eval()
  return Predictor(method, config, tuple(config.data.image_size),
                   tuple(input_pipeline.class_names(config.data)), meta, model, members)


def _locate(path: Path, stage: str) -> tuple[Path, str]:
  """(workdir, stage) from a workdir or a `<workdir>/checkpoints/<stage>` dir."""
  if not (path / checkpoint.CONFIG_FILE).is_file() and path.parent.name == "checkpoints" and \
      (path.parent.parent / checkpoint.CONFIG_FILE).is_file():
    return path.parent.parent, path.name
  if not path.is_dir():
    raise checkpoint.CheckpointError(f"{path} is not a directory; pass the --workdir of a "
                                     "moe_jax.main run")
  return path, stage


def _one_expert(config: ml_collections.ConfigDict, members: nnx.Module, k: int) -> nnx.Module:
  """Expert k of stacked experts, as a DeepLabv3+ of its own."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build.baseline(config)))
  _, state = nnx.split(members.members)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[k], state))
