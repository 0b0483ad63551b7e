"""Figures of an evaluated run: PNGs under `<workdir>/plots/` from the evaluate stage's
`results.json`, `histograms.npz` and `panels.npz`.

Each figure has one function taking the loaded data and an output path; `write_all` draws
those whose inputs the workdir holds. Figures use matplotlib's object API (`Figure`, no
pyplot state) and the Agg renderer, so they draw without a display and the same inputs give
the same bytes.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterator, Mapping

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
import numpy as np

from moe_jax import metrics, output_files
from moe_jax.measures import MEASURES

# The evaluate stage's outputs (evaluate.RESULTS_FILE etc.; evaluate itself is not imported:
# it pulls in the input pipeline and TensorFlow).
RESULTS_FILE = "results.json"
HISTOGRAMS_FILE = "histograms.npz"
PANELS_FILE = "panels.npz"
PLOTS_DIR = "plots"

CURVES = {"p_accurate_given_certain": "p(accurate | certain)",
          "p_uncertain_given_inaccurate": "p(uncertain | inaccurate)", "pavpu": "PAvPU"}
RELIABILITY_BINS = 15
DPI = 100

Arrays = Mapping[str, np.ndarray]


# ------------------------------------------------------------------------------ helpers

def method_rank(method: str) -> tuple:
  """Experts, ensemble, MoE, deep ensemble, baseline, MC dropout by T, anything else."""
  order = ["expert", "ensemble", "moe", "deep_ensemble", "baseline", "mc_dropout"]
  family = next((i for i, f in enumerate(order) if method == f or method.startswith(f + "_")),
                len(order))
  number = (int(method.removeprefix("mc_dropout_").split("_")[0])
            if method.startswith("mc_dropout_") else 0)  # mc_dropout_<T>[_ts]
  return family, number, method


def _is_moe(method: str) -> bool:
  return method == "moe" or method.startswith("moe_")


def _is_corrupted(split: str) -> bool:
  """Corrupted splits (and a corruption run's clean subset) are named "<split>:<name>:<s>"."""
  return ":" in split


def _colors(results: dict) -> dict[str, tuple]:
  """One fixed colour per method of the run (the same in every figure; a variant is drawn
  in its method's)."""
  names = sorted(primary(results, {m for split in results["splits"].values() for m in split}),
                 key=method_rank)
  palette = colormaps["tab10" if len(names) <= 10 else "tab20"].colors
  return {m: palette[i % len(palette)] for i, m in enumerate(names)}


def _line_style(method: str, colors: dict) -> dict:
  return {"color": colors.get(method, "gray"), "lw": 2.2 if _is_moe(method) else 1.3}


def _floats(values) -> np.ndarray:
  """JSON values (null = nan) -> float64 array."""
  return np.asarray(values, dtype=np.float64)


def _stored_methods(arrays: Arrays, split: str, name: str,
                    results: dict | None = None) -> list[str]:
  """Methods with an array "<split>/<method>/<name>", in plotting order (without the
  results' variants when given: see `primary`)."""
  found = {key.split("/")[1] for key in arrays
           if key.startswith(f"{split}/") and key.endswith(f"/{name}") and
           key.count("/") == 2 + name.count("/")}
  return sorted(primary(results, found) if results else found, key=method_rank)


def primary(results: dict, methods) -> list[str]:
  """`methods` without the variants (hard, tempered, MoCaE: results["variants"]); only the
  accuracy-calibration figure and the report's calibration section show those."""
  variants = results.get("variants") or {}
  return [m for m in methods if m not in variants]


def _grid(count: int, max_columns: int) -> tuple[int, int]:
  columns = min(count, max_columns)
  return -(-count // columns), columns


def _save(fig: Figure, path: Path) -> Path:
  """Writes the figure as a PNG atomically: a kill or a full disk never leaves half of one."""
  return output_files.write_atomic(path, output_files.figure_png(fig, dpi=DPI))


# ------------------------------------------------------------- conditional correctness

def conditional_correctness(results: dict, split: str, path: Path) -> Path:
  """p(accurate|certain), p(uncertain|inaccurate) and PAvPU against the threshold t.

  Rows are the three curves, columns the uncertainty measures, one line per method that
  has the measure on `split`.

  Args:
    results: the loaded results.json.
    split: a key of results["splits"].
    path: the PNG to write.

  Returns:
    path.
  """
  entries = results["splits"][split]
  thresholds = _floats(results["thresholds"])
  colors = _colors(results)
  measures = [m for m in MEASURES if any(m in e.get("uncertainty", {}) for e in entries.values())]
  fig = Figure(figsize=(3.4 * len(measures) + 0.6, 8.4), layout="constrained")
  axes = fig.subplots(len(CURVES), len(measures), sharex=True, sharey=True, squeeze=False)
  handles = {}
  for column, measure in enumerate(measures):
    for method in sorted(primary(results, entries), key=method_rank):
      curves = entries[method].get("uncertainty", {}).get(measure)
      if curves is None:
        continue
      for row, key in enumerate(CURVES):
        (handles[method],) = axes[row, column].plot(thresholds, _floats(curves[key]),
                                                     **_line_style(method, colors))
    axes[0, column].set_title(MEASURES[measure].title)
    axes[-1, column].set_xlabel("threshold t (certain: u < t)")
  for row, label in enumerate(CURVES.values()):
    axes[row, 0].set_ylabel(label)
  for ax in axes.flat:
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
  fig.suptitle(f"Conditional correctness on {split}")
  _legend_below(fig, handles)
  return _save(fig, path)


def _legend_below(fig: Figure, handles: dict) -> None:
  """One figure legend under the panels."""
  fig.legend(handles.values(), handles.keys(), loc="outside lower center",
             ncols=min(len(handles), 5), fontsize="small")


# ------------------------------------------------------------------------ reliability

def _regroup(histogram: np.ndarray, bins: int = RELIABILITY_BINS) -> np.ndarray:
  """A [3, nb] calibration histogram summed into `bins` equal bins when nb is a multiple."""
  histogram = np.asarray(histogram, np.float64)
  if histogram.shape[1] % bins or histogram.shape[1] == bins:
    return histogram
  return metrics.regroup_calibration(histogram, bins)


def _reliability_panel(ax, histogram: np.ndarray, title: str) -> None:
  """Accuracy per confidence bin (bars), the gap to the bin's mean confidence (shaded) and
  the diagonal of perfect calibration."""
  ece = metrics.calibration_errors(histogram)["ece"]
  count, sum_conf, sum_ok = _regroup(histogram)
  edges = np.linspace(0, 1, len(count) + 1)
  filled = count > 0
  accuracy = np.divide(sum_ok, count, out=np.zeros_like(count), where=filled)
  confidence = np.divide(sum_conf, count, out=np.zeros_like(count), where=filled)
  left, width = edges[:-1][filled], np.diff(edges)[filled]
  ax.bar(left, accuracy[filled], width, align="edge", color="tab:blue", edgecolor="navy",
         lw=0.5, label="accuracy")
  ax.bar(left, (confidence - accuracy)[filled], width, bottom=accuracy[filled], align="edge",
         color="tab:red", alpha=0.3, edgecolor="tab:red", lw=0.5, hatch="//", label="gap")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
  ax.set_title(f"{title}\nECE {100 * ece:.1f}%", fontsize="medium")


def reliability(results: dict, histograms: Arrays, split: str, path: Path) -> Path:
  """Reliability diagrams of the max-softmax confidence, one panel per method.

  Args:
    results: the loaded results.json (its variants are left out).
    histograms: the loaded histograms.npz ("<split>/<method>/calibration/max_softmax"
      [3, nb]: count, Σ confidence, Σ correct per bin (lo, hi]).
    split: the split to draw.
    path: the PNG to write.

  Returns:
    path.
  """
  names = _stored_methods(histograms, split, "calibration/max_softmax", results)
  rows, columns = _grid(len(names), 4)
  fig = Figure(figsize=(2.9 * columns, 3.1 * rows + 0.8), layout="constrained")
  axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
  for ax, method in zip(axes.flat, names):
    _reliability_panel(ax, histograms[f"{split}/{method}/calibration/max_softmax"], method)
  for ax in axes.flat[len(names):]:
    ax.set_axis_off()
  for ax in axes[-1]:
    ax.set_xlabel("confidence (max softmax)")
  for ax in axes[:, 0]:
    ax.set_ylabel("accuracy")
  fig.suptitle(f"Reliability on {split}")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
  return _save(fig, path)


# ------------------------------------------------------------------------------ OOD ROC

def ood_roc(results: dict, histograms: Arrays, path: Path) -> Path:
  """ROC of OOD detection by uncertainty: pixels of results["ood_splits"][0] are negatives,
  those of [1] positives, higher uncertainty ⇒ OOD; one panel per measure.

  Args:
    results: the loaded results.json (its "ood_splits" and the method colours).
    histograms: the loaded histograms.npz ("<split>/<method>/detection/<measure>" [2, bins],
      the fine layout results.json's AUROC comes from; "histogram/<measure>" where a run
      predates it).
    path: the PNG to write.

  Returns:
    path.
  """
  in_split, out_split = results["ood_splits"]
  colors = _colors(results)
  curves = {measure: [m for m in _stored_methods(histograms, out_split, f"histogram/{measure}",
                                                 results)
                      if f"{in_split}/{m}/histogram/{measure}" in histograms]
            for measure in MEASURES}
  curves = {measure: names for measure, names in curves.items() if names}
  fig = Figure(figsize=(3.9 * len(curves), 4.6), layout="constrained")
  axes = fig.subplots(1, len(curves), squeeze=False)[0]
  for ax, (measure, names) in zip(axes, curves.items()):
    for method in names:
      kind = ("detection" if all(f"{split}/{method}/detection/{measure}" in histograms
                                 for split in (in_split, out_split)) else "histogram")
      negatives = histograms[f"{in_split}/{method}/{kind}/{measure}"].sum(0)
      positives = histograms[f"{out_split}/{method}/{kind}/{measure}"].sum(0)
      fpr, tpr = metrics.roc_curve_from_histograms(negatives, positives)
      auroc = metrics.auroc_from_histograms(negatives, positives)
      ax.plot(fpr, tpr, label=f"{method} ({auroc:.3f})", **_line_style(method, colors))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal", title=MEASURES[measure].title,
           xlabel=f"false-positive rate ({in_split})")
    ax.grid(alpha=0.3)
    ax.legend(title="method (AUROC)", loc="lower right", fontsize="x-small",
              title_fontsize="x-small")
  axes[0].set_ylabel(f"true-positive rate ({out_split})")
  fig.suptitle(f"OOD detection by uncertainty: {in_split} (in) vs {out_split} (OOD) pixels")
  return _save(fig, path)


# ---------------------------------------------------------------- corruption severity

# {y label: keys of the value in a method's results.json entry}
SEVERITY_METRICS = {
    "mIoU": ("miou",),
    "ECE (max softmax)": ("calibration", "max_softmax", "ece"),
    "misclassification AUROC (PE)": ("uncertainty", "predictive_entropy",
                                     "auroc_misclassification"),
}


def _lookup(tree: dict | None, keys: tuple[str, ...]):
  """tree[k0][k1]...; None where a key is missing."""
  for key in keys:
    tree = (tree or {}).get(key)
  return tree


def _severity_values(results: dict, method: str, corruption: str, keys: tuple[str, ...]
                     ) -> np.ndarray:
  """[1 + S] values of one method: the clean split, then each severity (nan if missing)."""
  info = results["corruptions"]
  splits = [info.get("clean", info["split"])] + [
      f"{info['split']}:{corruption}:{s}" for s in info["severities"]]
  return _floats([_lookup(results["splits"].get(split, {}).get(method), keys)
                  for split in splits])


def corruption_severity(results: dict, path: Path) -> Path:
  """mIoU, max-softmax ECE and PE misclassification AUROC against corruption severity
  (0 = clean), one column per corruption after their mean, one line per method.

  Args:
    results: the loaded results.json, with "corruptions": {"split", "names",
      "severities", optionally "clean" (the clean split's name, else "split")}.
    path: the PNG to write.

  Returns:
    path.
  """
  info = results["corruptions"]
  clean = info.get("clean", info["split"])
  severities = [0, *info["severities"]]
  names = sorted(primary(results, results["splits"][clean]), key=method_rank)
  colors = _colors(results)
  columns = ["mean over corruptions", *info["names"]]
  fig = Figure(figsize=(2.7 * len(columns) + 0.8, 7.6), layout="constrained")
  axes = fig.subplots(len(SEVERITY_METRICS), len(columns), sharex=True, sharey="row",
                      squeeze=False)
  handles = {}
  for row, keys in enumerate(SEVERITY_METRICS.values()):
    for method in names:
      values = np.stack([_severity_values(results, method, c, keys) for c in info["names"]])
      for column, curve in enumerate([_nanmean(values), *values]):
        (handles[method],) = axes[row, column].plot(severities, curve, marker="o", ms=3,
                                                     **_line_style(method, colors))
  for column, title in enumerate(columns):
    axes[0, column].set_title(title)
    axes[-1, column].set_xlabel("severity")
  for row, label in enumerate(SEVERITY_METRICS):
    axes[row, 0].set_ylabel(label)
  for ax in axes.flat:
    ax.set_xticks(severities)
    ax.grid(alpha=0.3)
  fig.suptitle(f"Corruptions of {info['split']} (severity 0 = {clean})")
  _legend_below(fig, handles)
  return _save(fig, path)


def _nanmean(values: np.ndarray) -> np.ndarray:
  """Mean over axis 0 of the non-nan values; nan where there are none (no warning)."""
  present = ~np.isnan(values)
  count = present.sum(0)
  total = np.where(present, values, 0.0).sum(0)
  return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


# ----------------------------------------------------------------------- gate weights

def _gate_unit(results: dict, method: str) -> str:
  """What a router's weights are counted over: images for an "image" router, pixels for
  the others (a classwise gate's weights of each pixel's predicted class)."""
  unit = results.get("routing_units", {}).get(method)
  return {"image": "images", None: "units"}.get(unit, "pixels")


def _gate_panel(ax, histogram: np.ndarray, total: np.ndarray, experts: list[str]):
  """One column per expert: the fraction of units giving it each weight (shaded, bins
  bottom to top) and its mean weight (dot); returns the image for the colour bar."""
  histogram = np.asarray(histogram, np.float64)
  experts_count = histogram.shape[0]
  units = histogram[0].sum()
  fraction = histogram / units if units else np.zeros_like(histogram)
  mean = np.asarray(total, np.float64) / units if units else np.full(experts_count, np.nan)
  image = ax.imshow(fraction.T, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1,
                    extent=(-0.5, experts_count - 0.5, 0, 1), interpolation="nearest")
  ax.plot(np.arange(experts_count), mean, "o", color="tab:orange", label="mean weight")
  ax.set_xticks(np.arange(experts_count), experts, rotation=45 if experts_count > 3 else 0,
                fontsize="small")
  ax.set(ylim=(0, 1), xlabel="expert")
  return image


def gate_weights(results: dict, histograms: Arrays, path: Path) -> Path:
  """The distribution of each MoE's gate weight on each expert, per clean test split.

  Rows are the MoE methods, columns the splits; in each panel one column per expert (K
  columns), shaded by the fraction of units at each weight, with the mean weight. An
  "image" router (the simple gate) weighs images, the others pixels (a classwise gate: the
  weights of the predicted class).

  Args:
    results: the loaded results.json (splits, "experts": the expert names, and
      "routing_units": {method: unit}).
    histograms: the loaded histograms.npz ("<split>/<method>/gate_histogram" [K, bins] and
      "<split>/<method>/gate_sum" [K]).
    path: the PNG to write.

  Returns:
    path.
  """
  splits = [s for s in results["splits"] if not _is_corrupted(s)]
  found = {s: _stored_methods(histograms, s, "gate_histogram", results) for s in splits}
  splits = [s for s in splits if found[s]]
  names = sorted({m for s in splits for m in found[s]}, key=method_rank)
  width = max(3.6, 0.45 * len(results.get("experts") or ()) + 1.5)
  fig = Figure(figsize=(width * len(splits) + 1, 3.3 * len(names) + 0.5),
               layout="constrained")
  axes = fig.subplots(len(names), len(splits), sharey="row", squeeze=False)
  image = None
  for row, method in enumerate(names):
    unit = _gate_unit(results, method)
    for column, split in enumerate(splits):
      ax = axes[row, column]
      if method not in found[split]:
        ax.set_axis_off()
        continue
      histogram = histograms[f"{split}/{method}/gate_histogram"]
      experts = results.get("experts") or [f"expert {k}" for k in range(len(histogram))]
      image = _gate_panel(ax, histogram, histograms[f"{split}/{method}/gate_sum"], experts)
      ax.set_title(f"{method} on {split}\n({int(histogram[0].sum())} {unit})",
                   fontsize="medium")
    axes[row, 0].set_ylabel("gate weight")
  if image is not None:
    fig.colorbar(image, ax=axes, label="fraction of the units (images or pixels) at that weight")
    axes[0, 0].legend(loc="upper right", fontsize="x-small")
  fig.suptitle("Gate weight on each expert (one column per expert), by test split")
  return _save(fig, path)


# ----------------------------------------------------------------------------- panels

def class_palette(num_classes: int) -> np.ndarray:
  """float [C, 3] fixed RGB colours of the classes (tab20, tab20b, tab20c, repeated)."""
  colors = [c for name in ("tab20", "tab20b", "tab20c") for c in colormaps[name].colors]
  return np.asarray([colors[i % len(colors)] for i in range(num_classes)], np.float64)


def _colorize(classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """Class ids [H, W] -> RGB [H, W, 3]; 255 and other ids >= C are black."""
  classes = np.asarray(classes, np.int64)
  valid = (classes >= 0) & (classes < len(palette))
  return np.where(valid[..., None], palette[np.where(valid, classes, 0)], 0.0)


def panel(results: dict, panels: Arrays, method: str, split: str, path: Path) -> Path:
  """Example images of a split: image, label, the method's prediction and its uncertainty
  maps (PE, MI, EV, GE on a shared 0..1 colour scale), one row per image.

  Args:
    results: the loaded results.json ("class_names" sets the palette and the legend).
    panels: the loaded panels.npz ("<split>/image" uint8 [N,H,W,3], "<split>/label"
      [N,H,W] with 255 = ignore, "<split>/<method>/prediction" and
      "<split>/<method>/<measure>" [N,H,W]).
    method: an MoE method with maps in `panels`.
    split: the split.
    path: the PNG to write.

  Returns:
    path.
  """
  images, labels = panels[f"{split}/image"], panels[f"{split}/label"]
  prediction = panels[f"{split}/{method}/prediction"]
  maps = {m: panels[f"{split}/{method}/{m}"] for m in MEASURES if f"{split}/{method}/{m}" in panels}
  class_names = results.get("class_names") or [
      f"class {c}" for c in range(int(max(np.max(prediction), _max_label(labels))) + 1)]
  palette = class_palette(len(class_names))
  present = [int(c) for c in np.union1d(np.unique(labels), np.unique(prediction))
             if 0 <= c < len(class_names)]
  legend_columns = min(len(present), 6) or 1
  columns = 3 + len(maps)
  height, width = images.shape[1:3]
  # One image of all cells in one axes: a grid of axes per cell took ~5.6 s a figure to
  # lay out and draw (18 figures in the demo, profiled), this ~1 s.
  magma = colormaps["magma"]
  gap = max(2, width // 40)
  grid = mosaic([[images[row] / 255.0, _colorize(labels[row], palette),
                  _colorize(prediction[row], palette),
                  *(magma(np.clip(values[row], 0.0, 1.0))[..., :3] for values in maps.values())]
                 for row in range(len(images))], gap)
  cell = 2.3
  fig = Figure(figsize=(cell * columns + 1.0, cell * height / width * len(images) + 0.9 +
                        0.18 * -(-len(present) // legend_columns)), layout="compressed")
  ax = fig.subplots()
  ax.imshow(grid, interpolation="nearest")
  ax.set_axis_off()
  titles = ["image", "label", "prediction", *(MEASURES[m].short for m in maps)]
  for column, title in enumerate(titles):
    ax.text(column * (width + gap) + width / 2, -gap, title, ha="center", va="bottom")
  if maps:
    fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=magma), ax=ax, shrink=0.9,
                 label="normalised uncertainty (the maps)")
  fig.legend([Patch(color=palette[c]) for c in present], [class_names[c] for c in present],
             loc="outside lower center", ncols=legend_columns, fontsize="x-small",
             title="classes (black: ignored)", title_fontsize="x-small")
  fig.suptitle(f"{method} on {split}")
  return _save(fig, path)


def mosaic(rows: list[list[np.ndarray]], gap: int) -> np.ndarray:
  """RGB cells float [H, W, 3] in [0, 1], all of one size, by rows -> one float image
  [R*H + (R-1)*gap, C*W + (C-1)*gap, 3], white between the cells."""
  height, width = rows[0][0].shape[:2]
  columns = max(len(row) for row in rows)
  out = np.ones((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3))
  for r, row in enumerate(rows):
    for c, cell in enumerate(row):
      top, left = r * (height + gap), c * (width + gap)
      out[top:top + height, left:left + width] = cell
  return out


def overlay(image: np.ndarray, out: Arrays, class_names: list[str] | tuple[str, ...], *,
            index: int = 0, alpha: float = 0.6, title: str = "",
            path: Path | None = None) -> Figure:
  """One predicted image at a glance: the image, its segmentation blended over it, and
  each uncertainty map of `out` (on the shared 0..1 scale).

  Args:
    image: uint8 [H, W, 3] (or [B, H, W, 3], then image `index`).
    out: what `Predictor.predict` returned for it ("segmentation" [B, H, W] and the maps
      [B, H, W] it has).
    class_names: the predictor's class names (the legend lists the classes present).
    index: which image of the batch.
    alpha: the segmentation's opacity over the image.
    title: a title over the row.
    path: also write a PNG there.

  Returns:
    the matplotlib Figure (shown inline by Jupyter).
  """
  image = np.asarray(image)
  image = image[index] if image.ndim == 4 else image
  segmentation = np.asarray(out["segmentation"][index])
  maps = {m: np.asarray(out[m][index]) for m in MEASURES if m in out}
  palette = class_palette(len(class_names))
  blended = (1 - alpha) * image / 255.0 + alpha * _colorize(segmentation, palette)
  present = [int(c) for c in np.unique(segmentation) if 0 <= c < len(class_names)]
  columns = 2 + len(maps)
  height, width = segmentation.shape
  legend_columns = min(len(present), 6) or 1
  fig = Figure(figsize=(2.6 * columns + 1.0, 2.6 * height / width + 1.0 +
                        0.18 * -(-len(present) // legend_columns)), layout="compressed")
  axes = fig.subplots(1, columns, squeeze=False)[0]
  axes[0].imshow(image, interpolation="nearest")
  axes[1].imshow(blended, interpolation="nearest")
  for ax, values in zip(axes[2:], maps.values()):
    shown = ax.imshow(values, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
  for ax, name in zip(axes, ["image", "segmentation", *(MEASURES[m].title for m in maps)]):
    ax.set_title(name, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
  if maps:
    fig.colorbar(shown, ax=axes[2:], shrink=0.9, label="normalised uncertainty")
  fig.legend([Patch(color=palette[c]) for c in present], [class_names[c] for c in present],
             loc="outside lower center", ncols=legend_columns, fontsize="x-small")
  if title:
    fig.suptitle(title)
  if path is not None:
    _save(fig, path)
  return fig


def _max_label(labels: np.ndarray) -> int:
  valid = labels[labels != metrics.IGNORE_LABEL]
  return int(valid.max()) if valid.size else 0


# -------------------------------------------------------------------------- write_all

# ------------------------------------------------------------------ routing stability

def routing_stability(results: dict, path: Path) -> Path:
  """Top-1 expert agreement and total-variation distance of each MoE's expected routing
  between clean and noisy inputs, against the noise σ (× the image's pixel std)."""
  entry = results["routing_stability"]
  colors = _colors(results)
  noise = _floats(entry["noise"])
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  titles = {"top1_agreement": "top-1 expert agreement (higher = more stable)",
            "total_variation": "total variation ½‖ḡ(x) − ḡ(x+δ)‖₁ (lower = more stable)"}
  for ax, (name, title) in zip(axes, titles.items()):
    for method, values in entry["methods"].items():
      kind = (results.get("routers") or {}).get(method, {}).get("router", "deterministic")
      ax.plot(noise, _floats(values[name]), marker="o", label=method,
              ls="--" if kind == "deterministic" else "-", **_line_style(method, colors))
    ax.set_xscale("log")
    ax.set_xlabel("input noise σ (× pixel std)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Routing stability on {entry['split']} ({entry['images']} images; dashed: "
               "deterministic routers)", fontsize=11)
  fig.tight_layout()
  return _save(fig, path)


# ------------------------------------------------------- accuracy-calibration trade-off

VARIANT_MARKERS = {"": "o", "hard": "^", "ts": "s", "mocae": "D", "mocae_hard": "v",
                   "mocae_ts": "P"}


def accuracy_calibration(results: dict, path: Path) -> Path:
  """mIoU against max-softmax ECE of every method and variant (calibration_report's
  trade-off), one panel for the ID split and one for the OOD split; each method's variants
  share its colour, the marker says the variant."""
  from moe_jax import calibration_report
  in_split, ood_split = results.get("ood_splits") or [None, None]
  splits = [s for s in dict.fromkeys([in_split or next(iter(results["splits"])), ood_split])
            if s]
  variants = results.get("variants") or {}
  colors = _colors(results)
  fig = Figure(figsize=(6.2 * len(splits), 5.6), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(splits)))
  for ax, split in zip(axes, splits):
    for method in calibration_report.compared_methods(results, splits[0]):
      entry = results["splits"].get(split, {}).get(method) or {}
      ece = (entry.get("calibration") or {}).get("max_softmax", {}).get("ece")
      if ece is None or entry.get("miou") is None:
        continue
      kind = variants.get(method, {"of": method, "variant": ""})
      ax.scatter(100 * ece, 100 * entry["miou"], s=60 if _is_moe(method) else 40,
                 marker=VARIANT_MARKERS.get(kind["variant"], "o"),
                 color=colors.get(kind["of"], "gray"), edgecolor="black", linewidth=0.5)
      ax.annotate(method, (100 * ece, 100 * entry["miou"]), fontsize=6,
                  xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("ECE (%, max softmax, 15 bins; lower is better)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(f"{split} ({'OOD' if split == ood_split else 'ID'})", fontsize=10)
    ax.grid(alpha=0.3)
  handles = {name or "as trained": Line2D([], [], marker=marker, ls="", color="gray")
             for name, marker in VARIANT_MARKERS.items()}
  _legend_below(fig, handles)
  fig.suptitle("Accuracy–calibration trade-off (up and left is better)", fontsize=11)
  return _save(fig, path)


def _plotted_splits(results: dict) -> list[str]:
  """The first clean split and the OOD pair's splits."""
  clean = [s for s in results["splits"] if not _is_corrupted(s)]
  return list(dict.fromkeys(clean[:1] + list(results.get("ood_splits") or [])))


def _jobs(results: dict, histograms: Arrays, panels: Arrays
          ) -> Iterator[tuple[str, Callable[[Path], Path]]]:
  """(file name, draw(path)) of every figure whose inputs exist."""
  for split in _plotted_splits(results):
    if any(e.get("uncertainty") for e in results["splits"].get(split, {}).values()):
      yield (f"conditional_correctness_{split}.png",
             functools.partial(conditional_correctness, results, split))
    if _stored_methods(histograms, split, "calibration/max_softmax"):
      yield f"reliability_{split}.png", functools.partial(reliability, results, histograms,
                                                          split)
  ood = results.get("ood_splits") or []
  if len(ood) == 2 and any(
      _stored_methods(histograms, ood[0], f"histogram/{m}") and
      _stored_methods(histograms, ood[1], f"histogram/{m}") for m in MEASURES):
    yield "ood_roc.png", functools.partial(ood_roc, results, histograms)
  info = results.get("corruptions") or {}
  if info.get("names") and info.get("clean", info.get("split")) in results["splits"]:
    yield "corruption_severity.png", functools.partial(corruption_severity, results)
  if any(_stored_methods(histograms, s, "gate_histogram")
         for s in results["splits"] if not _is_corrupted(s)):
    yield "gate_weights.png", functools.partial(gate_weights, results, histograms)
  if results.get("variants") and any(
      m in results["variants"] for split in results["splits"].values() for m in split):
    yield "accuracy_calibration.png", functools.partial(accuracy_calibration, results)
  if results.get("routing_stability"):
    yield "routing_stability.png", functools.partial(routing_stability, results)
  for split in dict.fromkeys(key.split("/")[0] for key in panels):
    if _is_corrupted(split) or f"{split}/image" not in panels:
      continue
    for method in _stored_methods(panels, split, "prediction"):
      yield f"panel_{method}_{split}.png", functools.partial(panel, results, panels, method,
                                                             split)


def write_all(workdir: str | Path) -> list[Path]:
  """Every figure whose inputs `workdir` holds, as `<workdir>/plots/<name>.png`.

  Needs `results.json` (nothing is drawn without it); figures from `histograms.npz` or
  `panels.npz` are skipped when that file is missing.

  Returns:
    The written paths, in drawing order.
  """
  workdir = Path(workdir)
  if not (workdir / RESULTS_FILE).exists():
    return []
  results = output_files.read_json(workdir / RESULTS_FILE, rewritten_by="evaluate")
  panels = output_files.read_arrays(workdir / PANELS_FILE, rewritten_by="evaluate")
  out = workdir / PLOTS_DIR
  # The histograms are read as the figures ask for them (the demo's hold ~6,500 arrays,
  # the figures read a few hundred).
  with output_files.open_arrays(workdir / HISTOGRAMS_FILE,
                                rewritten_by="evaluate") as histograms:
    return [draw(out / name) for name, draw in _jobs(results, histograms, panels)]
