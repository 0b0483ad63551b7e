"""One run per workdir: a second run refuses naming the first; a lock left by a killed run
is taken over; the lock is released however the run ends."""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest

from moe_jax import run_lock

REPO = Path(__file__).resolve().parents[1]


def _holder(workdir: Path) -> subprocess.Popen:
  """Another process that holds `workdir`'s lock until it is killed."""
  process = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom moe_jax import run_lock\n"
       f"with run_lock.hold({str(workdir)!r}):\n  print('held', flush=True)\n"
       "  time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline() == "held\n"
  return process


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_is_released(tmp_path):
  process = _holder(tmp_path)
  try:
    with pytest.raises(run_lock.WorkdirBusy) as error:
      with run_lock.hold(tmp_path):
        pass
    message = str(error.value)
    assert message.startswith(f"workdir {tmp_path} is in use by PID {process.pid} on "), message
    assert "wait for it to finish or stop it, or use another --workdir" in message
  finally:
    process.terminate()
    process.wait()


def test_released_on_exit_and_on_an_exception(tmp_path):
  with run_lock.hold(tmp_path) as path:
    record = json.loads(path.read_text())
    assert record["pid"] == os.getpid()
  assert not path.exists()
  with pytest.raises(ZeroDivisionError):
    with run_lock.hold(tmp_path):
      1 / 0
  with run_lock.hold(tmp_path):  # free again
    pass


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
  process = _holder(tmp_path)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert (tmp_path / run_lock.LOCK_FILE).exists()  # left behind, its flock gone with it
  with run_lock.hold(tmp_path) as path:
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert f"note: taking over {path} from a run that ended without releasing it (PID " \
      f"{process.pid} on " in capsys.readouterr().err


def test_the_cli_refuses_a_workdir_in_use_before_any_work(tmp_path, run_main):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "results.json").write_text("{}")  # something the second run must not touch
  process = _holder(workdir)
  try:
    start = time.monotonic()
    code, out, err = run_main("--config=configs/a2d2.py:smoke", workdir=workdir)
  finally:
    process.terminate()
    process.wait()
  assert code == 1 and out == "", out
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(f"error: workdir {workdir} is in use by PID {process.pid} on "
                             f"{os.uname().nodename}, started "), err
  assert lines[0].endswith(f" -c ({workdir / run_lock.LOCK_FILE}); wait for it to finish or "
                           "stop it, or use another --workdir"), err
  assert sorted(p.name for p in workdir.iterdir()) == ["results.json", "run.lock"]
  assert (workdir / "results.json").read_text() == "{}"
  assert time.monotonic() - start < 120
