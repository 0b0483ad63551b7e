"""`python -m moe_jax.main` as a separate process a test can signal at a chosen moment."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time


class CliRun:
  """`python -m moe_jax.main` in its own process group, its output collected as it comes
  (stdout and stderr together; tqdm's carriage returns end lines)."""

  def __init__(self, args: tuple[str, ...], env: dict | None = None):
    self.process = subprocess.Popen(
        [sys.executable, "-m", "moe_jax.main", *args], cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    self.lines: list[str] = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout))
    self._reader.start()

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def signal_when(self, condition, signum: int = signal.SIGKILL,
                  timeout: float = 300.0) -> int:
    """Sends `signum` to the process group as soon as `condition()` holds (polled every
    ms); returns the exit status."""
    deadline = time.monotonic() + timeout
    while not condition():
      assert self.process.poll() is None, f"ended before the kill point:\n{self.output[-3000:]}"
      assert time.monotonic() < deadline, f"kill point not reached:\n{self.output[-3000:]}"
      time.sleep(0.001)
    os.killpg(self.process.pid, signum)
    return self.wait()

  def kill_when(self, condition, timeout: float = 300.0) -> None:
    """SIGKILLs the process group as soon as `condition()` holds."""
    assert self.signal_when(condition, signal.SIGKILL, timeout) == -signal.SIGKILL

  def wait(self) -> int:
    self.process.wait(timeout=600)
    self._reader.join()
    return self.process.returncode
