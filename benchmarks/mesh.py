"""The device mesh's overhead: a training step and an evaluation batch at 1, 2 and 4 forced
CPU devices.

  python -m benchmarks.mesh --config configs/a2d2.py:synthetic --out mesh.json [--quick]

Each device count runs in its own CPU process (JAX_PLATFORMS=cpu, XLA_FLAGS=
--xla_force_host_platform_device_count=N), on the mesh (data, expert) = (N, 1): one step of
the K experts (stacked, the experts stage's step) and one evaluation batch of the first
gate's MoE with every uncertainty statistic (the evaluate stage's call). Times are medians
after a warm-up, with the compile time apart; each row's ratio is to the 1-device row of the
same run. Forced CPU devices share the machine's cores, so on CPU these rows show
correctness (the loss and the statistics are printed against 1 device) and the overhead of
the partitioned program, not a speed-up. Every row runs with one XLA CPU thread count
(NPROC), so that only the mesh differs. Writes mesh.json and mesh.md side by side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/a2d2.py:synthetic.", lock_config=True)
_OUT = flags.DEFINE_string("out", "mesh.json", "Where to write the JSON (and .md beside).")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer repetitions.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts, one row each.")
_CHILD = flags.DEFINE_integer("child", 0, "Internal: time N devices in this process.")
flags.mark_flags_as_required(["config"])


def _timed(call, repetitions: int) -> tuple[float, float]:
  """(first call's seconds, compilation included; median seconds of the next ones)."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repetitions):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def child(config, devices: int, repetitions: int) -> dict:
  """One row, in a process that sees `devices` devices."""
  import jax
  import numpy as np
  from flax import nnx
  from moe_jax import evaluate, input_pipeline, losses, methods, sharding, train
  from moe_jax.models import build

  assert jax.device_count() == devices, (jax.device_count(), devices)
  config.mesh.data, config.mesh.expert = -1, 1
  mesh = sharding.make_mesh(config)
  K = len(input_pipeline.expert_names(config.data))
  B, E = config.train.experts.batch_size, config.eval.batch_size
  h, w = config.data.image_size
  rng = np.random.default_rng(0)
  stacked = {"image": rng.integers(0, 255, (K, B, h, w, 3), np.uint8),
             "label": rng.integers(0, config.data.num_classes, (K, B, h, w), np.uint8)}
  images = {"image": rng.integers(0, 255, (E, h, w, 3), np.uint8),
            "label": rng.integers(0, config.data.num_classes, (E, h, w), np.uint8)}
  with jax.set_mesh(mesh):
    experts = build.experts(config, K)
    experts.train()
    sharding.place_model(experts, mesh)
    optimizer = nnx.Optimizer(experts, train.make_optimizer(config.train.experts.optimizer,
                                                            repetitions + 1), wrt=nnx.Param)
    models, optimizers = (experts,), (optimizer,)
    nnx.update((models, optimizers), sharding.place_state(nnx.state((models, optimizers)),
                                                          mesh))
    shardings = sharding.state_shardings(nnx.state((models, optimizers)))
    batch = sharding.put_batch(mesh, stacked, sharding.STACKED)
    losses_seen = []

    def step():
      each, _ = train.train_step((losses.expert_loss,), models, optimizers, batch, False,
                                 None, shardings)
      losses_seen.append(float(np.asarray(jax.device_get(each)).sum()))

    train_first, train_median = _timed(step, repetitions)
  # Freshly built experts: the trained ones differ between meshes by the steps' rounding.
  experts = build.experts(config, K)
  experts.eval()
  moe = build.mixture(config, experts, config.model.gates[0])
  moe.eval()
  sharding.place_model(moe, mesh)  # once, as the evaluate stage does
  outputs = methods.mixtures_with(config.eval.moe_members)
  key = build.key(0)

  def evaluation():
    return jax.block_until_ready(evaluate.batch_statistics(
        outputs, (moe,), images, key, config.data.num_classes, True, 0, 0, None, mesh,
        config.eval.micro_batch))

  eval_first, eval_median = _timed(evaluation, repetitions)
  stats, _ = evaluate.host_sums(evaluation())
  return {"devices": devices, "mesh": [mesh.shape["data"], mesh.shape["expert"]],
          "train_batch": K * B, "eval_batch": E,
          "train_step_s": train_median, "train_compile_s": train_first - train_median,
          "eval_batch_s": eval_median, "eval_compile_s": eval_first - eval_median,
          "train_images_per_s": K * B / train_median, "eval_images_per_s": E / eval_median,
          "first_loss": losses_seen[0],
          "eval_digest": {f"{m}/{n}": float(np.sum(v)) for m, s in stats.items()
                          for n, v in s.items()}}


def markdown(rows: list[dict]) -> str:
  one = rows[0]
  lines = ["| devices | mesh (data, expert) | train step | train img/s | vs 1 device | "
           "eval batch | eval img/s | vs 1 device | compile (train + eval) | "
           "first loss − 1 device's | eval statistics = 1 device's |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    same = sum(row["eval_digest"][k] == one["eval_digest"][k] for k in one["eval_digest"])
    lines.append(
        f"| {row['devices']} | {tuple(row['mesh'])} | {row['train_step_s'] * 1e3:.0f} ms | "
        f"{row['train_images_per_s']:.1f} | "
        f"{row['train_images_per_s'] / one['train_images_per_s']:.2f}× | "
        f"{row['eval_batch_s'] * 1e3:.0f} ms | {row['eval_images_per_s']:.1f} | "
        f"{row['eval_images_per_s'] / one['eval_images_per_s']:.2f}× | "
        f"{row['train_compile_s']:.0f} s + {row['eval_compile_s']:.0f} s | "
        f"{row['first_loss'] - one['first_loss']:+.1e} | "
        f"{same} of {len(one['eval_digest'])} sums |")
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  repetitions = 3 if _QUICK.value else 10
  if _CHILD.value:
    print(json.dumps(child(config, _CHILD.value, repetitions)))
    return
  rows = []
  counts = [int(devices) for devices in _DEVICES.value]
  # One XLA CPU thread count for every row, max($NPROC or the CPUs, devices): without it the
  # 1-device row would compile for fewer threads than the 4-device one, and round otherwise
  # (docs/scaling.md).
  cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")  # not on macOS
          else os.cpu_count() or 1)
  nproc = os.environ.get("NPROC", "")  # XLA ignores one that is not a number
  threads = max(int(nproc) if nproc.isdigit() else cpus, *counts)
  for devices in counts:
    forced = f"--xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "NPROC": str(threads),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {forced}".strip()}
    print(f"mesh benchmark: {devices} device(s) ...", flush=True)
    result = subprocess.run([sys.executable, "-m", "benchmarks.mesh", *sys.argv[1:],
                             f"--child={devices}"], env=env, capture_output=True, text=True)
    if result.returncode:
      sys.exit(f"error: the {devices}-device run failed:\n{result.stderr[-3000:]}")
    rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
  table = markdown(rows)
  print(table)
  out = Path(_OUT.value)
  out.write_text(json.dumps({"cpu_threads": threads, "rows": rows}, indent=1))
  out.with_suffix(".md").write_text(table)
  print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  app.run(main)
