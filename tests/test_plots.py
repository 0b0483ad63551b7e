"""Figures from a fake evaluated run (2 experts, 3 classes, two corruptions)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from moe_jax import metrics, output_files, plots

EXPERTS = ["highway", "urban"]
CLASSES = ["road", "car", "sky"]
SPLITS = ["all_test", "ambiguous_test", "highway_test", "urban_test"]
CORRUPTIONS = ["fog", "gaussian_noise"]
SEVERITIES = [1, 2, 3, 4, 5]
MOE = ["moe_simple", "moe_classwise"]
METHODS = {"expert_highway": ["predictive_entropy"], "expert_urban": ["predictive_entropy"],
           "ensemble": list(plots.MEASURES)[:3], **{m: list(plots.MEASURES) for m in MOE},
           "baseline": ["predictive_entropy"], "mc_dropout_4": list(plots.MEASURES)[:3]}
CALIBRATION_BINS = 45  # a multiple of 15: regrouped for the diagrams


def _stats(rng: np.random.Generator, method: str, measures: list[str]) -> dict:
  """Histograms of one method on one split, shaped as evaluate writes them."""
  stats = {"confusion": rng.integers(0, 500, (3, 3)),
           "sums": np.array([1000.0, 300.0, 500.0])}
  for measure in measures + ["max_softmax"]:
    count = rng.integers(0, 200, CALIBRATION_BINS).astype(np.float64)
    centre = (np.arange(CALIBRATION_BINS) + 0.5) / CALIBRATION_BINS
    stats[f"calibration/{measure}"] = np.stack(
        [count, count * centre, count * np.clip(centre + rng.normal(0, 0.1), 0, 1)])
  for measure in measures:
    u = np.linspace(0, 1, metrics.NUM_BINS)
    stats[f"histogram/{measure}"] = np.stack([rng.poisson(50 * u), rng.poisson(50 * (1 - u))])
  if method in MOE:
    stats["gate_histogram"] = np.stack([rng.integers(0, 30, 20)] * 2)
    stats["gate_histogram"][1] = stats["gate_histogram"][0][::-1]
    stats["gate_sum"] = np.array([0.6, 0.4]) * stats["gate_histogram"][0].sum()
  return stats


def _summary(stats: dict, thresholds: np.ndarray) -> dict:
  """The results.json entry of `_stats` (the keys the figures read)."""
  uncertainty = {}
  for key, histogram in stats.items():
    if key.startswith("histogram/"):
      curves = metrics.conditional_correctness_from_histogram(histogram, thresholds)
      uncertainty[key.split("/")[1]] = {
          **{k: [None if np.isnan(v) else v for v in curves[k].tolist()]
             for k in ("p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu",
                       "pavpu_reference")},
          "auroc_misclassification": metrics.auroc_from_histograms(histogram[1], histogram[0])}
  return {"miou": metrics.mean_iou(stats["confusion"]),
          "calibration": {"max_softmax": metrics.calibration_errors(
              stats["calibration/max_softmax"])},
          "uncertainty": uncertainty}


def _fake_run(workdir: Path, *, histograms: bool = True, panels: bool = True,
              corruptions: bool = True) -> Path:
  """results.json (+ histograms.npz, panels.npz) of a small fake run in `workdir`."""
  rng = np.random.default_rng(0)
  thresholds = metrics.REFERENCE_THRESHOLDS
  splits = SPLITS + ([f"all_test:{c}:{s}" for c in CORRUPTIONS for s in SEVERITIES]
                     if corruptions else [])
  arrays, results = {}, {"splits": {}}
  for split in splits:
    for method, measures in METHODS.items():
      stats = _stats(rng, method, measures)
      arrays.update({f"{split}/{method}/{k}": v for k, v in stats.items()})
      results["splits"].setdefault(split, {})[method] = _summary(stats, thresholds)
  results.update(thresholds=thresholds.tolist(), class_names=CLASSES, experts=EXPERTS,
                 ood_splits=["all_test", "ambiguous_test"], ood={},
                 corruptions={"split": "all_test", "names": CORRUPTIONS if corruptions else [],
                              "severities": SEVERITIES if corruptions else []})
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(results, sort_keys=True))
  if histograms:
    np.savez(workdir / "histograms.npz", **arrays)
  if panels:
    np.savez(workdir / "panels.npz", **_fake_panels(rng))
  return workdir


def _fake_panels(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """2 images of 24x40 per clean part, with the maps of each MoE method."""
  arrays = {}
  for split in ["highway_test", "urban_test", "ambiguous_test"]:
    label = rng.integers(0, 3, (2, 24, 40)).astype(np.uint8)
    label[:, :4] = 255
    arrays[f"{split}/image"] = rng.integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    arrays[f"{split}/label"] = label
    for method in MOE:
      arrays[f"{split}/{method}/prediction"] = rng.integers(0, 3, (2, 24, 40), dtype=np.int32)
      for measure in plots.MEASURES:
        arrays[f"{split}/{method}/{measure}"] = rng.random((2, 24, 40), dtype=np.float32)
  return arrays


ALL = ({f"{kind}_{split}.png" for kind in ("conditional_correctness", "reliability")
        for split in ("all_test", "ambiguous_test")} |
       {"ood_roc.png", "corruption_severity.png", "gate_weights.png"} |
       {f"panel_{m}_{s}.png" for m in MOE
        for s in ("highway_test", "urban_test", "ambiguous_test")})


def _assert_pngs(paths: list[Path]) -> None:
  for path in paths:
    with Image.open(path) as image:
      assert image.format == "PNG"
      width, height = image.size
    assert 300 <= width <= 6000 and 300 <= height <= 6000, (path.name, image.size)


def test_write_all_writes_every_figure(tmp_path):
  paths = plots.write_all(_fake_run(tmp_path / "run"))
  assert {p.name for p in paths} == ALL
  assert all(p.parent == tmp_path / "run" / "plots" for p in paths)
  _assert_pngs(paths)


def test_figures_are_deterministic(tmp_path):
  first = plots.write_all(_fake_run(tmp_path / "a", corruptions=False))
  second = plots.write_all(_fake_run(tmp_path / "b", corruptions=False))
  assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize("missing, skipped", [
    ("histograms.npz", {"reliability_all_test.png", "reliability_ambiguous_test.png",
                        "ood_roc.png", "gate_weights.png"}),
    ("panels.npz", {p for p in ALL if p.startswith("panel_")}),
])
def test_figures_without_their_inputs_are_skipped(tmp_path, missing, skipped):
  workdir = _fake_run(tmp_path / "run", corruptions=False)
  (workdir / missing).unlink()
  names = {p.name for p in plots.write_all(workdir)}
  assert names == ALL - skipped - {"corruption_severity.png"}


def test_an_old_run_without_the_new_keys_gets_the_figures_it_can(tmp_path):
  workdir = _fake_run(tmp_path / "run", corruptions=False, panels=False)
  results = json.loads((workdir / "results.json").read_text())
  for key in ("experts", "corruptions", "ood_splits"):
    del results[key]
  (workdir / "results.json").write_text(json.dumps(results))
  names = {p.name for p in plots.write_all(workdir)}
  # Without "experts" the gate figure names the experts by index.
  assert names == {"conditional_correctness_all_test.png", "reliability_all_test.png",
                   "gate_weights.png"}


def test_no_results_no_figures(tmp_path):
  assert plots.write_all(tmp_path) == []
  assert not (tmp_path / "plots").exists()


def test_calibration_histograms_regroup_to_15_bins():
  histogram = np.arange(3 * 1500, dtype=np.float64).reshape(3, 1500)
  regrouped = plots._regroup(histogram)
  assert regrouped.shape == (3, 15)
  np.testing.assert_allclose(regrouped.sum(1), histogram.sum(1))
  assert plots._regroup(histogram[:, :20]).shape == (3, 20)  # not a multiple: kept


def test_class_palette_is_fixed_and_ignore_is_black():
  palette = plots.class_palette(38)
  np.testing.assert_array_equal(palette, plots.class_palette(38))
  assert len({tuple(c) for c in palette}) == 38
  rgb = plots._colorize(np.array([[0, 255, 37]]), palette)
  np.testing.assert_array_equal(rgb[0, 1], [0, 0, 0])
  np.testing.assert_array_equal(rgb[0, 2], palette[37])


def test_a_missing_corrupted_split_leaves_a_gap(tmp_path):
  workdir = _fake_run(tmp_path / "run", histograms=False, panels=False)
  results = json.loads((workdir / "results.json").read_text())
  del results["splits"]["all_test:fog:3"]
  del results["splits"]["all_test:gaussian_noise:3"]["baseline"]["uncertainty"]
  (workdir / "results.json").write_text(json.dumps(results))
  names = {p.name for p in plots.write_all(workdir)}
  assert "corruption_severity.png" in names
  values = np.array([[1.0, np.nan, 3.0], [3.0, np.nan, np.nan]])
  np.testing.assert_array_equal(plots._nanmean(values), [2.0, np.nan, 3.0])


def test_gate_units_follow_the_routing_unit_in_the_results():
  results = {"routing_units": {"moe_simple": "image", "moe_classwise": "class",
                               "moe_dense": "pixel"}}
  assert plots._gate_unit(results, "moe_simple") == "images"
  assert plots._gate_unit(results, "moe_classwise") == "pixels"
  assert plots._gate_unit(results, "moe_dense") == "pixels"
  assert plots._gate_unit({}, "moe_simple") == "units"  # results.json from before the units


class _Payload:
  """Unpickling this object would run code: it writes `marker`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (Path.write_text, (Path(self.marker), "pickle ran"))


def test_a_pickled_object_in_an_npz_is_refused_and_never_run(tmp_path):
  """histograms.npz / panels.npz are plain arrays; one holding a pickled object (which
  would write a file when unpickled) stops the figures with an error, and nothing runs."""
  workdir = _fake_run(tmp_path / "run", panels=False)
  marker = tmp_path / "ran.txt"
  evil = np.empty(1, object)
  evil[0] = _Payload(marker)
  np.savez(workdir / "panels.npz", evil=evil)
  with pytest.raises(output_files.OutputError, match="panels.npz is damaged .*allow_pickle"):
    plots.write_all(workdir)
  assert not marker.exists()


def test_mosaic_places_each_cell_with_white_gaps_between():
  a, b = np.zeros((2, 3, 3)), np.full((2, 3, 3), 0.5)
  out = plots.mosaic([[a, b], [b, a]], gap=1)
  assert out.shape == (5, 7, 3)
  for (top, left), cell in {(0, 0): a, (0, 4): b, (3, 0): b, (3, 4): a}.items():
    np.testing.assert_array_equal(out[top:top + 2, left:left + 3], cell)
  np.testing.assert_array_equal(out[2], 1.0)  # the gap row
  np.testing.assert_array_equal(out[:, 3], 1.0)  # the gap column


def test_gate_panel_has_one_column_per_expert_and_their_mean_weights():
  from matplotlib.figure import Figure
  experts = [f"group{k}" for k in range(8)]
  histogram = np.zeros((8, 20))
  histogram[np.arange(8), np.arange(8) * 2] = 10  # 10 units; expert k always gets bin 2k
  total = (np.arange(8) * 2 + 0.5) / 20 * 10
  ax = Figure().subplots()
  image = plots._gate_panel(ax, histogram, total, experts)
  assert [t.get_text() for t in ax.get_xticklabels()] == experts
  np.testing.assert_allclose(image.get_array().T, histogram / 10)  # [bins, K] shown
  (dots,) = ax.get_lines()
  np.testing.assert_allclose(dots.get_ydata(), total / 10)
  np.testing.assert_array_equal(dots.get_xdata(), np.arange(8))
