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

import functools
import time
from pathlib import Path
from typing import Callable, Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from data_pipelines import corruptions
from moe_jax import (calibrate, checkpoint, input_pipeline, measures, methods, metrics,
                     output_files, quantile_thresholds, sharding, stability, stages)
from moe_jax.config_checks import ConfigError
from moe_jax.models import build, routers

RESULTS_FILE = "results.json"
HISTOGRAMS_FILE = "histograms.npz"
PANELS_FILE = "panels.npz"


HARD_SUBSET = "hard_subset"


# Per-(method, measure) statistics run vmapped over every map at once: the compiled program
# holds one copy of each histogram whatever the number of methods. Above this many pixels
# (maps × pixels per map) they run in chunks of maps (lax.map), which bounds memory; below
# it one vmap is faster (measured on the demo's 128 maps of 16 x 96 x 160: 2.7 s per batch
# against 4.8 s in chunks of 16).
MAX_VMAPPED_PIXELS = 2 ** 26


def _statistics(out: dict[str, methods.Output], labels: jax.Array, num_classes: int,
                uncertainty: bool, patch_size: int, subset: jax.Array | None = None
                ) -> dict[str, dict[str, jax.Array]]:
  """{method: {statistic: array}} of every method's output on one batch (see the module
  docstring); each statistic is computed for all methods (or all (method, measure) maps)
  at once, stacked."""
  names = list(out)
  predictions = jnp.stack([out[m]["prediction"] for m in names])  # [M, B, H, W]
  confusions = jax.vmap(lambda p: metrics.confusion_matrix(labels, p, num_classes))(
      predictions)
  stats = {m: {"confusion": confusions[i]} for i, m in enumerate(names)}
  if not uncertainty:
    return stats
  valid = (labels >= 0) & (labels < num_classes)  # as the confusion matrix counts them
  correct = predictions == labels
  per_pixel = jnp.stack([_probability_maps(out[m]["probs"], labels, valid, num_classes)
                         for m in names])  # [M, 3, B, H, W]
  masks = {"": valid, **({"hard/": valid & subset} if subset is not None else {})}
  for prefix, mask in masks.items():
    values = jax.vmap(_probability_statistics, in_axes=(0, 0, None))(per_pixel, correct, mask)
    for i, m in enumerate(names):
      stats[m].update({prefix + name: value[i] for name, value in values.items()})
  if subset is not None:
    hard_correct = jnp.sum(correct & (valid & subset), axis=(1, 2, 3))
    for i, m in enumerate(names):
      stats[m]["hard/correct"] = hard_correct[i]
  for m in names:
    if "routing" in out[m]:
      stats[m].update(_gate_statistics(out[m]["routing"], valid))
  pairs = [(i, m, measure) for i, m in enumerate(names) for measure in measures.MEASURES
           if measure in out[m]]
  if pairs:
    maps = jnp.stack([out[m][measure] for _, m, measure in pairs])
    which = jnp.asarray([i for i, _, _ in pairs])
    one = lambda args: _measure_statistics(args[0], correct[args[1]], valid, patch_size)
    chunk = max(1, MAX_VMAPPED_PIXELS // maps[0].size)
    values = (jax.vmap(one)((maps, which)) if chunk >= len(pairs)
              else jax.lax.map(one, (maps, which), batch_size=chunk))
    for j, (_, m, measure) in enumerate(pairs):
      stats[m].update({f"{name}/{measure}": value[j] for name, value in values.items()})
  return stats


def _measure_statistics(u: jax.Array, correct: jax.Array, valid: jax.Array,
                        patch_size: int) -> dict[str, jax.Array]:
  """One normalised uncertainty map's statistics (u, correct, valid [B, H, W])."""
  stats = {"histogram": metrics.uncertainty_histogram(u, correct, valid),
           "detection": metrics.detection_histogram(u, correct, valid),
           "calibration": metrics.calibration_histogram(1.0 - u, correct, valid,
                                                        metrics.FINE_CALIBRATION_BINS),
           "per_image": metrics.per_image_sums(u, correct, valid,
                                               metrics.REFERENCE_THRESHOLDS)}
  if patch_size:
    stats["patch_histogram"] = metrics.patch_uncertainty_histogram(u, correct, valid,
                                                                   patch_size)
  return stats


def _probability_maps(probs: jax.Array, labels: jax.Array, valid: jax.Array,
                      num_classes: int) -> jax.Array:
  """Per pixel [3, B, H, W]: the max softmax, the Brier score and the NLL of probs
  [B, H, W, C] (0 where not valid)."""
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  one_hot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
  brier = jnp.sum((probs - one_hot) ** 2, axis=-1)
  label_prob = jnp.take_along_axis(probs, safe_labels[..., None], axis=-1)[..., 0]
  nll = -jnp.log(jnp.maximum(label_prob, jnp.finfo(jnp.float32).tiny))
  return jnp.stack([jnp.max(probs, -1), jnp.where(valid, brier, 0.0),
                    jnp.where(valid, nll, 0.0)])


def _probability_statistics(per_pixel: jax.Array, correct: jax.Array, valid: jax.Array
                            ) -> dict[str, jax.Array]:
  """The predictive distribution's statistics on the `valid` pixels from its
  `_probability_maps`: the fine calibration histogram of max softmax, and the sums
  [pixels, Brier, NLL]."""
  confidence, brier, nll = per_pixel
  return {"calibration/max_softmax": metrics.calibration_histogram(
              confidence, correct, valid, metrics.FINE_CALIBRATION_BINS),
          "sums": jnp.stack([jnp.sum(valid).astype(jnp.float32),
                             jnp.sum(jnp.where(valid, brier, 0.0)),
                             jnp.sum(jnp.where(valid, nll, 0.0))])}


GATE_BINS = 20


def _gate_statistics(routing: routers.Routing, valid: jax.Array) -> dict[str, jax.Array]:
  """How the router weighs the experts: per unit (an image for an "image" routing, a
  pixel for a "pixel" one), a 20-bin histogram of the expected weight on each expert and
  the weights' sum.

  Args:
    routing: an "image" or "pixel" routing (`methods.Output`'s, see routers.at_prediction).
    valid: bool [B,H,W] labelled pixels; an image counts if any of its pixels does.

  Returns:
    {"gate_histogram": int32 [K, 20] (bins [j/20, (j+1)/20), the last closed),
     "gate_sum": float32 [K]}.
  """
  gates = routers.expected_weights(routing)
  num = gates.shape[-1]
  unit_valid = (jnp.any(valid, axis=(1, 2)) if routing.unit == "image" else valid).reshape(-1)
  weights = gates.reshape(-1, num).astype(jnp.float32)
  bins = jnp.clip(jnp.floor(weights * GATE_BINS).astype(jnp.int32), 0, GATE_BINS - 1)
  index = jnp.where(unit_valid[:, None], jnp.arange(num) * GATE_BINS + bins, num * GATE_BINS)
  counts = jnp.bincount(index.reshape(-1), length=num * GATE_BINS + 1)[:-1]
  return {"gate_histogram": counts.reshape(num, GATE_BINS).astype(jnp.int32),
          "gate_sum": jnp.sum(jnp.where(unit_valid[:, None], weights, 0.0), axis=0)}


@functools.partial(jax.jit, static_argnums=(0, 1, 6, 7, 8, 9, 11),
                   compiler_options=sharding.SAME_ON_EVERY_MESH)
def _chunk_statistics(outputs: Callable, graphdef: nnx.GraphDef, state: nnx.State,
                      chunk: dict[str, jax.Array], ids: jax.Array, key: jax.Array,
                      num_classes: int, uncertainty: bool, panels: bool, patch_size: int,
                      calibration: methods.Calibration | None, mesh: jax.sharding.Mesh):
  """One `sharding.chunk_steps` step of the model nnx.merge(graphdef, state): every
  device's micro-batch, alone (`sharding.map_chunk`) -> (integer statistics, float
  statistics, maps), each {(method, statistic): [devices, ...]}."""
  def statistics(state, chunk, key):
    images = chunk["image"].astype(jnp.float32) / 255.0
    labels = chunk["label"].astype(jnp.int32)
    model = nnx.merge(graphdef, state)
    out = dict(outputs(model, images, key) if calibration is None
               else outputs(model, images, key, calibration))
    subset = out.pop(HARD_SUBSET, None)
    stats = _statistics(out, labels, num_classes, uncertainty, patch_size, subset)
    flat = {(m, name): value for m, values in stats.items() for name, value in values.items()}
    exact = {k: v for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.integer)}
    ordered = {k: v for k, v in flat.items() if k not in exact}
    maps = {(method, name): output[name] for method, output in out.items()
            if panels and "routing" in output
            for name in ("prediction", *measures.MEASURES) if name in output}
    return exact, ordered, maps

  return sharding.map_chunk(statistics, mesh, state, chunk, ids, key)


def batch_statistics(outputs: Callable, model: nnx.Module, batch: dict[str, np.ndarray],
                     key: jax.Array, num_classes: int, uncertainty: bool, panel_images: int = 0,
                     patch_size: int = 0, calibration: methods.Calibration | None = None,
                     mesh: jax.sharding.Mesh | None = None, micro_batch: int = 1) -> list:
  """Dispatches the statistics of one batch (see the module docstring); `host_sums` fetches
  them.

  The batch runs split over every device of `mesh` (None: one device), `micro_batch`
  images at a time, each micro-batch alone on its device (`sharding.chunk_steps`; chunk c's
  key is fold_in(key, c)): every image goes through the same program on every mesh, and
  `host_sums` adds the chunks' integers exactly and their floats in float64 in chunk order,
  so the totals are the same for every mesh.

  Args:
    batch: this process's rows of the batch (one process: all), {"image": uint8
      [b,H,W,3], "label": [b,H,W]}, on the host.
    panel_images: > 0 also returns the maps `host_sums` gives as panels (static).
    patch_size: > 0 adds the patch-based histograms of patch_size² pixel patches.
    calibration: the output function's 4th argument (None: it is called with three), e.g.
      the calibrate stage's temperatures (see `combined_outputs`).
    An output function may also return HARD_SUBSET: bool [B,H,W], the pixels on which every
    method also gets the "hard/..." statistics (`_statistics`).

  Returns:
    the dispatched steps, for `host_sums`.
  """
  mesh = mesh or sharding.one_device_mesh()
  graphdef, state = nnx.split(sharding.placed_copy(model, mesh))
  return [_chunk_statistics(outputs, graphdef, state, chunk, ids, key, num_classes,
                            uncertainty, panel_images > 0, patch_size, calibration, mesh)
          for chunk, ids in sharding.chunk_steps(
              mesh, micro_batch, {"image": batch["image"], "label": batch["label"]})]


def host_sums(steps: list, panel_images: int = 0
              ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
  """One batch's `batch_statistics` on the host -> ({method: {statistic: sum}}, panels):
  integers summed in int64, floats in float64 in chunk order; panels: {method: {map:
  [panel_images, H, W]}}, the maps of each MoE method (those with a routing) on the batch's
  first images."""
  exact, ordered, maps = sharding.chunk_order(
      steps if panel_images else [(exact, ordered, {}) for exact, ordered, _ in steps])
  stats: dict[str, dict[str, np.ndarray]] = {}
  for (method, name), value in exact.items():
    stats.setdefault(method, {})[name] = value.astype(np.int64).sum(axis=0)
  for (method, name), value in ordered.items():
    stats.setdefault(method, {})[name] = value.astype(np.float64).sum(axis=0)
  panels: dict[str, dict[str, np.ndarray]] = {}
  for (method, name), value in maps.items():
    panels.setdefault(method, {})[name] = value.reshape(-1, *value.shape[2:])[:panel_images]
  return stats, panels


def accumulate(outputs: Callable, model: nnx.Module, batches: Iterable[dict], num_classes: int,
               *, uncertainty: bool = False, seed: int = 0, panel_images: int = 0,
               patch_size: int = 0, panels: dict | None = None,
               calibration: methods.Calibration | None = None, micro_batch: int = 1
               ) -> dict[str, dict[str, np.ndarray]]:
  """Sums `batch_statistics` over `batches` (model in eval mode).

  The batches run on the mesh the model was placed on (`sharding.place_model`), or on one
  device; the totals are the same for every mesh.

  Args:
    outputs: an output function of this model kind (static: keep the same object across
      calls, or each call compiles again).
    model: the module it takes.
    batches: this process's rows of each global batch, {"image": uint8 [b,H,W,3],
      "label": [b,H,W]} with a fixed b (one process: the whole batch).
    num_classes: C.
    uncertainty: also accumulate the uncertainty, calibration and gate statistics.
    seed: MC-dropout key of batch i is fold_in(key(seed), i) (of its micro-batch c:
      fold_in(that, c)).
    panel_images: N, the number of images whose maps the compiled call returns (static;
      keep it the same across calls of one output function).
    patch_size: also accumulate the patch-based histograms (0 = off; static).
    panels: if given, filled with the first batch's images, labels and MoE maps:
      {"image": uint8 [N,H,W,3], "label": [N,H,W], "maps": {method: {map: [N,H,W]}}}.
    calibration: temperatures for the output function (see `batch_statistics`).
    micro_batch: images one device runs at once (config eval.micro_batch).

  Returns:
    {method: {statistic: int64 or float64 array}}.
  """
  totals: dict[str, dict[str, np.ndarray]] = {}
  pending = None
  base = build.key(seed)
  mesh = sharding.mesh_of(model) or sharding.one_device_mesh()
  model = sharding.placed_copy(model, mesh)
  for i, batch in enumerate(batches):
    # Dispatch this batch before fetching the last result, so the host's transfer
    # overlaps the device's work.
    steps = batch_statistics(outputs, model, batch, jax.random.fold_in(base, i),
                             num_classes, uncertainty, panel_images, patch_size, calibration,
                             mesh, micro_batch)
    if pending is not None:
      _add(totals, host_sums(pending)[0])
    pending = steps
    if i == 0 and panels is not None:
      sums, maps = host_sums(steps, panel_images)
      _add(totals, sums)
      panels.update(image=batch["image"][:panel_images], label=batch["label"][:panel_images],
                    maps=maps)
      pending = None
  if pending is not None:
    _add(totals, host_sums(pending)[0])
  return totals


def _add(totals: dict, sums: dict) -> None:
  for method, stats in sums.items():
    into = totals.setdefault(method, {})
    for name, value in stats.items():
      into[name] = into.get(name, 0) + value


def merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Statistics of disjoint sets of pixels -> those of their union (a sum)."""
  return {name: sum(part[name] for part in parts) for name in parts[0]}


def confusions(outputs: Callable, model: nnx.Module, batches: Iterable[dict],
               num_classes: int, micro_batch: int = 1) -> dict[str, np.ndarray]:
  """{method: int64 [C, C]} over `batches` (validation: predictions only)."""
  return {method: stats["confusion"]
          for method, stats in accumulate(outputs, model, batches, num_classes,
                                          micro_batch=micro_batch).items()}


CURVES = ("p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu",
          "pavpu_reference")


def _calibration(histogram: np.ndarray) -> dict[str, float]:
  """ECE/MCE (15 equal-width bins) and their adaptive (equal-mass) versions of a fine
  calibration histogram."""
  adaptive = metrics.adaptive_calibration_errors(histogram, 15)
  return {**metrics.calibration_errors(histogram, 15),
          "adaptive_ece": adaptive["ece"], "adaptive_mce": adaptive["mce"]}


def _probability_summary(sums: np.ndarray, calibration: np.ndarray) -> dict:
  """{"brier", "nll" (means over the pixels), "calibration": {"max_softmax": CAL}} of the
  sums [pixels, Brier, NLL] and the fine max-softmax calibration histogram."""
  pixels, brier, nll = sums[:3]
  return {"brier": brier / pixels if pixels else float("nan"),
          "nll": nll / pixels if pixels else float("nan"),
          "calibration": {"max_softmax": _calibration(calibration)}}


# Each measure's conditional correctness is also read at these quantiles of its own
# values on the split (thresholds from the histogram, within one bin of np.quantile).
QUANTILES = (0.5, 0.9)
QUANTILE_KEYS = ("quantiles", "thresholds", "p_accurate_given_certain",
                 "p_uncertain_given_inaccurate", "pavpu")


def summary(stats: dict[str, np.ndarray], thresholds: np.ndarray,
            quantiles: tuple[float, ...] = QUANTILES) -> dict:
  """The JSON entry of one method on one split.

  {"miou", "pixel_accuracy", "iou_per_class", and with uncertainty statistics: "brier",
  "nll", "calibration": {"max_softmax": CAL}, "uncertainty": {measure: {
  "p_accurate_given_certain": [T], "p_uncertain_given_inaccurate": [T], "pavpu": [T],
  "pavpu_reference": [T], **CAL (of confidence 1 - u), "auroc_misclassification",
  "aupr_misclassification", "aurc", "per_image": {the four curves, the reference's mean
  over images}, "patch": {the four curves over patches} (when accumulated), "at_quantiles":
  {"quantiles", "thresholds" (the measure's own quantiles on the split), and the three
  curves there}}}, and with hard-subset statistics "hard_subset": {"brier", "nll",
  "calibration", "pixels", "pixel_fraction", "pixel_accuracy"}, where
  CAL = {"ece", "mce", "adaptive_ece", "adaptive_mce"}; nan is written as null. The curves
  come from the 1000-bin histogram (exact at the thresholds), the misclassification AUROC
  and AUPR (incorrect = positive) and the AURC from the detection histogram (within the
  bounds of docs/metrics.md of the per-pixel values).
  """
  confusion = stats["confusion"]
  entry = {"miou": metrics.mean_iou(confusion), "pixel_accuracy": metrics.pixel_accuracy(confusion),
           "iou_per_class": metrics.iou_per_class(confusion)}
  if "sums" not in stats:
    return _json(entry)
  entry.update(_probability_summary(stats["sums"], stats["calibration/max_softmax"]))
  if "hard/sums" in stats:
    pixels = stats["hard/sums"][0]
    entry["hard_subset"] = {
        **_probability_summary(stats["hard/sums"], stats["hard/calibration/max_softmax"]),
        "pixels": pixels, "pixel_fraction": pixels / stats["sums"][0] if stats["sums"][0]
        else float("nan"),
        "pixel_accuracy": stats["hard/correct"] / pixels if pixels else float("nan")}
  entry["uncertainty"] = {}
  for measure in measures.MEASURES:
    if f"histogram/{measure}" not in stats:
      continue
    histogram, detection = stats[f"histogram/{measure}"], stats[f"detection/{measure}"]
    curves = metrics.conditional_correctness_from_histogram(histogram, thresholds)
    at_quantiles = quantile_thresholds.conditional_correctness_at_quantiles(histogram,
                                                                           quantiles)
    values = entry["uncertainty"][measure] = {
        **{key: curves[key] for key in CURVES},
        **_calibration(stats[f"calibration/{measure}"]),
        "auroc_misclassification": metrics.auroc_from_histograms(detection[1], detection[0]),
        "aupr_misclassification": metrics.average_precision_from_histograms(detection[1],
                                                                            detection[0]),
        "aurc": metrics.risk_coverage_from_histogram(detection)["aurc"],
        "per_image": metrics.per_image_conditional_correctness(stats[f"per_image/{measure}"]),
        "at_quantiles": {key: at_quantiles[key] for key in QUANTILE_KEYS},
    }
    if f"patch_histogram/{measure}" in stats:
      patches = metrics.conditional_correctness_from_histogram(
          stats[f"patch_histogram/{measure}"], thresholds)
      values["patch"] = {key: patches[key] for key in CURVES}
  return _json(entry)


def ood_detection(in_stats: dict[str, np.ndarray], out_stats: dict[str, np.ndarray]) -> dict:
  """Per measure, in-distribution pixels vs out-of-distribution pixels (OOD = positive):
  {"auroc", "fpr_at_95_tpr"} from the two splits' detection histograms (correct +
  incorrect)."""
  result = {}
  for measure in measures.MEASURES:
    key = f"detection/{measure}"
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
    array = np.asarray(value)
    if array.dtype.kind == "f":  # whole arrays at once: 50x faster than value by value
      return np.where(np.isnan(array), None, array.astype(np.float64)).tolist()
    if array.dtype.kind in "iub":
      return array.tolist()
    return [_json(v) for v in array.tolist()]
  if isinstance(value, (float, np.floating)):
    return None if np.isnan(value) else float(value)
  return value


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """{"a": {"b": x}} -> {"a/b": x}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def routing_stability(config: ml_collections.ConfigDict, moes: tuple[nnx.Module, ...],
                      names: list[str]) -> dict:
  """`moe_jax.stability` of every MoE (around the same experts) on the first
  eval.stability_images images of the ID split (eval.ood_splits[0], else the first test
  split; a union split gives an equal share to each part), at each σ of
  eval.stability_noise.

  Returns:
    {"split", "images", "noise": [σ], "top_k", "methods": {method: {statistic: [mean per
    σ] or None}}}.
  """
  split = (list(config.eval.ood_splits) or list(config.data.test_splits))[0]
  parts = input_pipeline.split_parts(config.data, split)
  per_part = -(-config.eval.stability_images // len(parts))
  noise = tuple(float(sigma) for sigma in config.eval.stability_noise)
  top_k = config.eval.stability_top_k
  base, totals, images = build.key(config.seed), None, 0
  mesh = sharding.mesh_of(moes) or sharding.one_device_mesh()
  for i, batch in enumerate(input_pipeline.eval_batches(config.data, split,
                                                        batch_size=config.eval.batch_size,
                                                        frames_per_part=per_part,
                                                        process=sharding.process_rows())):
    valid = np.any(batch["label"] != input_pipeline.IGNORE_LABEL, axis=(1, 2))
    part, valid_images = stability.sums(
        moes, {"image": batch["image"], "valid": valid}, noise, top_k,
        jax.random.fold_in(base, i), mesh, config.eval.micro_batch)
    totals = part if totals is None else jax.tree.map(np.add, totals, part)
    images += valid_images
  return {"split": split, "images": images, "noise": list(noise), "top_k": top_k,
          "methods": {name: stability.means(totals[j]) for j, name in enumerate(names)}}


def print_stability(entry: dict) -> None:
  """Top-1 agreement and TV distance (%) of each MoE's routing under input noise."""
  width = max(len(m) for m in entry["methods"]) + 2
  print(f"routing stability on {entry['split']} ({entry['images']} images): top-1 agreement "
        "/ total variation (%) at noise σ x pixel std")
  print("σ".ljust(width) + "".join(f"{s:>14g}" for s in entry["noise"]))
  for method, values in entry["methods"].items():
    print(method.ljust(width) + "".join(
        f"{100 * a:>7.1f}/{100 * t:<6.2g}"
        for a, t in zip(values["top1_agreement"], values["total_variation"])))


def write_results(workdir: str | Path, results: dict) -> Path:
  """Writes `<workdir>/results.json` atomically."""
  return output_files.write_json(Path(workdir) / RESULTS_FILE, results)


def print_table(results: dict, splits: Iterable[str]) -> None:
  """mIoU (%) per method (rows) and split (columns)."""
  splits = list(splits)
  names = list(dict.fromkeys(m for s in splits for m in results["splits"][s]))
  width = max(len(m) for m in names) + 2
  print("mIoU (%)".ljust(width) + "".join(f"{s:>16}" for s in splits))
  for method in names:
    row = [results["splits"][s].get(method, {}).get("miou") for s in splits]
    print(method.ljust(width) + "".join(
        f"{'n/a':>16}" if v is None else f"{100 * v:>16.1f}" for v in row))


def severity_means(results: dict, method: str, value: Callable[[dict], float | None]
                   ) -> list[float | None]:
  """value(entry) of `method` on the clean corruption split, then at each severity the
  mean over the corruptions (None if any is undefined)."""
  info, splits = results["corruptions"], results["splits"]
  return [value(splits[info["clean"]][method])] + [
      mean_or_none([value(splits[f"{info['split']}:{name}:{severity}"][method])
                    for name in info["names"]])
      for severity in info["severities"]]


def print_corruption_table(results: dict) -> None:
  """mIoU (%) per method under corruption: severity 0 (clean) to 5, mean over corruptions."""
  info = results["corruptions"]
  names = list(results["splits"][info["clean"]])
  width = max(len(m) for m in names) + 2
  print(f"mIoU (%) on {info['split']} under corruption, mean over {len(info['names'])}")
  print("severity".ljust(width) + "".join(f"{s:>8}" for s in [0, *info["severities"]]))
  for method in names:
    row = severity_means(results, method, lambda entry: entry["miou"])
    print(method.ljust(width) + "".join(
        f"{'n/a':>8}" if v is None else f"{100 * v:>8.1f}" for v in row))


def mean_or_none(values: list) -> float | None:
  """Mean of JSON values; None if any is None (nan)."""
  return None if any(v is None for v in values) else float(np.mean(values))


def corrupted_splits(config: ml_collections.ConfigDict) -> dict[str, tuple[str, int] | None]:
  """{split name: (corruption, severity) or None for the clean subset} of the config's
  corruption evaluation, validated ({} when eval.corruptions is empty)."""
  names, severities = tuple(config.eval.corruptions), tuple(config.eval.severities)
  if not names:
    return {}
  base = config.eval.corruption_split
  unknown = [n for n in names if n not in corruptions.CORRUPTIONS]
  if unknown:
    raise ConfigError(f"config key eval.corruptions names unknown corruptions {unknown}; "
                      f"use any of {', '.join(corruptions.CORRUPTIONS)}.")
  if not severities or not set(severities) <= {1, 2, 3, 4, 5}:
    raise ConfigError(f"config key eval.severities={severities!r} must be values in 1..5.")
  if base not in config.data.test_splits:
    raise ConfigError(f"config key eval.corruption_split={base!r} must be one of "
                      f"data.test_splits={tuple(config.data.test_splits)}.")
  splits = {f"{base}:clean:0": None} if config.eval.corruption_frames_per_part else {}
  splits.update({f"{base}:{name}:{severity}": (name, severity)
                 for name in names for severity in severities})
  return splits


def restored_runs(config: ml_collections.ConfigDict, workdir: str | Path
                  ) -> tuple[list[tuple], dict[str, dict]]:
  """The compiled evaluations of this config, their models restored from `workdir`.

  Returns:
    (runs, metas): runs = [(checkpoint names, models in eval mode, output function,
    {output key: method name})], one per stage of `stages.STAGES` that has an
    `evaluation` and checkpoints in this config (e.g. every router's MoE at once, the
    baseline with MC dropout for every T); metas = {checkpoint name: its best step's
    meta}. The models are replicated on the config's mesh (`sharding.make_mesh`), where
    `accumulate` then runs.

  Raises:
    ConfigError: eval.batch_size does not split over the mesh (`sharding.check_eval_batch`).
  """
  mesh = sharding.make_mesh(config)
  sharding.check_eval_batch(config.eval.batch_size, config.eval.micro_batch, mesh)
  runs, metas = [], {}
  for stage in stages.STAGES.values():
    names = stage.checkpoints(config)
    if stage.evaluation is None or not names:
      continue
    outputs, rename = stage.evaluation(config)
    restored = []
    for name in names:
      model, metas[name] = checkpoint.restore_model(
          workdir, name, functools.partial(stage.model, config, name))
      model.eval()
      nnx.update(model, sharding.place_state(nnx.state(model), mesh))
      restored.append(model)
    runs.append((names, tuple(restored), outputs, rename))
  return runs, metas


def variants(config: ml_collections.ConfigDict, runs: list[tuple]) -> dict[str, dict]:
  """{variant method: {"of": its method, "variant": "hard" | "ts" | "mocae" | ...}} of
  every variant the runs can evaluate (stages.MOE_VARIANTS of each MoE, "<method>_ts" of
  the others); which of them were evaluated depends on the calibrate stage."""
  out = {spec.method + variant: {"of": spec.method, "variant": variant[1:]}
         for spec in stages.gate_specs(config)
         for variant in stages.moe_variants(config, spec) if variant}
  for _, _, _, rename in runs:
    names = set(rename.values())
    out.update({name: {"of": name.removesuffix(calibrate.TS_SUFFIX), "variant": "ts"}
                for name in names if name not in out and name.endswith(calibrate.TS_SUFFIX)
                and name.removesuffix(calibrate.TS_SUFFIX) in names})
  return out


@functools.cache
def _combined(runs: tuple[tuple[Callable, tuple[tuple[str, str], ...]], ...],
              experts: tuple[str, ...], reference: str | None) -> Callable:
  """The output function of every run at once (see `combined_outputs`); the same object
  for the same arguments, so jit compiles it once."""
  def outputs(models: tuple, images: jax.Array, key: jax.Array, extras: tuple) -> dict:
    calibrations, threshold = extras
    out = {}
    for (run_outputs, rename), run_models, calibration in zip(runs, models, calibrations):
      result = (run_outputs(run_models, images, key) if calibration is None
                else run_outputs(run_models, images, key, calibration))
      rename = dict(rename)
      out.update({rename[key]: value
                  for key, value in methods.with_temperatures(result, calibration).items()})
    if reference is not None:
      out[HARD_SUBSET] = methods.hard_subset(out, experts, reference, threshold)
    return out
  return outputs


def combined_outputs(config: ml_collections.ConfigDict, runs: list[tuple],
                     fitted: dict | None) -> tuple[Callable, tuple]:
  """Every run's output function as one, keyed by method name, so that one compiled call
  per batch evaluates every method on data read once, and every method is measured on the
  same hard subset (`methods.hard_subset` of the experts and the first MoE of the gate
  stage, with the calibrate stage's disagreement threshold; no subset without a gate
  stage). Each run gets its `calibrate.for_run` temperatures and "<key>_ts" variants.

  Returns:
    (output function (models: one tuple per run, images, key, extras), extras).
  """
  specs = tuple((outputs, tuple(rename.items())) for _, _, outputs, rename in runs)
  gates = [rename for names, _, _, rename in runs
           if names == stages.STAGES["gate"].checkpoints(config)]
  experts, reference = (), None
  if gates:
    experts = tuple(stages.expert_methods(config))
    reference = stages.gate_specs(config)[0].method
  threshold = (fitted or {}).get("hard_subset", {}).get("disagreement_threshold", np.inf)
  extras = (tuple(calibrate.for_run(config, fitted, rename) for _, _, _, rename in runs),
            jnp.float32(threshold))
  return _combined(specs, experts, reference), extras


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Stage "evaluate": every method on every test split -> `<workdir>/results.json`.

  Methods: `expert_<name>` for each expert, `ensemble` (the experts, uniform),
  `moe_<gate>` per gate type and `moe_<gate>_<router>` per Bayesian router around it
  (from its best checkpoint, which holds the frozen experts too), `baseline`, `mc_dropout_<T>` for each T in eval.mc_dropout_passes and,
  when trained, `deep_ensemble`. Splits: data.test_splits, then eval.corruption_split
  under each corruption and severity ("<split>:<corruption>:<severity>").
  The histograms behind every number go to `<workdir>/histograms.npz`, the first
  eval.panel_images images of each test split with the MoE maps to `<workdir>/panels.npz`
  (plain arrays).

  Returns:
    {"splits": {split: {method: summary}}, "ood": {method: {measure: ...}},
     "thresholds": [T], "checkpoints": {stage: meta}, "class_names": [...],
     "experts": [...], "gates": [...], "routing_units", "routers" ({MoE method: {"gate",
     "router"}}), "moe_members", "ev_at", "ood_splits",
     "corruptions"}.
  """
  start = time.perf_counter()
  ood_splits = list(config.eval.ood_splits)  # checked by config_checks.validate
  corrupted = corrupted_splits(config)
  runs, metas = restored_runs(config, workdir)
  calibration = calibrate.load(workdir, metas)
  thresholds = metrics.REFERENCE_THRESHOLDS
  clean = (f"{config.eval.corruption_split}:clean:0" if config.eval.corruption_frames_per_part
           else config.eval.corruption_split)
  results = {"splits": {}, "ood": {}, "thresholds": _json(thresholds), "checkpoints": metas,
             "class_names": list(input_pipeline.class_names(config.data)),
             "experts": input_pipeline.expert_names(config.data),
             "gates": list(config.model.gates),
             "routing_units": {spec.method: routers.get(spec.gate).unit
                               for spec in stages.gate_specs(config)},
             "routers": {spec.method: {"gate": spec.gate, "router": spec.router,
                                       "objective": spec.objective}
                         for spec in stages.gate_specs(config)},
             "variants": variants(config, runs),
             "calibration": calibration,
             "moe_members": config.eval.moe_members, "ev_at": config.eval.ev_at,
             "ood_splits": ood_splits,
             "corruptions": {"split": config.eval.corruption_split,
                             "names": list(config.eval.corruptions) if corrupted else [],
                             "severities": list(config.eval.severities) if corrupted else [],
                             "frames_per_part": config.eval.corruption_frames_per_part,
                             "clean": clean}}
  # Each disjoint part is evaluated once; a union split (all_test) sums its parts.
  parts = {split: input_pipeline.split_parts(config.data, split)
           for split in config.data.test_splits}
  reads = {part: {} for split in config.data.test_splits for part in parts[split]}
  reads.update({split: dict(frames_per_part=config.eval.corruption_frames_per_part,
                            corruption=corruption) for split, corruption in corrupted.items()})
  part_totals, panels = {}, {}
  panel_images = config.eval.panel_images
  outputs, extras = combined_outputs(config, runs, calibration)
  models = tuple(run_models for _, run_models, _, _ in runs)
  with tqdm(total=len(reads), desc="evaluate", unit="split", mininterval=1.0,
            dynamic_ncols=True) as bar:
    for read, options in reads.items():
      batches = input_pipeline.eval_batches(config.data, read.split(":")[0],
                                            batch_size=config.eval.batch_size,
                                            process=sharding.process_rows(), **options)
      panel = {} if panel_images and read not in corrupted else None
      for method, stats in accumulate(outputs, models, batches, config.data.num_classes,
                                      uncertainty=True, seed=config.seed,
                                      panel_images=panel_images,
                                      patch_size=config.eval.patch_size, panels=panel,
                                      calibration=extras,
                                      micro_batch=config.eval.micro_batch).items():
        part_totals[(read, method)] = stats
      if panel:  # the maps of each MoE (not of its variants)
        panels[read] = {"image": panel["image"], "label": panel["label"],
                        **{m: maps for m, maps in panel["maps"].items()
                           if m not in results["variants"]}}
      bar.update()
  totals = {}
  for split in [*config.data.test_splits, *corrupted]:
    members = parts.get(split, [split])
    for method in dict.fromkeys(m for (p, m) in part_totals if p == members[0]):
      totals[(split, method)] = merge([part_totals[(p, method)] for p in members])
      results["splits"].setdefault(split, {})[method] = summary(totals[(split, method)],
                                                                 thresholds)
  if ood_splits:
    in_split, out_split = ood_splits
    for (split, method), stats in totals.items():
      if split == out_split and (in_split, method) in totals:
        results["ood"][method] = ood_detection(totals[(in_split, method)], stats)
  gates = stages.STAGES["gate"].checkpoints(config)
  moes = {names: models for names, models, _, _ in runs}.get(gates)
  if config.eval.stability_images and moes:
    results["routing_stability"] = routing_stability(
        config, moes, [spec.method for spec in stages.gate_specs(config)])
    print_stability(results["routing_stability"])
  output_files.write_arrays(Path(workdir) / HISTOGRAMS_FILE,
                {f"{split}/{method}/{name}": value for (split, method), stats in totals.items()
                 for name, value in stats.items()})
  output_files.write_arrays(Path(workdir) / PANELS_FILE, _flatten(panels))
  path = write_results(workdir, results)
  print(f"evaluate: {len(config.data.test_splits)} splits + {len(corrupted)} corrupted in "
        f"{time.perf_counter() - start:.0f} s -> {path}")
  print_table(results, config.data.test_splits)
  if corrupted:
    print_corruption_table(results)
  return results
