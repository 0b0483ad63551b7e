"""Command line: python -m moe_jax.main --config configs/a2d2.py[:preset] --workdir DIR.

Runs the pipeline's stages in order. Implemented so far: "data" (generate the synthetic
scenes when the preset asks for them, write the TFDS shards once, count the frames).
Training, evaluation and the report arrive with the next issues.
"""

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import DataError
from moe_jax import checkpoint, input_pipeline

STAGES = ("data",)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/a2d2.py:synthetic.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and results.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, from {', '.join(STAGES)}.")
flags.mark_flags_as_required(["config", "workdir"])


def run_data_stage(config) -> dict[str, int]:
  """Prepares the data and prints the number of frames per split."""
  start = time.perf_counter()
  counts = input_pipeline.prepare(config.data)
  print(f"data: {config.data.name} ready in {time.perf_counter() - start:.1f} s "
        f"({config.data.data_dir})")
  for split, count in counts.items():
    print(f"  {split:<16} {count:>6} frames")
  return counts


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad --config override ends the run with one line instead of a trace."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing key
    key = str(e).strip("\"'")
    sys.exit(f"error: unknown config key {key!r} on the command line; the keys are in the "
             "config file (configs/*.py).")
  except (flags.Error, TypeError, ValueError) as e:
    # A failing config file arrives as a traceback in the message: its last line says why.
    message = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    sys.exit(f"error: bad command line: {message}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = [s for s in _STAGES.value if s not in STAGES]
  if unknown:
    sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; implemented: {', '.join(STAGES)}.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every shard at INFO.
  config = _CONFIG.value
  try:
    workdir = input_pipeline.workdir_path(_WORKDIR.value)
    with config.unlocked():
      input_pipeline.resolve_paths(config.data, workdir)
    checkpoint.save_config(workdir, config.to_json_best_effort(indent=2))
    if "data" in _STAGES.value:
      run_data_stage(config)
  except DataError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
