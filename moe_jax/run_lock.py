"""One run per workdir: `<workdir>/run.lock`, held for the whole command.

The lock is an advisory `flock` on the file, which also holds the holder's PID, host and
command line for the message a second run prints. The kernel drops a `flock` when its
process ends, however it ends (kill -9 included), so a lock left by a killed run is
stale by construction: the next run takes it over, and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_FILE = "run.lock"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


def _holder(path: Path) -> dict:
  """What the lock file says about its holder ({} when empty or unreadable)."""
  try:
    return json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "another run"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return (f"PID {holder.get('pid')} on {holder.get('host')}, started {started}: "
          f"{holder.get('command', '?')}")


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[Path]:
  """Holds `<workdir>/run.lock` for the duration of the `with` block.

  Raises:
    WorkdirBusy: a live process holds it (its PID, host and command are in the message).
  """
  path = Path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(
          f"workdir {path.parent} is in use by {_describe(_holder(path))} ({path}); wait for "
          "it to finish or stop it, or use another --workdir") from None
    # The file may have been unlinked by its last holder between our open and flock: the
    # lock then guards nothing. Retry on the file that is at the path now.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  stale = _holder(path)
  if stale:
    print(f"note: taking over {path} from a run that ended without releasing it "
          f"({_describe(stale)})", file=sys.stderr)
  record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)}
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(record).encode(), 0)
  try:
    yield path
  finally:
    # Unlink while still holding the lock, then release: a run that opened the old file
    # meanwhile sees it is no longer at the path and retries.
    path.unlink(missing_ok=True)
    os.close(fd)
