"""K = 8 end to end, and the number-of-experts sweep as a user runs it.

The K = 8 run: the synthetic cities through TFDS's Cityscapes builder, eight experts
fine-tuned from the baseline, both gate types, a Bayesian router, calibration, evaluation,
the gate-weights figure and the report. The sweep (`long`: it runs N = 2
and N = 8, about 5 minutes): killed (-9) while N = 8 trains its experts, then the same
command again.
"""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

REPO = Path(__file__).resolve().parents[1]
# The smoke preset without what does not depend on K and the smoke pipeline covers
# (tests/test_main.py): corruptions, the robust gate, routing stability and the panels
# (the K = 8 run: 66 -> 55 s).
SMALLER = ("--config.eval.corruptions=()", "--config.train.gate_objectives=('erm',)",
           "--config.eval.stability_images=0", "--config.eval.panel_images=0")
ARGS = ("--config", "configs/cityscapes.py:smoke", "--experts", "2,8", "--seeds", "0", *SMALLER)


def _sweep(workdir: Path, *args: str, kill_when=None) -> tuple[int, str]:
  """Runs the sweep in its own process group; SIGKILLs the group once `kill_when()` holds."""
  with open(workdir.parent / "sweep.log", "w+") as log:
    process = subprocess.Popen(
        [sys.executable, "-m", "moe_jax.experiments.num_experts", *ARGS, *args,
         "--workdir", str(workdir)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 900
    while kill_when is not None and process.poll() is None and not kill_when():
      assert time.monotonic() < deadline, "kill point not reached"
      time.sleep(0.01)
    if kill_when is not None and process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=900)
    log.seek(0)
    return process.returncode, log.read()


def check_eight_experts(run: Path) -> None:
  """The K = 8 run's results, report and figure (the sweep's N = 8 run, or one alone)."""
  results = json.loads((run / "results.json").read_text())
  assert results["experts"] == [f"group{k}" for k in range(8)]
  ood = results["ood"]["moe_simple"]
  assert {"gate_entropy", "predictive_entropy", "expert_variance"} <= set(ood)
  assert len(results["calibration"]["expert_temperatures"]) == 8
  assert {"moe_simple", "moe_classwise", "moe_simple_mfvr"} <= set(results["splits"]["test_id"])
  report = (run / "report.md").read_text()
  assert all(f"expert_group{k}" in report for k in range(8))
  assert (run / "plots" / "gate_weights.png").is_file()


@pytest.mark.slow
def test_eight_experts_end_to_end(tmp_path, run_main):
  code, out, err = run_main("--config=configs/cityscapes.py:smoke,experts=8", *SMALLER,
                            workdir=tmp_path / "run")
  assert code == 0, err[-3000:]
  check_eight_experts(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.long
def test_sweep_resumes_after_an_interrupted_n_and_runs_eight_experts_end_to_end(tmp_path):
  workdir = tmp_path / "sweep"
  experts8 = workdir / "experts8_seed0"
  steps = experts8 / "checkpoints" / "experts"
  first_step = lambda: steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())
  code, out = _sweep(workdir, kill_when=first_step)
  assert code == -signal.SIGKILL, out[-3000:]
  assert (workdir / "experts2_seed0" / "sweep_run.json").is_file()
  assert not (experts8 / "sweep_run.json").exists() and not (workdir / "sweep.json").exists()

  code, out = _sweep(workdir)
  assert code == 0, out[-3000:]
  assert "[sweep] 1/2: N=2 experts, seed 0: finished before; skipped" in out
  assert "experts: resuming from the checkpoint at step 1" in out
  # The baseline is trained once and shared: linked into every run, not retrained.
  assert "baseline: already finished" in out and "baseline: done" not in out
  assert (experts8 / "checkpoints" / "baseline").is_symlink()

  check_eight_experts(experts8)

  sweep = json.loads((workdir / "sweep.json").read_text())
  assert sweep["experts"] == [2, 8] and sweep["seeds"] == [0]
  assert sweep["in_split"] == "test_id" and sweep["ood_split"] == "test_ood"
  ece = sweep["aggregate"]["moe_simple/ece/max_softmax"]["mean"]
  assert ece == [json.loads((workdir / f"experts{n}_seed0" / "results.json").read_text())[
      "splits"]["test_id"]["moe_simple"]["calibration"]["max_softmax"]["ece"] for n in (2, 8)]
  assert "## The claim, as measured" in (workdir / "sweep.md").read_text()
  assert (workdir / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (("--experts", "2,x"), "'2,x' is not a comma-separated list of integers"),
    (("--experts", "2,2"), "give distinct integers"),
    (("--config.data.groups=3",), "set by the sweep; use --experts and --seeds"),
    (("--bogus",), "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.experiments.num_experts", "--config",
       "configs/cityscapes.py:smoke", "--workdir", str(tmp_path / "w"), *args],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and message in result.stderr
  assert not (tmp_path / "w").exists()


def test_missing_config_file_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "moe_jax.experiments.num_experts", "--config", "configs/nope.py:x",
       "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == ("error: --config configs/nope.py:x: no config file "
                                   "configs/nope.py")
  assert not (tmp_path / "w").exists()
