"""Runs trained models over splits and accumulates their metrics.

Each model kind has a *prediction function* `(model, images float32 [B,H,W,3]) ->
{method: predicted class ids [B,H,W]}`; one compiled call per batch evaluates every
method the model carries (the MoE forward gives each expert, the ensemble and the MoE at
once) and returns their confusion matrices, which are summed on the host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import checkpoint, input_pipeline, metrics
from moe_jax.models import build

RESULTS_FILE = "results.json"

Predictions = dict[str, jax.Array]


def member_predictions(members: nnx.Module, images: jax.Array) -> Predictions:
  """Stacked models (experts, deep-ensemble members): {"0": [B,H,W], "1": ..., ...}."""
  logits, _ = members(images)
  return {str(k): jnp.argmax(logits[k], axis=-1) for k in range(logits.shape[0])}


def single_predictions(model: nnx.Module, images: jax.Array) -> Predictions:
  """One DeepLabV3Plus: {"model": [B,H,W]}."""
  logits, _ = model(images)
  return {"model": jnp.argmax(logits, axis=-1)}


def ensemble_prediction(member_logits: jax.Array) -> jax.Array:
  """argmax of the mean of the members' softmax probabilities.

  Args:
    member_logits: [S, B, H, W, C].

  Returns:
    int [B, H, W]. (The reference's uncertainty scripts average probabilities too; its
    README's mIoU table averages logits.)
  """
  return jnp.argmax(jnp.mean(jax.nn.softmax(member_logits, axis=-1), axis=0), axis=-1)


def deep_ensemble_predictions(members: nnx.Module, images: jax.Array) -> Predictions:
  """Stacked deep-ensemble members: {"deep_ensemble": [B,H,W]} (mean of probabilities)."""
  logits, _ = members(images)
  return {"deep_ensemble": ensemble_prediction(logits)}


def mixture_predictions(moe: nnx.Module, images: jax.Array) -> Predictions:
  """The MoE and what its one forward also gives: {"moe", "ensemble", "expert_0", ...}."""
  out = moe(images)
  predictions = {"moe": jnp.argmax(out["logits"], axis=-1),
                 "ensemble": ensemble_prediction(out["expert_logits"])}
  for k in range(out["expert_logits"].shape[0]):
    predictions[f"expert_{k}"] = jnp.argmax(out["expert_logits"][k], axis=-1)
  return predictions


@nnx.jit(static_argnums=(0, 3))
def _batch_confusions(predict: Callable, model: nnx.Module, batch: dict[str, jax.Array],
                      num_classes: int) -> dict[str, jax.Array]:
  predictions = predict(model, batch["image"].astype(jnp.float32) / 255.0)
  return {name: metrics.confusion_matrix(batch["label"], p, num_classes)
          for name, p in predictions.items()}


def confusions(predict: Callable, model: nnx.Module, batches: Iterable[dict],
               num_classes: int) -> dict[str, np.ndarray]:
  """Sums the per-method confusion matrices over `batches` (model in eval mode).

  Args:
    predict: a prediction function of this module (static: one compile per function).
    model: the module it takes.
    batches: {"image": uint8 [B,H,W,3], "label": [B,H,W]} with a fixed B.
    num_classes: C.

  Returns:
    {method: int64 [C, C]}.
  """
  totals: dict[str, np.ndarray] = {}
  pending = None
  for batch in batches:
    # Dispatch the next batch before fetching the last result, so the host's transfer
    # overlaps the device's work.
    result = _batch_confusions(predict, model, batch, num_classes)
    if pending is not None:
      _add(totals, pending)
    pending = result
  if pending is not None:
    _add(totals, pending)
  return totals


def _add(totals: dict[str, np.ndarray], result: dict[str, jax.Array]) -> None:
  for name, value in jax.device_get(result).items():
    totals[name] = totals.get(name, 0) + value.astype(np.int64)


def summary(confusion: np.ndarray) -> dict:
  """The JSON entry of one method on one split: miou, pixel_accuracy, iou per class."""
  return {"miou": metrics.mean_iou(confusion), "pixel_accuracy": metrics.pixel_accuracy(confusion),
          "iou_per_class": [None if np.isnan(v) else float(v)
                            for v in metrics.iou_per_class(confusion)]}


def write_results(workdir: str | Path, results: dict) -> Path:
  """Writes `<workdir>/results.json` atomically."""
  return checkpoint.write_json(Path(workdir) / RESULTS_FILE, results)


def print_table(results: dict) -> None:
  """mIoU (%) per method (rows) and split (columns)."""
  splits = list(results["splits"])
  methods = list(dict.fromkeys(m for s in splits for m in results["splits"][s]))
  width = max(len(m) for m in methods) + 2
  print("mIoU (%)".ljust(width) + "".join(f"{s:>16}" for s in splits))
  for method in methods:
    row = [results["splits"][s].get(method, {}).get("miou", float("nan")) for s in splits]
    print(method.ljust(width) + "".join(f"{100 * v:>16.1f}" for v in row))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Stage "evaluate": every method on every test split -> `<workdir>/results.json`.

  Methods: `expert_<name>` for each expert, `ensemble` (the experts, uniform), `moe`
  (from the gate stage's best checkpoint, which holds the frozen experts too), `baseline`
  and, when trained, `deep_ensemble`.

  Returns:
    {"splits": {split: {method: {"miou", "pixel_accuracy", "iou_per_class"}}},
     "checkpoints": {stage: {"step", "val_miou", ...}}, "class_names": [...]}.
  """
  start = time.perf_counter()
  names = input_pipeline.expert_names(config.data)
  # (stage, model factory, prediction function, {prediction key: method name})
  runs = [("gate", lambda: build.mixture(config, build.experts(config, len(names))),
           mixture_predictions,
           {"moe": "moe", "ensemble": "ensemble",
            **{f"expert_{k}": f"expert_{name}" for k, name in enumerate(names)}}),
          ("baseline", lambda: build.baseline(config), single_predictions,
           {"model": "baseline"})]
  if config.model.deep_ensemble_members:
    runs.append(("deep_ensemble", lambda: build.deep_ensemble(config),
                 deep_ensemble_predictions, {"deep_ensemble": "deep_ensemble"}))
  results = {"splits": {}, "checkpoints": {},
             "class_names": list(input_pipeline.class_names(config.data))}
  models = []
  for stage, make, predict, rename in runs:
    model, results["checkpoints"][stage] = checkpoint.restore_model(workdir, stage, make)
    model.eval()
    models.append((predict, model, rename))
  for split in config.data.test_splits:
    entry = results["splits"].setdefault(split, {})
    for predict, model, rename in models:
      batches = input_pipeline.eval_batches(config.data, split,
                                            batch_size=config.eval.batch_size)
      for key, confusion in confusions(predict, model, batches,
                                       config.data.num_classes).items():
        entry[rename[key]] = summary(confusion)
  path = write_results(workdir, results)
  print(f"evaluate: {len(config.data.test_splits)} splits in "
        f"{time.perf_counter() - start:.0f} s -> {path}")
  print_table(results)
  return results
