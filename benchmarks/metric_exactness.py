"""The evaluate stage's detection metrics against exact per-pixel computation.

  python -m benchmarks.metric_exactness --workdir runs/demo [--splits all_test,ambiguous_test]

Reruns every method of a finished run over the given clean test splits, keeps every valid
pixel's normalised uncertainty and correctness, and computes from them, exactly:
misclassification AUROC and AUPR (scikit-learn; positive = incorrect), AURC (sorted, tied
scores averaged over their orders) and, between the run's OOD splits, OOD AUROC and FPR at
95% TPR (positive = OOD pixel). Prints each against results.json and the worst difference
per metric; exits 1 if any is above --tolerance (default 1e-3).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sklearn import metrics as skm

from moe_jax import calibrate, checkpoint, evaluate, input_pipeline, measures, metrics
from moe_jax.models import build

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's --workdir.")
_SPLITS = flags.DEFINE_list("splits", ["all_test", "ambiguous_test"], "Clean test splits.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-3, "Largest accepted difference.")
flags.mark_flag_as_required("workdir")


def exact_aurc(uncertainty: np.ndarray, incorrect: np.ndarray) -> float:
  """Mean over k of the error rate of the k most certain pixels; a group of tied scores
  counts in expectation over its orders (its errors spread evenly over it)."""
  order = np.argsort(uncertainty, kind="stable")
  u, err = uncertainty[order], incorrect[order].astype(np.float64)
  starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
  sizes = np.diff(np.r_[starts, len(u)])
  group_errors = np.add.reduceat(err, starts)
  errors_before = np.r_[0.0, np.cumsum(group_errors)[:-1]]
  group = np.repeat(np.arange(len(starts)), sizes)
  position = np.arange(1, len(u) + 1)
  within = position - starts[group]  # 1..n in the group
  risk = (errors_before[group] + group_errors[group] * within / sizes[group]) / position
  return float(risk.mean())


def fpr_at_95_tpr(negatives: np.ndarray, positives: np.ndarray) -> float:
  labels = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
  fpr, tpr, _ = skm.roc_curve(labels, np.r_[negatives, positives])
  return float(fpr[tpr >= 0.95].min())


def pixel_maps(config: ml_collections.ConfigDict, workdir: Path, split: str) -> dict:
  """{method: {measure: float32 [N]} and "incorrect": bool [N]} over the valid pixels, from
  evaluation's own compiled call (every method, with the run's calibration)."""
  runs, metas = evaluate.restored_runs(config, workdir)
  outputs, extras = evaluate.combined_outputs(config, runs,
                                              calibrate.load(workdir, metas))
  models = tuple(run_models for _, run_models, _, _ in runs)
  run = nnx.jit(outputs)
  found: dict[str, dict[str, list]] = {}
  base = build.key(config.seed)
  # As evaluate reads them: a union split part by part, batch i of a part with MC dropout's
  # key fold_in(key(seed), i).
  for part in input_pipeline.split_parts(config.data, split):
    for i, batch in enumerate(input_pipeline.eval_batches(config.data, part,
                                                          batch_size=config.eval.batch_size)):
      out = dict(run(models, jnp.asarray(batch["image"], jnp.float32) / 255.0,
                     jax.random.fold_in(base, i), extras))
      out.pop(evaluate.HARD_SUBSET, None)
      _add_batch(found, out, batch, config)
  return {method: {k: np.concatenate(v) for k, v in maps.items()}
          for method, maps in found.items()}


def _add_batch(found: dict, out: dict, batch: dict, config) -> None:
  """Appends a batch's valid pixels of every method's maps to `found`."""
  labels = np.asarray(batch["label"]).astype(np.int64)
  valid = (labels >= 0) & (labels < config.data.num_classes)
  for method, output in out.items():
    into = found.setdefault(method, {})
    into.setdefault("incorrect", []).append((np.asarray(output["prediction"]) != labels)[valid])
    for measure in measures.MEASURES:
      if measure in output:
        into.setdefault(measure, []).append(np.asarray(output[measure])[valid])


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every read at INFO
  workdir = Path(_WORKDIR.value)
  config = ml_collections.ConfigDict(checkpoint.load_config(workdir))
  results = json.loads((workdir / evaluate.RESULTS_FILE).read_text())
  maps = {split: pixel_maps(config, workdir, split) for split in _SPLITS.value}
  worst: dict[str, tuple[float, str]] = {}

  binning: dict[str, tuple[float, str]] = {}

  def compare(metric: str, where: str, ours, exact: float, binned: float) -> None:
    """ours: results.json's value; binned: the same metric from the detection histogram of
    the maps found here (so ours − binned is the maps' difference between two compiled
    programs, binned − exact the histogram's)."""
    difference = abs((np.nan if ours is None else ours) - exact)
    print(f"{where:<52} {metric:<25} results {ours!s:<20} exact {exact:.6f}  diff "
          f"{difference:.2e}  binning {abs(binned - exact):.2e}")
    for into, value in ((worst, difference), (binning, abs(binned - exact))):
      if not value <= into.get(metric, (-1.0, ""))[0]:
        into[metric] = (value, where)

  def histogram(score, positive):
    """[negatives, positives] counts per bin of the detection layout."""
    counts = np.asarray(metrics.detection_histogram(jnp.asarray(score), ~jnp.asarray(positive),
                                                    jnp.ones(len(score), bool)))
    return counts[1], counts[0]

  for split, methods in maps.items():
    for method, found in methods.items():
      for measure in measures.MEASURES:
        if measure not in found or found["incorrect"].all() or not found["incorrect"].any():
          continue
        entry = results["splits"][split][method]["uncertainty"][measure]
        u, incorrect, where = found[measure], found["incorrect"], f"{split} {method} {measure}"
        negatives, positives = histogram(u, incorrect)
        compare("auroc_misclassification", where, entry["auroc_misclassification"],
                skm.roc_auc_score(incorrect, u),
                metrics.auroc_from_histograms(negatives, positives))
        compare("aupr_misclassification", where, entry["aupr_misclassification"],
                skm.average_precision_score(incorrect, u),
                metrics.average_precision_from_histograms(negatives, positives))
        compare("aurc", where, entry["aurc"], exact_aurc(u, incorrect),
                metrics.risk_coverage_from_histogram(np.stack([positives, negatives]))["aurc"])
  in_split, out_split = results.get("ood_splits") or (None, None)
  if in_split in maps and out_split in maps:
    for method, found in maps[out_split].items():
      for measure in measures.MEASURES:
        if measure in found and method in results["ood"]:
          entry, negatives = results["ood"][method][measure], maps[in_split][method][measure]
          where = f"ood {method} {measure}"
          labels = np.r_[np.zeros(len(negatives)), np.ones(len(found[measure]))]
          binned = histogram(np.r_[negatives, found[measure]], labels.astype(bool))
          compare("ood_auroc", where, entry["auroc"],
                  skm.roc_auc_score(labels, np.r_[negatives, found[measure]]),
                  metrics.auroc_from_histograms(*binned))
          compare("ood_fpr_at_95_tpr", where, entry["fpr_at_95_tpr"],
                  fpr_at_95_tpr(negatives, found[measure]),
                  metrics.fpr_at_tpr_from_histograms(*binned))
  for title, table in (("results.json vs exact", worst),
                       ("binning alone (the same maps binned vs exact)", binning)):
    print(f"\nworst difference per metric, {title}:")
    for metric, (difference, where) in table.items():
      print(f"  {metric:<26} {difference:.2e}  ({where})")
  if max(d for d, _ in worst.values()) > _TOLERANCE.value:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
