"""The whole pipeline from the command line, run as a user runs it (subprocesses)."""

import json
from pathlib import Path
import re
import signal
import time

import numpy as np
import pytest

import forced_devices

BASE_METHODS = {"expert_highway", "expert_urban", "ensemble", "moe_simple", "moe_classwise",
                "moe_simple_mfvr", "moe_simple_robust_filtered", "baseline", "deep_ensemble",
                "mc_dropout_2"}
# The smoke preset's variants (eval.variant_routers = deterministic; calibrate has run).
MOE_VARIANTS = ("_hard", "_ts", "_mocae", "_mocae_hard", "_mocae_ts")
METHODS = (BASE_METHODS | {"baseline_ts", "deep_ensemble_ts", "mc_dropout_2_ts"}
           | {moe + v for moe in ("moe_simple", "moe_classwise", "moe_simple_robust_filtered")
              for v in MOE_VARIANTS})
MEASURES = {"predictive_entropy", "mutual_information", "expert_variance", "gate_entropy"}
# Every MoE's, from its routing samples (the smoke preset: mfvr around the simple gate).
ROUTING_MEASURES = {"routing_mutual_information", "routing_epistemic", "expert_disagreement",
                    "aleatoric"}
DEEP_ENSEMBLE = ("--config.model.deep_ensemble_members=2",)
TEST_SPLITS = {"highway_test", "urban_test", "all_test", "ambiguous_test"}
# The smoke preset: 2 corruptions at severities 1 and 5 of 2 frames per part, and those
# frames clean.
CORRUPTED_SPLITS = {"all_test:clean:0", "all_test:gaussian_noise:1", "all_test:gaussian_noise:5",
                    "all_test:fog:1", "all_test:fog:5"}
TRAINED = ("experts", "baseline", "deep_ensemble", "gate_simple", "gate_simple_robust_filtered",
           "gate_simple_mfvr", "gate_classwise")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, run_main):
  """The whole smoke pipeline with a 2-member deep ensemble, run once for the tests below."""
  workdir = tmp_path_factory.mktemp("smoke") / "run"
  # The reruns below load its compiled programs from the tests' cache (tests/conftest.py).
  code, out, err = run_main("--config=configs/a2d2.py:smoke", *DEEP_ENSEMBLE, workdir=workdir)
  assert code == 0, err[-3000:]
  return workdir, out


def check_calibration(workdir, results):
  """The calibrate stage's file, the variants' entries, the hard subset and the quantile
  thresholds in the smoke run's results."""
  fitted = json.loads((workdir / "calibration.json").read_text())
  assert results["calibration"] == fitted
  assert set(fitted["expert_temperatures"]) == {"expert_highway", "expert_urban"}
  assert set(fitted["aggregate"]) == {m.removesuffix("_ts") for m in METHODS
                                      if m.endswith("_ts")}
  for method, t in fitted["aggregate"].items():
    assert 0.1 <= t <= 10, method
    nll = fitted["val_nll"][method]
    assert nll["after"] <= nll["before"] + 1e-6, method
  assert fitted["checkpoints"] == {name: meta["step"]
                                   for name, meta in results["checkpoints"].items()}
  assert fitted["hard_subset"]["moe"] == "moe_simple"
  assert results["variants"]["moe_simple_mocae_hard"] == {"of": "moe_simple",
                                                          "variant": "mocae_hard"}
  for method, entry in results["splits"]["all_test"].items():
    hard = entry["hard_subset"]
    assert 0 < hard["pixel_fraction"] <= 1 and 0 <= hard["pixel_accuracy"] <= 1, method
  base, tempered = (results["splits"]["all_test"][m] for m in ("moe_simple", "moe_simple_ts"))
  assert tempered["miou"] == base["miou"]  # the prediction is the method's own
  assert set(tempered["uncertainty"]) == {"predictive_entropy"}
  assert set(results["splits"]["all_test"]["moe_simple_hard"]["uncertainty"]) == \
      MEASURES | ROUTING_MEASURES
  quantiles = base["uncertainty"]["mutual_information"]["at_quantiles"]
  assert quantiles["quantiles"] == [0.5, 0.9] and len(quantiles["pavpu"]) == 2


@pytest.mark.slow
def test_smoke_pipeline_trains_every_stage_and_writes_results(smoke_run, run_main):
  workdir, out = smoke_run
  for stage in TRAINED:
    assert f"{stage}: done in" in out
    steps = [p.name for p in (workdir / "checkpoints" / stage).iterdir()]
    assert steps and all(s.isdigit() for s in steps), steps
    assert list((workdir / "tensorboard" / stage).glob("events.out.tfevents.*"))
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["splits"]) == TEST_SPLITS | CORRUPTED_SPLITS
  assert results["corruptions"] == {"split": "all_test", "names": ["gaussian_noise", "fog"],
                                    "severities": [1, 5], "frames_per_part": 2,
                                    "clean": "all_test:clean:0"}
  assert results["experts"] == ["highway", "urban"]
  assert results["gates"] == ["simple", "classwise"]
  for split, methods in results["splits"].items():
    assert set(methods) == METHODS, split
    for entry in methods.values():
      assert 0.0 <= entry["miou"] <= 1.0 and len(entry["iou_per_class"]) == 38
  assert set(results["checkpoints"]) == {"gate_simple", "gate_simple_robust_filtered",
                                         "gate_simple_mfvr", "gate_classwise", "baseline",
                                         "deep_ensemble"}
  assert len(results["thresholds"]) == 50 and results["thresholds"][0] == 0.01
  for moe in ("moe_simple", "moe_classwise"):
    for measure, entry in results["splits"]["ambiguous_test"][moe]["uncertainty"].items():
      assert len(entry["pavpu"]) == 50, measure
      assert 0 <= entry["auroc_misclassification"] <= 1 and 0 <= entry["ece"] <= 1, measure
    assert set(results["splits"]["ambiguous_test"][moe]["uncertainty"]) == \
        MEASURES | ROUTING_MEASURES
  entry = results["splits"]["all_test"]["moe_simple"]["uncertainty"]["mutual_information"]
  for variant in ("per_image", "patch"):  # the reference's per-image mean; 4x4 patches
    assert set(entry[variant]) == {"p_accurate_given_certain", "p_uncertain_given_inaccurate",
                                   "pavpu", "pavpu_reference"}
    assert all(v is None or 0 <= v <= 1 for v in entry[variant]["pavpu"])
  calibration = results["splits"]["all_test"]["baseline"]["calibration"]["max_softmax"]
  assert set(calibration) == {"ece", "mce", "adaptive_ece", "adaptive_mce"}
  assert set(results["splits"]["all_test"]["baseline"]["uncertainty"]) == {"predictive_entropy"}
  assert set(results["splits"]["all_test"]["mc_dropout_2"]["uncertainty"]) == \
      MEASURES - {"gate_entropy"}
  assert set(results["ood"]["moe_classwise"]) == MEASURES | ROUTING_MEASURES
  stability = results["routing_stability"]
  assert stability["split"] == "all_test" and stability["images"] == 4
  assert set(stability["methods"]) == {"moe_simple", "moe_simple_robust_filtered",
                                       "moe_simple_mfvr", "moe_classwise"}
  for values in stability["methods"].values():
    assert len(values["top1_agreement"]) == 5 and values["jaccard"] is None  # K = 2
    assert all(0 <= a <= 1 for a in values["top1_agreement"] + values["total_variation"])
  assert results["routers"]["moe_simple_mfvr"] == {"gate": "simple", "router": "mfvr",
                                                   "objective": "erm"}
  assert results["routers"]["moe_simple_robust_filtered"]["objective"] == "robust_filtered"
  with np.load(workdir / "histograms.npz") as histograms:  # plain arrays, no pickle
    assert histograms["all_test/moe_simple/histogram/gate_entropy"].shape == (2, 1000)
    # The simple gate counts images (4 + 4 in all_test), the classwise one pixels.
    simple = histograms["all_test/moe_simple/gate_histogram"]
    assert simple.shape == (2, 20) and simple.sum(1).tolist() == [8, 8]
    classwise = histograms["all_test/moe_classwise/gate_histogram"]
    assert classwise.sum(1).tolist() == [histograms["all_test/moe_classwise/sums"][0]] * 2
    np.testing.assert_allclose(histograms["all_test/moe_simple/gate_sum"].sum(), 8, rtol=1e-5)
  check_calibration(workdir, results)
  with np.load(workdir / "panels.npz") as panels:
    assert panels["urban_test/image"].shape == (1, 32, 48, 3)  # smoke: eval.panel_images=1
    assert panels["urban_test/moe_classwise/gate_entropy"].shape == (1, 32, 48)
    assert "all_test/image" not in panels  # a union split's frames are its parts'
  report = (workdir / "report.md").read_text()
  for figure in ("conditional_correctness_all_test", "reliability_ambiguous_test", "ood_roc",
                 "corruption_severity", "gate_weights", "panel_moe_classwise_urban_test",
                 "routing_stability", "accuracy_calibration"):
    assert (workdir / "plots" / f"{figure}.png").is_file(), figure
    assert f"](plots/{figure}.png)" in report, figure
  assert "## mIoU (%)" in report and "## OOD detection" in report
  assert "1. **MoE vs ensemble under OOD** (`ambiguous_test`" in report
  assert "2. **Simple vs classwise gate-entropy calibration** (ECE" in report
  assert "## Bayesian routing" in report and "| `moe_simple_mfvr` | mfvr |" in report
  assert "1. **Routing stability up**" in report
  assert "## Calibration under distribution shift" in report
  assert "### Hard vs soft routing under shift (the paper's theorem)" in report
  assert "- `moe_simple_robust_filtered` against `moe_simple` (ERM):" in report
  assert not list((workdir / "plots").glob("panel_*_hard_*.png"))  # panels: no variants
  miou = results["splits"]["urban_test"]["moe_simple"]["miou"]
  assert "| moe_simple | " in report and f"{100 * miou:.1f}" in report
  assert len(results["class_names"]) == 38
  for method in METHODS:  # the printed table is the JSON's
    miou = results["splits"]["all_test"][method]["miou"]
    assert re.search(rf"^{method}\s.*{100 * miou:.1f}\s+[\d.]+$", out, re.M), method


@pytest.mark.slow
@pytest.mark.long
def test_the_same_command_in_a_fresh_workdir_gives_an_identical_results_json(
    smoke_run, run_main, tmp_path):
  """Determinism across processes: data, training and evaluation again from nothing (with
  the first run's compilation cache) give results.json byte for byte."""
  workdir, _ = smoke_run
  code, _, err = run_main("--config=configs/a2d2.py:smoke", *DEEP_ENSEMBLE,
                          workdir=tmp_path / "again")
  assert code == 0, err[-3000:]
  assert (tmp_path / "again" / "results.json").read_bytes() == \
      (workdir / "results.json").read_bytes()


@pytest.mark.slow
def test_rerun_with_another_config_is_refused_before_anything_runs(smoke_run, run_main):
  workdir, _ = smoke_run
  before = _files(workdir)
  code, out, err = run_main("--config=configs/a2d2.py:smoke", *DEEP_ENSEMBLE,
                            "--config.train.experts.epochs=3", workdir=workdir)
  assert code != 0 and "experts:" not in out
  assert err.strip().splitlines()[-1].startswith(
      "error: config key train.experts.epochs=3 differs from the run in ")
  assert _files(workdir) == before  # the run's config, checkpoints and results untouched


def _files(root: Path) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime in ns)} of every file under `root`."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------ restore: predicting with a finished run

def _recomputed_maps(out: dict, num_classes: int, method: str) -> dict:
  """The maps from the returned member_probs and gate_weights alone (moe_jax.uncertainty)."""
  import jax.numpy as jnp
  import scipy.special
  from moe_jax import measures, uncertainty
  probs, gates, seg = out["member_probs"], out.get("gate_weights"), out["segmentation"]
  if method == "moe_simple":  # [B,K]: one weight per image and expert
    per_pixel = np.broadcast_to(gates[:, None, None, :], (*seg.shape, gates.shape[-1]))
  elif method == "moe_classwise":  # [B,C,K]: each pixel's predicted class's gate
    per_pixel = np.take_along_axis(gates[:, None, None], seg[..., None, None], 3)[..., 0, :]
  else:
    per_pixel = None
  weights = None if per_pixel is None else np.moveaxis(per_pixel, -1, 0)
  raw = uncertainty.measures(uncertainty.moments(jnp.asarray(probs), weights))
  if per_pixel is not None:
    raw["gate_entropy"] = -scipy.special.xlogy(per_pixel, per_pixel).sum(-1)
  return measures.normalised(raw, num_classes, probs.shape[0])


@pytest.mark.slow
@pytest.mark.parametrize("stage, options, method, members", [
    ("gate", {}, "moe_simple", 2), ("gate_classwise", {}, "moe_classwise", 2),
    ("experts", {"expert": "urban"}, "expert_urban", 1),
    ("baseline", {"passes": 3}, "mc_dropout_3", 3)])
def test_restore_predicts_consistent_maps_at_any_size(smoke_run, stage, options, method,
                                                       members):
  import moe_jax
  workdir, _ = smoke_run
  predictor = moe_jax.restore(workdir, stage=stage, **options)
  assert predictor.method == method and predictor.image_size == (32, 48)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 61, 3), np.uint8)  # odd size, one image
  out = predictor.predict(image)
  c = len(predictor.class_names)
  assert out["segmentation"].shape == (1, 37, 61) and out["segmentation"].dtype == np.int32
  assert out["member_probs"].shape == (members, 1, 37, 61, c)
  np.testing.assert_allclose(out["member_probs"].sum(-1), 1.0, atol=1e-5)
  maps = {m for m in MEASURES if m in out}
  assert maps == (MEASURES if method.startswith("moe_") else MEASURES - {"gate_entropy"})
  for name in maps:
    assert out[name].shape == (1, 37, 61) and 0 <= out[name].min() and out[name].max() <= 1
  again = _recomputed_maps(out, c, method)
  for name in maps:
    np.testing.assert_allclose(out[name], again[name], atol=2e-5, err_msg=name)
  if method == "moe_simple":
    assert out["gate_weights"].shape == (1, 2)
    # Fused logits are Σ g_k z_k; log p_k differs from z_k by a per-pixel constant.
    fused = np.einsum("bk,kbhwc->bhwc", out["gate_weights"], np.log(out["member_probs"]))
    assert np.mean(fused.argmax(-1) == out["segmentation"]) > 0.999
  elif method == "moe_classwise":
    assert out["gate_weights"].shape == (1, c, 2)
  else:
    np.testing.assert_array_equal(out["segmentation"],
                                  out["member_probs"].mean(0).argmax(-1))
  if method == "moe_simple":  # (each shape compiles: once is enough to test)
    # A batch of another size compiles again and gives each image its own result.
    batch = np.stack([image[:32, :48], rng.integers(0, 256, (32, 48, 3), np.uint8)])
    both = predictor.predict(batch, member_probs=False)
    assert both["segmentation"].shape == (2, 32, 48) and "member_probs" not in both
    alone = predictor.predict(batch[:1], member_probs=False)
    np.testing.assert_allclose(both["predictive_entropy"][:1], alone["predictive_entropy"],
                               atol=1e-5)


@pytest.mark.slow
def test_restore_from_a_stage_dir_and_its_clear_errors(smoke_run, tmp_path):
  import moe_jax
  from moe_jax.checkpoint import CheckpointError
  workdir, _ = smoke_run
  assert moe_jax.restore(workdir / "checkpoints" / "experts").method == "ensemble"
  with pytest.raises(CheckpointError, match="is not a directory"):
    moe_jax.restore(tmp_path / "nothing")
  with pytest.raises(CheckpointError, match="no config.json in"):
    moe_jax.restore(tmp_path)
  with pytest.raises(ValueError, match="unknown stage 'gates'"):
    moe_jax.restore(workdir, stage="gates")
  with pytest.raises(ValueError, match="unknown expert 'rural'"):
    moe_jax.restore(workdir, stage="experts", expert="rural")
  with pytest.raises(ValueError, match="uint8 RGB images"):
    moe_jax.restore(workdir, stage="experts").predict(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"at least one image .*; got an empty batch \[0, 8, 8, 3\]"):
    moe_jax.restore(workdir, stage="experts").predict(np.zeros((0, 8, 8, 3), np.uint8))
  for passes in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match=r"passes=.*: MC dropout's number of passes must be an "
                                         r"integer >= 1"):
      moe_jax.restore(workdir, stage="baseline", passes=passes)
  (tmp_path / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(CheckpointError, match="stage 'gate_simple' has not finished"):
    moe_jax.restore(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # restoring writes nothing


@pytest.mark.slow
def test_colab_notebook_restores_the_run_and_draws_the_panel(smoke_run, tmp_path):
  """notebooks/colab_restore.ipynb as a user runs it, with its parameters cell set to this
  run (and no pip install: the package is installed already)."""
  import nbclient
  import nbformat
  workdir, _ = smoke_run
  notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "colab_restore.ipynb",
                           as_version=4)
  parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1
  parameters[0].source = (f'PACKAGE = ""\nINSTALL = False\nWORKDIR = "{workdir}"\n'
                          'STAGE = "gate_classwise"\nIMAGE = ""')
  nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "moe_classwise at (32, 48)" in text and "gate_entropy" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the panel was drawn



# ------------------------------------------------ interrupted evaluate and report

def _evaluated_a_split(run) -> bool:
  """The evaluate stage's progress bar has counted a split (tqdm: "evaluate: …| 1/5 …")."""
  return re.search(r"evaluate:.*\| *[1-9]\d*/\d+ ", run.output) is not None


def _new_figure(plots_dir: Path, since: float):
  return lambda: plots_dir.is_dir() and any(p.stat().st_mtime > since
                                            for p in plots_dir.glob("*.png"))


def _leftovers(workdir: Path) -> list[str]:
  """Temp files of interrupted writes and the run lock, anywhere outside the checkpoints."""
  return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")
                if (p.name.endswith(".tmp") or p.name == "run.lock")
                and "checkpoints" not in p.parts)


@pytest.mark.slow
def test_kill_9_ctrl_c_and_sigterm_in_evaluate_and_report_then_the_same_command(smoke_run):
  """kill -9 once evaluate has scored a split, Ctrl-C as it starts, SIGTERM while the report
  draws its figures: the same command then skips every trained stage and writes a
  results.json identical to the uninterrupted run's, complete PNGs and a report whose
  figures all exist; no temp file or lock is left."""
  from PIL import Image
  from cli_process import CliRun
  workdir, _ = smoke_run
  reference = (workdir / "results.json").read_bytes()
  command = ("--config=configs/a2d2.py:smoke", *DEEP_ENSEMBLE, f"--workdir={workdir}")

  run = CliRun(command)
  run.kill_when(lambda: _evaluated_a_split(run))
  assert "experts: already finished" in run.output and "calibrate: already fitted" in run.output

  run = CliRun(command)
  assert run.signal_when(lambda: "evaluate:" in run.output, signal.SIGINT) == 130, run.output
  assert f"interrupted: nothing half-written was left; the same command resumes ({workdir})" \
      in run.output
  assert _leftovers(workdir) == []

  run = CliRun((*command, "--stages=report"))
  assert run.signal_when(_new_figure(workdir / "plots", time.time()), signal.SIGTERM) == 130
  assert "interrupted: nothing half-written was left" in run.output
  assert _leftovers(workdir) == []

  run = CliRun(command)
  assert run.wait() == 0, run.output[-3000:]
  for stage in TRAINED:
    assert f"{stage}: already finished" in run.output
  assert (workdir / "results.json").read_bytes() == reference
  for png in (workdir / "plots").glob("*.png"):
    with Image.open(png) as image:
      image.load()  # decodes every byte: a truncated PNG raises
  linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (workdir / "report.md").read_text())
  assert linked and all((workdir / link).is_file() for link in linked)
  assert _leftovers(workdir) == []


def _entries(tree, path=""):
  """{path: leaf} of a results.json tree."""
  if isinstance(tree, dict):
    return {k: v for key in tree for k, v in _entries(tree[key], f"{path}/{key}").items()}
  if isinstance(tree, list):
    return {k: v for i, x in enumerate(tree) for k, v in _entries(x, f"{path}[{i}]").items()}
  return {path: tree}


@pytest.mark.slow
@pytest.mark.long  # about 3 min: four evaluate runs (one device, 4 devices, two processes)
def test_evaluate_on_four_devices_and_on_two_processes_writes_the_same_results(
    smoke_run, tmp_path):
  """The evaluate stage of the smoke run again, on one device, on a forced 4-device mesh in
  one process, then on two processes of 2 devices each (jax.distributed over gloo on
  localhost; process 0 holds the lock and writes), all three with XLA's default code
  generation (forced_devices.default_codegen) and one XLA CPU thread count
  (forced_devices.pin_cpu_threads): both results.json hold the one-device run's numbers bit
  for bit (docs/scaling.md)."""
  import os
  import shutil
  from cli_process import CliRun
  workdir, _ = smoke_run
  data = workdir / "data"  # the copies read the run's data (a workdir keeps its paths)
  command = ("--config=configs/a2d2.py:smoke", *DEEP_ENSEMBLE, "--stages=evaluate",
             f"--config.data.data_dir={data}/a2d2_synthetic",
             f"--config.data.split_dir={data}/a2d2_synthetic/splits",
             f"--config.data.tfds_dir={data}/tfds")
  reference, four, two = tmp_path / "one", tmp_path / "four", tmp_path / "two"
  for copy in (reference, four, two):
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("plots", "report.md", "data"))
    (copy / "results.json").unlink()

  for copy, env in ((reference, dict(os.environ)), (four, forced_devices.env(4))):
    run = CliRun((*command, f"--workdir={copy}"), forced_devices.default_codegen(env))
    assert run.wait() == 0, run.output[-3000:]
  port = forced_devices.free_port()
  runs = [CliRun((*command, f"--workdir={two}"),
                 {**forced_devices.default_codegen(forced_devices.env(2)),
                  "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
                  "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  for i, process in enumerate(runs):
    assert process.wait() == 0, f"process {i}:\n{process.output[-3000:]}"
  assert not (two / "run.lock").exists()
  one = _entries(json.loads((reference / "results.json").read_text()))
  for copy in (four, two):
    got = _entries(json.loads((copy / "results.json").read_text()))
    assert got.keys() == one.keys() and len(one) > 1000
    unequal = {key: (one[key], got[key]) for key in one if one[key] != got[key]}
    assert not unequal, (copy.name, len(unequal), list(unequal.items())[:5])
