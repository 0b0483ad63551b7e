"""kill -9 at chosen moments of a run, then the same command again: the run resumes from
its last complete checkpoint and ends with the weights of a run never interrupted.

Subprocesses of the command line, as a preempted user runs it, under XLA's default code
generation: with the tests' faster elemental emitters (tests/conftest.py) the resumed
gate's weights differ from the uninterrupted run's by rounding (one value by 2.3e-10 on
2026-11-30). Apart from tests/test_main.py so that pytest-xdist runs the two long files
on different workers.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from cli_process import CliRun
import forced_devices

XLA_DEFAULTS = forced_devices.default_codegen(dict(os.environ))
# The smoke preset trains the experts 4 steps and the gate 8, checkpointing every 2 and 4.
ARGS = ("--config=configs/a2d2.py:smoke", "--config.model.gates=('simple',)",
        "--stages=experts,gate")


def _writing(stage_dir: Path, step: int):
  """True while Orbax writes `step`: its tmp directory exists, not yet renamed."""
  return lambda: stage_dir.is_dir() and any(
      p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in stage_dir.iterdir())


def _final_state(workdir: Path, stage: str, step: int) -> list[np.ndarray]:
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(workdir / "checkpoints" / stage / str(step) / "state")
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(state)]


@pytest.mark.slow
@pytest.mark.long
def test_kill_9_at_four_points_then_the_same_command_resumes_and_matches(tmp_path):
  """Killed while it prepares the data, while the experts' last checkpoint (step 4) is
  written, once the gate's first checkpoint (step 4 of 8) is complete, and while the
  gate's last one is written: each rerun resumes from the last complete checkpoint, and
  the final weights equal an uninterrupted run's bit for bit."""
  reference, workdir = tmp_path / "reference", tmp_path / "preempted"
  run = CliRun((f"--workdir={reference}", *ARGS), XLA_DEFAULTS)
  assert run.wait() == 0, run.output[-3000:]
  args = (f"--workdir={workdir}", *ARGS)
  checkpoints = workdir / "checkpoints"
  CliRun(args, XLA_DEFAULTS).kill_when(lambda: (workdir / "data" / "tfds").is_dir())
  CliRun(args, XLA_DEFAULTS).kill_when(_writing(checkpoints / "experts", 4))
  assert (checkpoints / "experts" / "2").is_dir() and not (checkpoints / "experts" / "4").exists()
  run = CliRun(args, XLA_DEFAULTS)
  run.kill_when(lambda: (checkpoints / "gate_simple" / "4").is_dir())
  assert "experts: resuming from the checkpoint at step 2 of 4" in run.output
  assert "4.orbax-checkpoint-tmp" in run.output and "a checkpoint whose write never " \
      "finished (the run stopped while saving it); the steps before it are used" in run.output
  run = CliRun(args, XLA_DEFAULTS)
  run.kill_when(_writing(checkpoints / "gate_simple", 8))
  assert "experts: already finished" in run.output
  assert "gate_simple: resuming from the checkpoint at step 4 of 8" in run.output
  run = CliRun(args, XLA_DEFAULTS)
  assert run.wait() == 0, run.output[-3000:]
  assert "gate_simple: resuming from the checkpoint at step 4 of 8" in run.output
  assert "8.orbax-checkpoint-tmp" in run.output
  assert not list(checkpoints.rglob("*orbax-checkpoint-tmp*"))
  for stage, step in (("experts", 4), ("gate_simple", 8)):
    for ours, theirs in zip(_final_state(workdir, stage, step),
                            _final_state(reference, stage, step), strict=True):
      np.testing.assert_array_equal(ours, theirs, err_msg=stage)
