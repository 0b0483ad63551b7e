"""The seed paper's third claim, measured: MoE calibration against the number of experts.

  python -m moe_jax.experiments.num_experts --config configs/cityscapes.py:synthetic \
      --experts 2,3,4,6,8 --seeds 0,1 --workdir runs/experts_sweep

For each seed s and each N, one run of `python -m moe_jax.main` in
`<workdir>/experts<N>_seed<s>/` with --config.data.groups=N and --config.seed=s (N experts,
each on a group of cities; the gates; the ensemble of the same N experts). Every run reads
the data prepared once in `<workdir>/data/`, and every run of seed s shares one baseline
(the single model and MC dropout), trained once in `<workdir>/baseline_seed<s>/` and linked
into each run's checkpoints: it does not depend on N. Then `sweep.json`, `sweep.png` and
`sweep.md` in `<workdir>` (`moe_jax.experiments.sweep_report`).

A finished run is marked by `<run>/sweep_run.json` and skipped by a rerun; an interrupted
one resumes from its checkpoints (moe_jax.main resumes every stage). Further
`--config.<key>=<value>` flags go to every run unchanged. `--quick` runs seed 0 only (every N
still runs: the claim is about N).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moe_jax import output_files
from moe_jax.experiments import sweep_report

RUN_MARKER = "sweep_run.json"
COMPILATION_CACHE = "jax_cache"
BASELINE = "baseline"


def run_dir(workdir: Path, num_experts: int, seed: int) -> Path:
  return workdir / f"experts{num_experts}_seed{seed}"


def baseline_dir(workdir: Path, seed: int) -> Path:
  return workdir / f"baseline_seed{seed}"


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                     "e.g. 2,3,4") from None
  if not values or len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(f"{text!r}: give distinct integers, e.g. 2,3,4")
  return values


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(arguments, the --config.<key>=<value> overrides passed on to every run)."""
  parser = argparse.ArgumentParser(
      prog="python -m moe_jax.experiments.num_experts",
      description="Train and evaluate an MoE for each number of experts; sweep.md says "
                  "whether more experts gave better-calibrated uncertainty.")
  parser.add_argument("--config", required=True,
                      help="config file and argument, e.g. configs/cityscapes.py:synthetic")
  parser.add_argument("--experts", type=_int_list, default=[2, 3, 4, 6, 8],
                      help="numbers of experts (default 2,3,4,6,8)")
  parser.add_argument("--seeds", type=_int_list, default=[0, 1],
                      help="seeds per number of experts (default 0,1)")
  parser.add_argument("--quick", action="store_true",
                      help="seed 0 only (every N still runs)")
  parser.add_argument("--workdir", required=True, help="directory of the sweep")
  args, rest = parser.parse_known_args(argv)
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (only --config.<key>=<value> "
                 "overrides are passed on to the runs)")
  if any(a.startswith(("--config.data.groups", "--config.seed")) for a in rest):
    parser.error("--config.data.groups and --config.seed are set by the sweep; use --experts "
                 "and --seeds")
  if args.quick:
    args.seeds = args.seeds[:1]
  return args, rest


def _shared_paths(config_arg: str, workdir: Path) -> list[str]:
  """--config.data.<key>=<path> for each data path of the config under "{workdir}", resolved
  against the sweep's directory: every run reads the data prepared once (the real data's
  paths are left alone)."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  if spec is None or not Path(path).is_file():
    sys.exit(f"error: --config {config_arg}: no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data = module.get_config(arg).data
  return [f"--config.data.{key}={data[key].replace('{workdir}', str(workdir))}"
          for key in ("data_dir", "split_dir", "tfds_dir")
          if "{workdir}" in str(data.get(key, ""))]


def _main_command(args: argparse.Namespace, workdir: Path, seed: int, overrides: list[str],
                  num_experts: int | None = None, stages: str | None = None) -> list[str]:
  command = [sys.executable, "-m", "moe_jax.main", "--config", args.config,
             "--workdir", str(workdir), f"--config.seed={seed}", *overrides]
  if num_experts is not None:
    command.append(f"--config.data.groups={num_experts}")
  if stages:
    command.append(f"--stages={stages}")
  return command


def _run(command: list[str], what: str, cache: Path) -> None:
  """Runs one pipeline, its output passing through; exits with its status if it fails.

  The runs share JAX's persistent compilation cache in `cache`: every seed after the first
  reuses the programs the first compiled (measured: seed 1's N = 8 run took 4.8 min, seed
  0's 8.2).
  """
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
  result = subprocess.run(command, check=False, env=env)
  if result.returncode:
    sys.exit(f"error: {what} failed (exit {result.returncode}); fix what it printed above "
             "and rerun the same command: finished runs are skipped, this one resumes.")


def _link_baseline(workdir: Path, seed: int, target: Path) -> None:
  """Links the seed's shared baseline checkpoints into run `target` (relative link)."""
  link = target / "checkpoints" / BASELINE
  shared = baseline_dir(workdir, seed) / "checkpoints" / BASELINE
  link.parent.mkdir(parents=True, exist_ok=True)
  if link.is_symlink() or not link.exists():
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(shared, link.parent), target_is_directory=True)


def _finished(target: Path, num_experts: int, seed: int) -> bool:
  marker = target / RUN_MARKER
  if not marker.is_file():
    return False
  return json.loads(marker.read_text()).get("run") == {"experts": num_experts, "seed": seed}


def main(argv: list[str]) -> None:
  args, overrides = parse_args(argv)
  workdir = Path(args.workdir).expanduser().resolve()
  overrides = _shared_paths(args.config, workdir) + overrides  # the user's come last and win
  workdir.mkdir(parents=True, exist_ok=True)
  runs = [(seed, n) for seed in args.seeds for n in args.experts]
  start = time.perf_counter()
  for seed in args.seeds:
    shared = baseline_dir(workdir, seed)
    if not (shared / RUN_MARKER).is_file():
      print(f"[sweep] seed {seed}: the shared baseline (single model, MC dropout) -> {shared}",
            flush=True)
      _run(_main_command(args, shared, seed, overrides, stages=BASELINE),
           f"the baseline of seed {seed}", workdir / COMPILATION_CACHE)
      output_files.write_json(shared / RUN_MARKER, {"run": {"seed": seed}})
  for index, (seed, num_experts) in enumerate(runs, 1):
    target = run_dir(workdir, num_experts, seed)
    label = f"[sweep] {index}/{len(runs)}: N={num_experts} experts, seed {seed}"
    if _finished(target, num_experts, seed):
      print(f"{label}: finished before; skipped ({target})", flush=True)
      continue
    elapsed = time.perf_counter() - start
    print(f"{label} -> {target} ({elapsed / 60:.1f} min so far)", flush=True)
    _link_baseline(workdir, seed, target)
    run_start = time.perf_counter()
    _run(_main_command(args, target, seed, overrides, num_experts=num_experts),
         f"the run with N={num_experts}, seed {seed}", workdir / COMPILATION_CACHE)
    output_files.write_json(target / RUN_MARKER, {
        "run": {"experts": num_experts, "seed": seed},
        "seconds": round(time.perf_counter() - run_start, 1)})
  sweep = sweep_report.collect({(n, seed): run_dir(workdir, n, seed) for seed, n in runs})
  paths = sweep_report.write(workdir, sweep)
  print(f"[sweep] done in {(time.perf_counter() - start) / 60:.1f} min: "
        + ", ".join(str(p) for p in paths), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
