"""Uncertainty throughput: the MoE against MC dropout and ensembles, and how close to peak.

  python -m benchmarks.throughput --config configs/a2d2.py:synthetic --out bench.json

Every row uses the config's backbone (model section), image size (data.image_size) and
batch (eval.batch_size), with random weights (throughput does not depend on training).
Each row's program is compiled once (compile time reported apart), warmed up, then timed
over repetitions with block_until_ready; images/s is the median, with the range. FLOPs per
image come from XLA's cost analysis of the compiled program(s); the peak is the best rate
of a large matmul in the same dtype on the same device in the same run, and
fraction_of_peak = achieved FLOP/s / peak. The goals' ratios come from a second timing of
just the rows they compare (and the matmul), interleaved call by call, so that the machine's
drifts cancel in each ratio. `--quick` shortens the repetitions, never the rows. Writes
bench.json and bench.md (the printed table) side by side.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from absl import app, flags
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from benchmarks import input_pipeline as pipeline_benchmark
from moe_jax import input_pipeline, losses, measures, methods, train, uncertainty
from moe_jax.models import bayesian_routers, build

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/a2d2.py:synthetic.", lock_config=True)
_OUT = flags.DEFINE_string("out", "bench.json", "Where to write the JSON (and .md beside).")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer repetitions (every row still runs).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype of weights and images (bfloat16 for GPU/TPU).")
_EXPERTS = flags.DEFINE_list("experts", ["2", "4", "8"], "Numbers of experts K.")
_PASSES = flags.DEFINE_list("passes", ["2", "10", "20"], "MC-dropout passes T.")
_ROUTERS = flags.DEFINE_list("routers", list(bayesian_routers.BAYESIAN_ROUTERS)[1:],
                             "Bayesian routers timed around the K=2 simple-gate MoE.")
_SAMPLES = flags.DEFINE_list("samples", ["1", "4", "16"],
                             "Routing samples S of the router rows (der: its M routers).")
_CACHE = flags.DEFINE_string("cache", str(Path(tempfile.gettempdir()) / "moe_jax_bench"),
                             "Generated frames and shards for the input-pipeline row.")
flags.mark_flags_as_required(["config"])

MAPS = ("prediction", *measures.MEASURES)


@dataclasses.dataclass
class Program:
  """A compiled row: `call()` runs it once (async); FLOPs are per call."""
  call: Callable[[], Any]
  compile_seconds: float
  flops: float


def compile_program(fn: Callable, *args) -> tuple[Callable, float, float]:
  """jit-compiles fn for args: (compiled, seconds to lower and compile, XLA's FLOPs)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device program
    analysis = analysis[0] if analysis else {}
  return compiled, seconds, float((analysis or {}).get("flops", float("nan")))


def module_program(module: nnx.Module, fn: Callable, *args) -> Program:
  """`fn(module, *args)` as one compiled program over the module's state."""
  graphdef, state = nnx.split(module)
  compiled, seconds, flops = compile_program(
      lambda state, *a: fn(nnx.merge(graphdef, state), *a), state, *args)
  return Program(lambda: compiled(state, *args), seconds, flops)


def maps(output: methods.Output) -> dict[str, jax.Array]:
  """The prediction and the uncertainty maps of an output (what a user keeps)."""
  return {name: output[name] for name in MAPS if name in output}


def cast(tree, dtype):
  """Floating leaves of `tree` to dtype (weights, BatchNorm statistics, images)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                      else a, tree)


def in_dtype(module: nnx.Module, dtype) -> nnx.Module:
  module.eval()
  if dtype != jnp.float32:
    nnx.update(module, cast(nnx.state(module), dtype))
  return module


# --------------------------------------------------------------------------- the rows

def single_program(config, images, dtype) -> Program:
  """One DeepLabv3+ forward to its prediction."""
  model = in_dtype(build.baseline(config), dtype)
  return module_program(model, lambda m, x: jnp.argmax(m(x)[0], -1), images)


def moe_program(config, images, dtype, *, experts: int, uncertainty_maps: bool,
                stacked: bool, router: str = "deterministic", samples: int = 1) -> Program:
  """The simple-gate MoE: prediction, and with uncertainty_maps every measure's map.

  stacked: one program over the stacked experts (config.model.expert_execution); else a
  Python loop calling one separately compiled expert program K times, then a compiled
  gate + fusion (+ maps) program. router, samples: the Bayesian router around the gate
  and its S routing samples (der: M = samples routers), as evaluation runs it.
  """
  config = config.copy_and_resolve_references()
  config.eval.routing_samples = samples
  config.model.routing.ensemble = samples
  moe = in_dtype(build.mixture(config, build.experts(config, experts), "simple", router),
                 dtype)
  key = build.key(0)

  def finish(out):
    if uncertainty_maps:
      return maps(methods.mixture_outputs(out, experts=False)["moe"])
    return jnp.argmax(out["logits"], -1)

  if stacked:
    return module_program(moe, lambda m, x, k: finish(m(x, k)), images, key)
  graphdef, state = nnx.split(moe.experts.members)
  members = [jax.tree.map(lambda a, k=k: a[k], state) for k in range(experts)]
  expert, expert_seconds, expert_flops = compile_program(
      lambda s, x: nnx.merge(graphdef, s)(x), members[0], images)
  outs = [expert(s, images) for s in members]
  moe_graphdef, moe_state = nnx.split(moe)
  head, head_seconds, head_flops = compile_program(
      lambda s, logits, aspp, k: finish(nnx.merge(moe_graphdef, s).combine(
          jnp.stack(logits), jnp.stack(aspp), key=k)),
      moe_state, [o[0] for o in outs], [o[1] for o in outs], key)

  def call():
    outs = [expert(s, images) for s in members]
    return head(moe_state, [o[0] for o in outs], [o[1] for o in outs], key)
  return Program(call, expert_seconds + head_seconds, experts * expert_flops + head_flops)


def ensemble_program(config, images, dtype, *, experts: int) -> Program:
  """K stacked members, uniform: prediction, PE, MI, EV."""
  members = in_dtype(build.experts(config, experts), dtype)
  return module_program(
      members, lambda m, x: maps(methods.members_output(
          uncertainty.probabilities(m(x)[0]))), images)


def mc_dropout_program(config, images, dtype, *, passes: int, shared_encoder: bool) -> Program:
  """T stochastic passes of the baseline as evaluation runs them (methods.mc_dropout: the
  passes scanned; one backbone pass + T heads, or T full passes): prediction, PE, MI, EV.

  XLA's cost analysis counts a scan's body once, so the FLOPs are those of the same
  passes unscanned (methods.mc_dropout_logits under vmap, the same arithmetic).
  """
  model = in_dtype(build.baseline(config), dtype)
  key = build.key(0)
  program = module_program(
      model, lambda m, x, k: maps(methods.mc_dropout(
          m, x, k, passes=passes, shared_encoder=shared_encoder)[f"mc_dropout_{passes}"]),
      images, key)
  unscanned = module_program(
      model, lambda m, x, k: maps(methods.members_output(uncertainty.probabilities(
          methods.mc_dropout_logits(m, x, k, passes, shared_encoder=shared_encoder)))),
      images, key)
  return dataclasses.replace(program, flops=unscanned.flops)


def row_cases(experts: list[int], passes: list[int], routers: list[str] = (),
              samples: list[int] = ()) -> list[tuple[dict, Callable]]:
  """(row keys, program builder(config, images, dtype)) for every row, in table order."""
  cases = [({"method": "single"}, single_program)]
  for k in experts:
    for stacked in (True, False):
      for maps_on in (False, True):
        cases.append(({"method": "moe", "experts": k, "uncertainty": maps_on,
                       "stacked": stacked},
                      lambda c, x, d, k=k, s=stacked, u=maps_on: moe_program(
                          c, x, d, experts=k, uncertainty_maps=u, stacked=s)))
  for router in routers:
    for count in samples:
      cases.append(({"method": "moe", "experts": 2, "uncertainty": True, "stacked": True,
                     "router": router, "samples": count},
                    lambda c, x, d, r=router, n=count: moe_program(
                        c, x, d, experts=2, uncertainty_maps=True, stacked=True, router=r,
                        samples=n)))
  for k in experts:
    cases.append(({"method": "ensemble", "experts": k, "uncertainty": True},
                  lambda c, x, d, k=k: ensemble_program(c, x, d, experts=k)))
  for t in passes:
    for shared in (True, False):
      cases.append(({"method": "mc_dropout", "passes": t, "shared_encoder": shared,
                     "uncertainty": True},
                    lambda c, x, d, t=t, s=shared: mc_dropout_program(
                        c, x, d, passes=t, shared_encoder=s)))
  return cases


# --------------------------------------------------------------------------- measuring

def time_calls(calls: dict[str, Callable[[], Any]], *, warmup: int,
               repetitions: int) -> dict[str, list[float]]:
  """Seconds of each timed call (waited for with block_until_ready), per name. The calls
  take turns in every round, so a drift in the machine's speed hits all of them alike."""
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  seconds = {name: [] for name in calls}
  for _ in range(repetitions):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      seconds[name].append(time.perf_counter() - start)
  return seconds


def peak_program(dtype) -> tuple[Program, int]:
  """An n×n matmul (n = 2048 on CPU, 8192 on accelerators): the peak's yardstick."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype)
          for i in (1, 2))
  matmul, seconds, _ = compile_program(jnp.matmul, a, b)
  return Program(lambda: matmul(a, b), seconds, 2.0 * n**3), n


def measure_row(keys: dict, program: Program, batch: int, peak: float, *, warmup: int,
                repetitions: int) -> dict:
  seconds = time_calls({"row": program.call}, warmup=warmup, repetitions=repetitions)["row"]
  rates = [batch / s for s in seconds]
  median = statistics.median(rates)
  gflops_per_image = program.flops / batch / 1e9
  return {**keys, "images_per_sec": median, "images_per_sec_min": min(rates),
          "images_per_sec_max": max(rates), "ms_per_batch": 1e3 * statistics.median(seconds),
          "gflops_per_image": gflops_per_image, "achieved_gflops": gflops_per_image * median,
          "fraction_of_peak": gflops_per_image * median / peak,
          "compile_seconds": program.compile_seconds}


def training_rate(config, *, repetitions: int) -> dict:
  """Images/s one expert-stage training step consumes (K experts, each its own batch), in
  float32 as the training stages run."""
  section = config.train.experts
  num = len(input_pipeline.expert_names(config.data))  # the dataset registry's, any dataset
  members = build.experts(config, num)
  optimizer = nnx.Optimizer(members, train.make_optimizer(section.optimizer, 1000,
                                                          key="train.experts.optimizer"),
                            wrt=nnx.Param)
  shape = (num, section.batch_size, *config.data.image_size)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (*shape, 3), np.uint8)),
           "label": jnp.asarray(rng.integers(0, config.data.num_classes, shape, np.uint8))}
  seconds = time_calls(
      {"step": lambda: train.train_step((losses.expert_loss,), (members,), (optimizer,),
                                        batch)[0]},
      warmup=2, repetitions=repetitions)["step"]
  return {"images_per_sec": num * section.batch_size / statistics.median(seconds),
          "experts": num, "batch_size": section.batch_size}


def pipeline_rate(config, *, batches: int) -> dict:
  """Images/s of the A2D2 training input pipeline at the config's image size, on generated
  frames of the synthetic preset's size (or A2D2's native 1208×1920)."""
  synthetic = config.data.get("synthetic")
  frame_size = tuple(synthetic.image_size) if synthetic else (1208, 1920)
  case = dict(frame_size=frame_size, image_size=tuple(config.data.image_size),
              num_train=64 if synthetic else 24)
  batch_size = config.train.experts.batch_size
  return {**pipeline_benchmark.measure(case, Path(_CACHE.value), batch_size, batches),
          "frame_size": list(frame_size), "batch_size": batch_size}


# --------------------------------------------------------------------------- the report

@dataclasses.dataclass(frozen=True)
class Goal:
  """One of the issue's targets: value(ms, flops) from the interleaved milliseconds per
  batch and the FLOPs per call of its rows (both named as in `rows`, which gives each
  row's keys), compared with target (at least, or at most)."""
  name: str
  target: float
  at_least: bool
  rows: dict[str, dict]
  value: Callable[[dict[str, float], dict[str, float]], float]


def goal_specs(experts: list[int], passes: list[int], routers: list[str] = (),
               samples: list[int] = ()) -> list[Goal]:
  """The throughput issue's five goals, those whose rows are among the measured K and T,
  and per Bayesian router at its largest S: its added time over the deterministic MoE's
  forward plus maps (< 5%)."""
  moe = lambda k, maps, stacked=True: dict(method="moe", experts=k, uncertainty=maps,
                                          stacked=stacked)
  specs = [
      Goal("mc_dropout_shared_vs_naive_T10", 3.0, True,
           {"shared": dict(method="mc_dropout", passes=10, shared_encoder=True),
            "naive": dict(method="mc_dropout", passes=10, shared_encoder=False)},
           lambda ms, flops: ms["naive"] / ms["shared"]),
      Goal("stacked_vs_loop_K2", 1.3, True,
           {"stacked": moe(2, False), "loop": moe(2, False, stacked=False)},
           lambda ms, flops: ms["loop"] / ms["stacked"]),
      Goal(f"cost_growth_K{min(experts)}_to_K{max(experts)}_over_linear", 1.0, False,
           {"small": moe(min(experts), False), "large": moe(max(experts), False)},
           lambda ms, flops: ms["large"] / ms["small"] / (max(experts) / min(experts))),
      Goal("uncertainty_maps_overhead_K2", 0.10, False,
           {"maps": moe(2, True), "bare": moe(2, False)},
           lambda ms, flops: ms["maps"] / ms["bare"] - 1.0),
      Goal("moe_K2_uncertainty_fraction_of_peak", 0.5, True,
           {"maps": moe(2, True), "peak": dict(method="peak")},
           lambda ms, flops: (flops["maps"] / ms["maps"]) / (flops["peak"] / ms["peak"])),
  ]
  if samples:
    specs += [Goal(f"router_{router}_S{max(samples)}_overhead_K2", 0.05, False,
                   {"router": dict(moe(2, True), router=router, samples=max(samples)),
                    "deterministic": moe(2, True)},
                   lambda ms, flops: ms["router"] / ms["deterministic"] - 1.0)
              for router in routers]
  have = lambda keys: keys.get("method") == "peak" or (
      keys.get("experts", 2) in experts and keys.get("passes", 10) in passes)
  # One K measures no growth.
  return [g for g in specs if all(have(keys) for keys in g.rows.values())
          and (len(experts) > 1 or not g.name.startswith("cost_growth"))]


def row_key(keys: dict) -> tuple:
  return tuple(sorted(keys.items()))


def goals(specs: list[Goal], programs: dict[tuple, Program], peak: Program, *, warmup: int,
          repetitions: int) -> dict:
  """Each goal's ratio from one interleaved timing of all the goals' programs
  (programs: {row_key(goal row keys): Program})."""
  needed = {row_key(keys): peak if keys["method"] == "peak" else programs[row_key(keys)]
            for g in specs for keys in g.rows.values()}
  ms = {k: 1e3 * statistics.median(seconds) for k, seconds in time_calls(
      {k: p.call for k, p in needed.items()}, warmup=warmup, repetitions=repetitions).items()}
  found = {}
  for g in specs:
    row_ms = {name: ms[row_key(keys)] for name, keys in g.rows.items()}
    value = g.value(row_ms, {name: needed[row_key(keys)].flops for name, keys in g.rows.items()})
    found[g.name] = {"value": value, "target": g.target, "at_least": g.at_least,
                     "met": bool(value >= g.target if g.at_least else value <= g.target),
                     "ms_per_batch": row_ms}
  return found


COLUMNS = ("method", "experts", "passes", "uncertainty", "stacked", "shared_encoder", "router",
           "samples")


def markdown(bench: dict) -> str:
  """The rows and the goals as markdown tables."""
  def cell(value):
    if isinstance(value, bool):
      return "yes" if value else "no"
    return "" if value is None else str(value)

  lines = [f"Device: {bench['device']} ({bench['backend']}), {bench['dtype']}, batch "
           f"{bench['batch_size']} at {bench['image_size'][0]}×{bench['image_size'][1]}, "
           f"{bench['backbone']}; peak {bench['peak_gflops']:.1f} GFLOP/s "
           f"({bench['matmul_size']}² matmul).", "",
           "| " + " | ".join(COLUMNS) + " | images/s (median) | min–max | ms/batch | "
           "GFLOP/image | % of peak | compile s |", "|" + "---|" * (len(COLUMNS) + 6)]
  for r in bench["rows"]:
    lines.append("| " + " | ".join(cell(r.get(c)) for c in COLUMNS) +
                 f" | {r['images_per_sec']:.1f} | {r['images_per_sec_min']:.1f}–"
                 f"{r['images_per_sec_max']:.1f} | {r['ms_per_batch']:.0f} | "
                 f"{r['gflops_per_image']:.2f} | {100 * r['fraction_of_peak']:.1f} | "
                 f"{r['compile_seconds']:.1f} |")
  lines += ["", "Goals: ratios of the median times of their rows, timed again interleaved.", "",
            "| goal | measured | target | met |", "|---|---|---|---|"]
  for name, g in bench["goals"].items():
    lines.append(f"| {name} | {g['value']:.2f} | {'≥' if g['at_least'] else '≤'} "
                 f"{g['target']} | {cell(g['met'])} |")
  pipe, step = bench["input_pipeline"], bench["training_step"]
  lines += ["", f"Input pipeline: {pipe['images_per_sec']:.1f} images/s (batch "
            f"{pipe['batch_size']}, frames {pipe['frame_size'][0]}×{pipe['frame_size'][1]}); "
            f"the expert training step consumes {step['images_per_sec']:.1f} images/s "
            f"({step['experts']} experts × batch {step['batch_size']})."]
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, *, quick: bool, dtype_name: str,
        experts: list[int], passes: list[int], routers: list[str] = (),
        samples: list[int] = ()) -> dict:
  """Every row, the peak, the goals and the input-pipeline rates as one dict."""
  dtype = jnp.dtype(dtype_name)
  warmup, repetitions = (1, 3) if quick else (2, 10)
  batch = config.eval.batch_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((batch, *config.data.image_size, 3)), dtype)
  device = jax.devices()[0]
  bench = {"device": getattr(device, "device_kind", str(device)), "backend": jax.default_backend(),
           "host": platform.processor() or platform.machine(), "dtype": dtype_name,
           "batch_size": batch, "image_size": list(config.data.image_size),
           "backbone": f"{config.model.backbone} x{config.model.width}",
           "expert_execution": config.model.expert_execution, "quick": quick,
           "repetitions": repetitions}
  peak, bench["matmul_size"] = peak_program(dtype)
  peak_seconds = time_calls({"peak": peak.call}, warmup=2, repetitions=repetitions)["peak"]
  bench["peak_gflops"] = peak.flops / min(peak_seconds) / 1e9
  specs = goal_specs(experts, passes, routers, samples)
  wanted = [keys for g in specs for keys in g.rows.values() if keys["method"] != "peak"]
  rows, programs = [], {}
  cases = row_cases(experts, passes, routers, samples)
  for i, (keys, make) in enumerate(cases, 1):
    program = make(config, images, dtype)
    row = measure_row(keys, program, batch, bench["peak_gflops"], warmup=warmup,
                      repetitions=repetitions)
    rows.append(row)
    for goal_keys in wanted:  # timed again, interleaved, for the goals
      if all(keys.get(k) == v for k, v in goal_keys.items()) and \
          keys.get("router") == goal_keys.get("router"):
        programs[row_key(goal_keys)] = program
    print(f"[{i}/{len(cases)}] " + ", ".join(f"{k}={v}" for k, v in keys.items()) +
          f": {row['images_per_sec']:.1f} images/s, {100 * row['fraction_of_peak']:.1f}% "
          f"of peak, compile {row['compile_seconds']:.1f} s", flush=True)
  bench["rows"] = rows
  bench["goals"] = goals(specs, programs, peak, warmup=warmup, repetitions=repetitions + 2)
  bench["training_step"] = training_rate(config, repetitions=repetitions)
  bench["input_pipeline"] = pipeline_rate(config, batches=5 if quick else 20)
  return bench


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  bench = run(_CONFIG.value, quick=_QUICK.value, dtype_name=_DTYPE.value,
              experts=[int(k) for k in _EXPERTS.value], passes=[int(t) for t in _PASSES.value],
              routers=_ROUTERS.value, samples=[int(s) for s in _SAMPLES.value])
  out = Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(bench, indent=1))
  table = markdown(bench)
  out.with_suffix(".md").write_text(table)
  print(table)
  print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  app.run(main)
