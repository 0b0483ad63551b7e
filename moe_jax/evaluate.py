"""Runs trained models over splits and accumulates their metrics.

Each model kind has an output function (`moe_jax.methods`): one compiled call per batch
gives every method the model carries, and the same call reduces each method's outputs to
small mergeable statistics (`batch_statistics`): a confusion matrix, and with
`uncertainty=True` a histogram of each normalised uncertainty split by correct/incorrect,
calibration histograms, and Brier/NLL sums. The host sums them over batches (int64 /
float64), so memory does not depend on the number of images and partial results from
devices, hosts or shards merge by addition.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable, Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import checkpoint, input_pipeline, methods, metrics
from moe_jax.models import build

RESULTS_FILE = "results.json"
HISTOGRAMS_FILE = "histograms.npz"


def _method_statistics(output: methods.Output, labels: jax.Array, num_classes: int,
                       uncertainty: bool) -> dict[str, jax.Array]:
  stats = {"confusion": metrics.confusion_matrix(labels, output["prediction"], num_classes)}
  if not uncertainty:
    return stats
  valid = (labels >= 0) & (labels < num_classes)  # as the confusion matrix counts them
  correct = output["prediction"] == labels
  probs = output["probs"]
  for measure in methods.MEASURES:
    if measure in output:
      stats[f"histogram/{measure}"] = metrics.uncertainty_histogram(output[measure], correct,
                                                                    valid)
      stats[f"calibration/{measure}"] = metrics.calibration_histogram(1.0 - output[measure],
                                                                      correct, valid)
  stats["calibration/max_softmax"] = metrics.calibration_histogram(jnp.max(probs, -1),
                                                                   correct, valid)
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  one_hot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
  brier = jnp.sum((probs - one_hot) ** 2, axis=-1)
  label_prob = jnp.take_along_axis(probs, safe_labels[..., None], axis=-1)[..., 0]
  nll = -jnp.log(jnp.maximum(label_prob, jnp.finfo(jnp.float32).tiny))
  stats["sums"] = jnp.stack([jnp.sum(valid).astype(jnp.float32),
                             jnp.sum(jnp.where(valid, brier, 0.0)),
                             jnp.sum(jnp.where(valid, nll, 0.0))])
  return stats


@nnx.jit(static_argnums=(0, 4, 5))
def batch_statistics(outputs: Callable, model: nnx.Module, batch: dict[str, jax.Array],
                     key: jax.Array, num_classes: int, uncertainty: bool
                     ) -> dict[str, dict[str, jax.Array]]:
  """{method: {statistic: array}} of one batch (see the module docstring)."""
  images = batch["image"].astype(jnp.float32) / 255.0
  labels = batch["label"].astype(jnp.int32)
  return {method: _method_statistics(output, labels, num_classes, uncertainty)
          for method, output in outputs(model, images, key).items()}


def accumulate(outputs: Callable, model: nnx.Module, batches: Iterable[dict], num_classes: int,
               *, uncertainty: bool = False, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Sums `batch_statistics` over `batches` (model in eval mode).

  Args:
    outputs: an output function of this model kind (static: keep the same object across
      calls, or each call compiles again).
    model: the module it takes.
    batches: {"image": uint8 [B,H,W,3], "label": [B,H,W]} with a fixed B.
    num_classes: C.
    uncertainty: also accumulate the uncertainty and calibration statistics.
    seed: MC-dropout key of batch i is fold_in(key(seed), i).

  Returns:
    {method: {statistic: int64 or float64 array}}.
  """
  totals: dict[str, dict[str, np.ndarray]] = {}
  pending = None
  base = jax.random.key(seed)
  for i, batch in enumerate(batches):
    # Dispatch this batch before fetching the last result, so the host's transfer
    # overlaps the device's work.
    result = batch_statistics(outputs, model, batch, jax.random.fold_in(base, i),
                              num_classes, uncertainty)
    if pending is not None:
      _add(totals, pending)
    pending = result
  if pending is not None:
    _add(totals, pending)
  return totals


def _add(totals: dict, result: dict) -> None:
  for method, stats in jax.device_get(result).items():
    into = totals.setdefault(method, {})
    for name, value in stats.items():
      wide = value.astype(np.int64 if np.issubdtype(value.dtype, np.integer) else np.float64)
      into[name] = into.get(name, 0) + wide


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Statistics of disjoint sets of pixels -> those of their union (a sum)."""
  return {name: sum(part[name] for part in parts) for name in parts[0]}


def confusions(outputs: Callable, model: nnx.Module, batches: Iterable[dict],
               num_classes: int) -> dict[str, np.ndarray]:
  """{method: int64 [C, C]} over `batches` (validation: predictions only)."""
  return {method: stats["confusion"]
          for method, stats in accumulate(outputs, model, batches, num_classes).items()}


def summary(stats: dict[str, np.ndarray], thresholds: np.ndarray) -> dict:
  """The JSON entry of one method on one split.

  {"miou", "pixel_accuracy", "iou_per_class", and with uncertainty statistics: "brier",
  "nll", "calibration": {"max_softmax": {"ece", "mce"}}, "uncertainty": {measure: {
  "p_accurate_given_certain": [T], "p_uncertain_given_inaccurate": [T], "pavpu": [T],
  "pavpu_reference": [T], "ece", "mce" (of confidence 1 - u), "auroc_misclassification",
  "aupr_misclassification", "aurc"}}}; nan is written as null.
  """
  confusion = stats["confusion"]
  entry = {"miou": metrics.mean_iou(confusion), "pixel_accuracy": metrics.pixel_accuracy(confusion),
           "iou_per_class": metrics.iou_per_class(confusion)}
  if "sums" not in stats:
    return _json(entry)
  pixels, brier, nll = stats["sums"]
  entry["brier"] = brier / pixels if pixels else float("nan")
  entry["nll"] = nll / pixels if pixels else float("nan")
  entry["calibration"] = {"max_softmax": metrics.calibration_errors(
      stats["calibration/max_softmax"])}
  entry["uncertainty"] = {}
  for measure in methods.MEASURES:
    if f"histogram/{measure}" not in stats:
      continue
    histogram = stats[f"histogram/{measure}"]
    curves = metrics.conditional_correctness_from_histogram(histogram, thresholds)
    entry["uncertainty"][measure] = {
        **{key: curves[key] for key in ("p_accurate_given_certain",
                                        "p_uncertain_given_inaccurate", "pavpu",
                                        "pavpu_reference")},
        **metrics.calibration_errors(stats[f"calibration/{measure}"]),
        "auroc_misclassification": metrics.auroc_from_histograms(histogram[1], histogram[0]),
        "aupr_misclassification": metrics.average_precision_from_histograms(histogram[1],
                                                                            histogram[0]),
        "aurc": metrics.risk_coverage_from_histogram(histogram)["aurc"],
    }
  return _json(entry)


def ood_detection(in_stats: dict[str, np.ndarray], out_stats: dict[str, np.ndarray]) -> dict:
  """Per measure, in-distribution pixels vs out-of-distribution pixels (OOD = positive):
  {"auroc", "fpr_at_95_tpr"} from the two splits' histograms (correct + incorrect)."""
  result = {}
  for measure in methods.MEASURES:
    key = f"histogram/{measure}"
    if key in in_stats and key in out_stats:
      negatives, positives = in_stats[key].sum(0), out_stats[key].sum(0)
      result[measure] = {
          "auroc": metrics.auroc_from_histograms(negatives, positives),
          "fpr_at_95_tpr": metrics.fpr_at_tpr_from_histograms(negatives, positives)}
  return _json(result)


def _json(value):
  """numpy -> plain JSON values, nan -> None."""
  if isinstance(value, dict):
    return {k: _json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_json(v) for v in np.asarray(value).tolist()]
  if isinstance(value, (float, np.floating)):
    return None if np.isnan(value) else float(value)
  return value


def _write_histograms(path: Path, totals: dict) -> None:
  """Every accumulated statistic as "<split>/<method>/<name>" arrays in one .npz, atomically
  (plain arrays: np.load(path) needs no pickle)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{f"{split}/{method}/{name}": value
                      for (split, method), stats in totals.items()
                      for name, value in stats.items()})
  checkpoint.write_atomic(path, buffer.getvalue())


def write_results(workdir: str | Path, results: dict) -> Path:
  """Writes `<workdir>/results.json` atomically."""
  return checkpoint.write_json(Path(workdir) / RESULTS_FILE, results)


def print_table(results: dict) -> None:
  """mIoU (%) per method (rows) and split (columns)."""
  splits = list(results["splits"])
  names = list(dict.fromkeys(m for s in splits for m in results["splits"][s]))
  width = max(len(m) for m in names) + 2
  print("mIoU (%)".ljust(width) + "".join(f"{s:>16}" for s in splits))
  for method in names:
    row = [results["splits"][s].get(method, {}).get("miou") for s in splits]
    print(method.ljust(width) + "".join(
        f"{'n/a':>16}" if v is None else f"{100 * v:>16.1f}" for v in row))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Stage "evaluate": every method on every test split -> `<workdir>/results.json`.

  Methods: `expert_<name>` for each expert, `ensemble` (the experts, uniform), `moe`
  (from the gate stage's best checkpoint, which holds the frozen experts too), `baseline`,
  `mc_dropout_<T>` for each T in eval.mc_dropout_passes and, when trained, `deep_ensemble`.
  The histograms behind every number go to `<workdir>/histograms.npz` (plain arrays).

  Returns:
    {"splits": {split: {method: summary}}, "ood": {method: {measure: ...}},
     "thresholds": [T], "checkpoints": {stage: meta}, "class_names": [...]}.
  """
  start = time.perf_counter()
  ood_splits = list(config.eval.ood_splits)
  if ood_splits and (len(ood_splits) != 2 or not set(ood_splits) <= set(config.data.test_splits)):
    raise ValueError(f"config key eval.ood_splits={tuple(ood_splits)} must be two of "
                     f"data.test_splits={tuple(config.data.test_splits)} (ID, OOD), or ().")
  names = input_pipeline.expert_names(config.data)
  # (stage, model factory, output function, {output key: method name})
  runs = [("gate", lambda: build.mixture(config, build.experts(config, len(names))),
           methods.mixture_with(config.eval.moe_members),
           {"moe": "moe", "ensemble": "ensemble",
            **{f"expert_{k}": f"expert_{name}" for k, name in enumerate(names)}}),
          ("baseline", lambda: build.baseline(config), methods.single, {"model": "baseline"})]
  for passes in config.eval.mc_dropout_passes:
    runs.append(("baseline", lambda: build.baseline(config), methods.mc_dropout_with(passes),
                 {f"mc_dropout_{passes}": f"mc_dropout_{passes}"}))
  if config.model.deep_ensemble_members:
    runs.append(("deep_ensemble", lambda: build.deep_ensemble(config), methods.deep_ensemble,
                 {"deep_ensemble": "deep_ensemble"}))
  thresholds = metrics.REFERENCE_THRESHOLDS
  results = {"splits": {}, "ood": {}, "thresholds": _json(thresholds), "checkpoints": {},
             "class_names": list(input_pipeline.class_names(config.data)),
             "moe_members": config.eval.moe_members, "ood_splits": ood_splits}
  models = {}
  for stage, make, _, _ in runs:
    if stage not in models:
      models[stage], results["checkpoints"][stage] = checkpoint.restore_model(workdir, stage,
                                                                              make)
      models[stage].eval()
  # Each disjoint part is evaluated once; a union split (all_test) sums its parts.
  parts = {split: input_pipeline.split_parts(config.data, split)
           for split in config.data.test_splits}
  part_totals = {}
  for part in dict.fromkeys(p for split in config.data.test_splits for p in parts[split]):
    for stage, _, outputs, rename in runs:
      batches = input_pipeline.eval_batches(config.data, part,
                                            batch_size=config.eval.batch_size)
      for key, stats in accumulate(outputs, models[stage], batches, config.data.num_classes,
                                   uncertainty=True, seed=config.seed).items():
        part_totals[(part, rename[key])] = stats
  totals = {}
  for split in config.data.test_splits:
    for method in dict.fromkeys(m for (p, m) in part_totals if p == parts[split][0]):
      totals[(split, method)] = merge([part_totals[(p, method)] for p in parts[split]])
      results["splits"].setdefault(split, {})[method] = summary(totals[(split, method)],
                                                                 thresholds)
  if ood_splits:
    in_split, out_split = ood_splits
    for (split, method), stats in totals.items():
      if split == out_split and (in_split, method) in totals:
        results["ood"][method] = ood_detection(totals[(in_split, method)], stats)
  _write_histograms(Path(workdir) / HISTOGRAMS_FILE, totals)
  path = write_results(workdir, results)
  print(f"evaluate: {len(config.data.test_splits)} splits in "
        f"{time.perf_counter() - start:.0f} s -> {path}")
  print_table(results)
  return results
