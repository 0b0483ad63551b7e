"""The run's output files, written so that a reader sees the old file or the new one.

Every file a run produces outside Orbax (config.json, calibration.json, results.json,
histograms.npz, panels.npz, the figures, report.md, the sweep's files) goes through
`write_atomic`: a crash, kill -9 or full disk mid-write leaves the previous complete file
in place and no partial one under the real name. Reading them back, `read_json` and
`open_arrays` turn a damaged file into one `OutputError` line naming it and the stage that
rewrites it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pathlib
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np


class OutputError(RuntimeError):
  """An output file could not be written, or one read back is damaged."""


def write_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` so that readers see the old file or the new one, never a mix.

  The bytes go to a temp file in the same directory, are fsynced, then `os.replace`d.
  Temp files of `path` that an earlier, killed write left behind are removed then (one run
  per workdir holds its lock, so no other writer of `path` is under way).

  With several processes (moe_jax.sharding), only process 0 writes; the others compute
  the same bytes and return.

  Raises:
    OutputError: the write failed (disk full, file-size limit, permissions); the temp file
      is removed and the previous `path`, if any, is untouched.
  """
  target = pathlib.Path(path).expanduser()
  if jax.process_index() != 0:
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
  except OSError as e:
    raise _write_error(target, e) from e
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # the rename must not land before the data does
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are for everyone to read
    os.replace(tmp, target)
  except BaseException as e:
    pathlib.Path(tmp).unlink(missing_ok=True)
    if isinstance(e, OSError):
      raise _write_error(target, e) from e
    raise
  for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
    stale.unlink(missing_ok=True)
  return target


def _write_error(target: pathlib.Path, e: OSError) -> OutputError:
  kept = (f"the previous {target.name} is intact" if target.exists()
          else "nothing half-written was left")
  return OutputError(
      f"could not write {target} ({e.strerror or e}); {kept}. Free space on its disk (or "
      "fix its permissions) and rerun the same command: finished stages are skipped")


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> pathlib.Path:
  """Writes a JSON object to `path` atomically (see `write_atomic`)."""
  return write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def figure_png(fig, dpi: int) -> bytes:
  """A matplotlib figure as PNG bytes (written with `write_atomic`, never half a PNG).

  The same bytes as `fig.savefig(buffer, format="png", dpi=dpi)`, drawn once: savefig lays
  a figure with a layout engine out in a dry run of the whole draw (every axis' ticks and
  labels), then draws it; here the engine lays it out alone before the one draw (the smoke
  run's 21 figures: 10.5-10.9 s instead of 12.8-14.8 s, docs/measured_facts.md).
  It leaves `fig` on an Agg canvas with its layout done and no engine: call it on a figure
  that is finished (the callers close it next).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  canvas = FigureCanvasAgg(fig)
  fig.set_dpi(dpi)
  engine = fig.get_layout_engine()
  if engine is not None:
    engine.execute(fig)
    fig.set_layout_engine("none")
  buffer = io.BytesIO()
  canvas.print_png(buffer)
  return buffer.getvalue()


def write_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> pathlib.Path:
  """Named arrays in one .npz (np.load reads it), atomically (plain arrays: read with
  allow_pickle=False).

  Deflated as np.savez_compressed does, at zlib level 1 instead of its default: the
  detection histograms are mostly zeros, and the demo's 1.4 GB of arrays took 6.4 s
  (65 MB) where the default level took 20.4 s (54 MB).
  """
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED,
                       compresslevel=1) as archive:
    for name, value in arrays.items():
      with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
        np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)
  return write_atomic(path, buffer.getvalue())


def _damaged(path: pathlib.Path, e: Exception, rewritten_by: str) -> OutputError:
  return OutputError(
      f"{path} is damaged ({type(e).__name__}: {e}); rerun the '{rewritten_by}' stage to "
      f"rewrite it (--stages={rewritten_by},report with the same --workdir)")


def read_json(path: str | os.PathLike, rewritten_by: str) -> Any:
  """The JSON in `path`; a truncated or garbled file is an OutputError naming it and
  `rewritten_by`, the stage that writes it."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_bytes())
  except (ValueError, UnicodeDecodeError) as e:
    raise _damaged(path, e, rewritten_by) from e


class _CheckedArrays(Mapping):
  """An open .npz as a mapping whose lookups read (and check) one array each."""

  def __init__(self, data: Mapping, path: pathlib.Path, rewritten_by: str):
    self._data, self._path, self._rewritten_by = data, path, rewritten_by

  def __getitem__(self, key: str) -> np.ndarray:
    try:
      return self._data[key]  # a missing name stays a KeyError (not in _NPZ_ERRORS)
    except _NPZ_ERRORS as e:
      raise _damaged(self._path, e, self._rewritten_by) from e

  def __iter__(self) -> Iterator[str]:
    return iter(self._data)

  def __len__(self) -> int:
    return len(self._data)


# What np.load and its lookups raise on a truncated or garbled .npz.
_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@contextlib.contextmanager
def open_arrays(path: str | os.PathLike, rewritten_by: str) -> Iterator[Mapping[str, np.ndarray]]:
  """The .npz `path` as a mapping that reads an array when it is looked up, never
  unpickling ({} when the file does not exist). A truncated or garbled file is an
  OutputError naming it and `rewritten_by`, the stage that writes it, when it is opened or
  when a damaged array is read.
  """
  path = pathlib.Path(path)
  if not path.exists():
    yield {}
    return
  try:
    data = np.load(path, allow_pickle=False)
  except _NPZ_ERRORS as e:
    raise _damaged(path, e, rewritten_by) from e
  with data:
    yield _CheckedArrays(data, path, rewritten_by)


def read_arrays(path: str | os.PathLike, rewritten_by: str) -> dict[str, np.ndarray]:
  """Every array of the .npz `path` (see `open_arrays`)."""
  with open_arrays(path, rewritten_by) as arrays:
    return dict(arrays)
