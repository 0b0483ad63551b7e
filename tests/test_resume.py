"""kill -9 at chosen moments of a run, then the same command again: the run resumes from its
last complete checkpoint and ends with the weights of a run that was never interrupted.

Subprocesses of the command line, as a preempted user runs it. One uninterrupted reference
run, then one workdir killed at four points in turn: while the data is prepared, while
the experts' last checkpoint is being written, and twice in the gate stage (after its
first checkpoint, and during its last write).
"""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The smoke preset with two checkpoints per stage: experts at steps 2 and 4, the gate at
# 4 and 8; one gate type keeps the test short.
ARGS = ("--config=configs/a2d2.py:smoke", "--config.train.experts.epochs=2",
        "--config.train.gate.epochs=2", "--config.model.gates=('simple',)",
        "--stages=experts,gate")
FINAL = {"experts": 4, "gate_simple": 8}


class _Run:
  """`python -m moe_jax.main` in its own process group, its output collected as it comes."""

  def __init__(self, workdir: pathlib.Path, env: dict):
    self.process = subprocess.Popen(
        [sys.executable, "-m", "moe_jax.main", f"--workdir={workdir}", *ARGS], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    self.lines: list[str] = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout))
    self._reader.start()

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def kill_when(self, condition, timeout: float = 300.0) -> None:
    """SIGKILLs the process group as soon as `condition()` holds (polled every ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
      assert self.process.poll() is None, f"ended before the kill point:\n{self.output[-3000:]}"
      assert time.monotonic() < deadline, f"kill point not reached:\n{self.output[-3000:]}"
      time.sleep(0.001)
    os.killpg(self.process.pid, signal.SIGKILL)
    self.wait()
    assert self.process.returncode == -signal.SIGKILL

  def wait(self) -> int:
    self.process.wait(timeout=600)
    self._reader.join()
    return self.process.returncode


def _writing(stage_dir: pathlib.Path, step: int):
  """True while Orbax writes `step` (its tmp directory exists, not yet renamed)."""
  return lambda: stage_dir.is_dir() and any(
      p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in stage_dir.iterdir())


def _final_state(workdir: pathlib.Path, stage: str):
  path = workdir / "checkpoints" / stage / str(FINAL[stage]) / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.map(_as_numpy, checkpointer.restore(path))


def _as_numpy(x) -> np.ndarray:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # the dropout RNG's state
    x = jax.random.key_data(x)
  return np.asarray(x)


@pytest.mark.slow
def test_kill_9_at_four_points_then_rerun_resumes_and_matches_an_uninterrupted_run(
    tmp_path):
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}
  reference = _Run(tmp_path / "reference", env)
  assert reference.wait() == 0, reference.output[-3000:]

  workdir = tmp_path / "preempted"
  checkpoints = workdir / "checkpoints"
  # 1. While the data is prepared (synthetic scenes, then TFDS shards).
  run = _Run(workdir, env)
  run.kill_when(lambda: (workdir / "data" / "tfds").is_dir())
  # 2. While the experts' final checkpoint is being written.
  run = _Run(workdir, env)
  run.kill_when(_writing(checkpoints / "experts", 4))
  assert (checkpoints / "experts" / "2").is_dir() and not (checkpoints / "experts" / "4").exists()
  # 3. In the gate stage, once its first checkpoint is complete.
  run = _Run(workdir, env)
  run.kill_when(lambda: (checkpoints / "gate_simple" / "4").is_dir())
  assert "experts: resuming from the checkpoint at step 2 of 4" in run.output
  assert "4.orbax-checkpoint-tmp" in run.output and "a checkpoint whose write never " \
      "finished (the run stopped while saving it); the steps before it are used" in run.output
  # 4. While the gate's final checkpoint is being written.
  run = _Run(workdir, env)
  run.kill_when(_writing(checkpoints / "gate_simple", 8))
  assert "experts: already finished" in run.output
  assert "gate_simple: resuming from the checkpoint at step 4 of 8" in run.output
  # The same command once more finishes the run.
  run = _Run(workdir, env)
  assert run.wait() == 0, run.output[-3000:]
  assert "gate_simple: resuming from the checkpoint at step 4 of 8" in run.output
  assert "8.orbax-checkpoint-tmp" in run.output
  assert not [p for p in checkpoints.rglob("*orbax-checkpoint-tmp*")]  # no partial step left

  for stage in FINAL:
    jax.tree.map(np.testing.assert_array_equal, _final_state(tmp_path / "reference", stage),
                 _final_state(workdir, stage))
