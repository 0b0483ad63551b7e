"""Command line: python -m moe_jax.main --config configs/a2d2.py[:preset] --workdir DIR.

Runs the pipeline's stages in order (default: all of them):
  data          generate the synthetic scenes if the preset asks, write the TFDS shards once
                (always runs: every other stage needs it, and it is quick once done)
  baseline      one model on all data (the MC-dropout baseline)
  experts       K experts trained at once, expert k on its own domain (from scratch, or
                fine-tuned from the baseline with train.experts.init_from="baseline")
  deep_ensemble M models on all data (only when model.deep_ensemble_members > 0)
  gate          the gate on all data, experts frozen
  calibrate     temperatures on the val split (per expert, per method) -> calibration.json
  evaluate      every method on every test split -> <workdir>/results.json
  report        <workdir>/report.md: the tables and the paper's claims, measured
A finished stage is skipped on a rerun; an interrupted one resumes from its checkpoint.
"""

import contextlib
import functools
import json
import os
import platform
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import DataError
from moe_jax import checkpoint, config_checks, output_files, run_lock, stages

STAGES = ("data", *stages.STAGES, "calibrate", "evaluate", "report")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/a2d2.py:synthetic.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and results.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, from {', '.join(STAGES)}.")
flags.mark_flags_as_required(["config", "workdir"])


def run_data_stage(config) -> dict[str, int]:
  """Prepares the data and prints the number of frames per split."""
  from moe_jax import input_pipeline
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


# XLA compiles CPU code for the host's instruction set, and its wider vectors sum in another
# order: the same 1M-float sum differs between AVX and AVX2 code on one machine
# (docs/measured_facts.md), and a whole training run drifts by points of mIoU. The CLI
# targets AVX2 on x86 unless XLA_FLAGS names an ISA, so that machines with AVX-512 compute
# what AVX2 machines do. Read by XLA when its CPU client starts, after this runs.
CPU_ISA = "AVX2"


def pin_cpu_isa() -> None:
  """Appends --xla_cpu_max_isa=CPU_ISA to XLA_FLAGS on x86-64 (unless one is set)."""
  flags_now = os.environ.get("XLA_FLAGS", "")
  if platform.machine() in ("x86_64", "AMD64") and "xla_cpu_max_isa" not in flags_now:
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_cpu_max_isa={CPU_ISA}".strip()


def _exit_on_sigterm(signum, frame) -> None:
  """SIGTERM (a scheduler's preemption, `kill`) ends the run as Ctrl-C does: the `finally`
  blocks run (temp files removed, the workdir's lock released) before the process exits."""
  raise KeyboardInterrupt


def main(argv) -> None:
  pin_cpu_isa()
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = [s for s in _STAGES.value if s not in STAGES]
  if unknown:
    sys.exit(f"error: unknown stage(s) {', '.join(unknown)}; the stages: {', '.join(STAGES)}.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every shard at INFO.
  # The stages pull in TensorFlow (~4 s); imported here, after the flags parsed, so that a
  # bad command line fails at once.
  from moe_jax import calibrate, evaluate, input_pipeline, report, sharding, train
  sharding.initialize_distributed()  # one of several processes: join them (docs/scaling.md)
  config = _CONFIG.value
  runners = {**{name: functools.partial(train.run, name=name) for name in stages.STAGES},
             "calibrate": calibrate.run, "evaluate": evaluate.run,
             "report": lambda config, workdir: report.write(workdir)}
  start = time.perf_counter()
  try:
    config_checks.validate(config)  # every key a stage reads, before hours of training
    workdir = input_pipeline.workdir_path(_WORKDIR.value)
    # Several processes: process 0 holds the lock and writes the files, and every stage
    # ends with all processes together (its files exist before the next stage reads them).
    with run_lock.hold(workdir) if sharding.is_writer() else contextlib.nullcontext():
      with config.unlocked():
        input_pipeline.resolve_paths(config.data, workdir)
      resolved = json.loads(config.to_json_best_effort())
      checkpoint.check_same_run(workdir, resolved)
      checkpoint.save_config(workdir, resolved)
      if sharding.is_writer():
        run_data_stage(config)  # every stage reads the data; a no-op once it is prepared
      sharding.sync("data")
      if not sharding.is_writer():
        input_pipeline.prepare(config.data)  # reads what process 0 prepared
      for stage in STAGES[1:]:
        if stage in _STAGES.value:
          runners[stage](config, workdir)
          sharding.sync(stage)
  except (config_checks.ConfigError, DataError, checkpoint.CheckpointError,
          output_files.OutputError, run_lock.WorkdirBusy, FloatingPointError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    print(f"interrupted: nothing half-written was left; the same command resumes "
          f"({_WORKDIR.value})", file=sys.stderr)
    sys.exit(130)
  print(f"all requested stages done in {time.perf_counter() - start:.0f} s ({workdir})")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
