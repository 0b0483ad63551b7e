"""Stage "calibrate": post-hoc temperatures fitted on the val split -> calibration.json.

After the gate stage, on config.data.val_split (Wong et al., arXiv 2606.20544; MoCaE of
Oksuz et al.):
  - one temperature per expert (MoCaE): T_k minimises expert k's NLL of softmax(z_k/T_k)
    on its own domain's val pixels (calibrate.expert_region "domain": the hard-routing
    theorem's expert calibrated on its region) or on all (the paper's code, "all"); the
    "<moe>_mocae" methods then fuse the tempered experts z_k/T_k;
  - one aggregate temperature per method with a "_ts" variant: softmax(log p / T) on the
    method's predictive distribution p (each MoE, its MoCaE variant, the baseline, each
    MC dropout and the deep ensemble; the same treatment for every method).
Every T starts at 1, is fitted by L-BFGS on log T (`moe_jax.temperature`) and clamped to
calibrate.bounds. The NLL is that of labelled pixels on a fixed grid: every s-th row and
column of every val image, s the smallest stride that keeps the grid within
calibrate.max_pixels pixels, so memory does not grow with the split or the image size.
The fit is deterministic (no sampling; the MoE's routing key is the evaluation's).

The file records the temperatures with the val NLL before and after, and the checkpoints
they were fitted on: evaluation uses them only while those checkpoints are unchanged, and
a rerun of this stage refits when they changed.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import (input_pipeline, methods, output_files, sharding, stages,
                     temperature)
from moe_jax.models import build

CALIBRATION_FILE = "calibration.json"
# The suffix of an aggregate-temperature variant: "<method>_ts" (`tempered_sources`).
TS_SUFFIX = "_ts"
DISAGREEMENT = "disagreement"
# The hard subset's disagreement threshold: this quantile of the first MoE's routing-
# weighted disagreement over the labelled val grid pixels (its top decile).
HARD_QUANTILE = 0.9


def grid_stride(num_images: int, image_size: tuple[int, int], max_pixels: int) -> int:
  """The smallest s >= 1 with num_images * ceil(H/s) * ceil(W/s) <= max_pixels."""
  h, w = image_size
  stride = 1
  while num_images * math.ceil(h / stride) * math.ceil(w / stride) > max_pixels:
    stride += 1
  return stride


@functools.partial(jax.jit, static_argnums=(0, 1, 6, 7, 8, 10),
                   compiler_options=sharding.SAME_ON_EVERY_MESH)
def _grid_values(outputs, graphdef, state, chunk, ids, key, methods_: tuple[str, ...],
                 stride: int, disagreement_of: tuple[tuple[str, ...], str] | None, extras,
                 mesh: jax.sharding.Mesh) -> tuple[dict[str, jax.Array], jax.Array]:
  """One `sharding.chunk_steps` step, on each device's micro-batch's pixel grid:
  ({method: log p [devices, N, C]} of each of `methods_` (and DISAGREEMENT [devices, N],
  `methods.disagreement` of (expert methods, MoE method)), the labels [devices, N]);
  `outputs` is `evaluate.combined_outputs`', the models nnx.merge(graphdef, state). Each
  micro-batch runs alone on its device (`sharding.map_chunk`), as evaluation runs: the
  same values for every mesh."""
  tiny = jnp.finfo(jnp.float32).tiny
  grid = lambda x: x[:, ::stride, ::stride].reshape(-1, *x.shape[3:])

  def chunk_values(state, chunk, key):
    out = outputs(nnx.merge(graphdef, state), chunk["image"].astype(jnp.float32) / 255.0,
                  key, extras)
    values = {m: grid(jnp.log(jnp.maximum(out[m]["probs"], tiny))) for m in methods_}
    if disagreement_of is not None:
      values[DISAGREEMENT] = grid(methods.disagreement(out, *disagreement_of))
    return values, grid(chunk["label"].astype(jnp.int32))

  return sharding.map_chunk(chunk_values, mesh, state, chunk, ids, key)


def grid_values(outputs, models, batch: dict[str, np.ndarray], key, methods_: tuple[str, ...],
                stride: int, disagreement_of: tuple[tuple[str, ...], str] | None, extras,
                mesh: jax.sharding.Mesh, micro_batch: int
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`_grid_values` of this process's rows of a batch (on the host), over `mesh` in
  micro-batches -> ({method: log p [N, C]}, labels [N]) of the whole batch, in image order."""
  graphdef, state = nnx.split(models)
  values, labels = sharding.chunk_order([
      _grid_values(outputs, graphdef, state, chunk, ids, key, methods_, stride,
                   disagreement_of, extras, mesh)
      for chunk, ids in sharding.chunk_steps(
          mesh, micro_batch, {"image": batch["image"], "label": batch["label"]})])
  flat = lambda x: x.reshape(-1, *x.shape[2:])
  return jax.tree.map(flat, values), flat(labels)


def _gather(config, outputs, models, extras, methods_: tuple[str, ...], stride: int,
            disagreement_of: tuple[tuple[str, ...], str] | None = None
            ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """`_grid_values` over the whole val split (part by part, as evaluation reads a union
  split), concatenated on the host: (values, labels [N], the part of each pixel [N], an
  index into `input_pipeline.split_parts` of the val split). Runs on the mesh the models
  were placed on (`evaluate.restored_runs`)."""
  parts, labels, part_of = {}, [], []
  base = build.key(config.seed)
  mesh = sharding.mesh_of(models) or sharding.one_device_mesh()
  for p, part in enumerate(input_pipeline.split_parts(config.data, config.data.val_split)):
    for i, batch in enumerate(input_pipeline.eval_batches(
        config.data, part, batch_size=config.eval.batch_size,
        process=sharding.process_rows())):
      values, lab = grid_values(outputs, models, batch, jax.random.fold_in(base, i),
                                methods_, stride, disagreement_of, extras, mesh,
                                config.eval.micro_batch)
      for k, v in values.items():
        parts.setdefault(k, []).append(v)
      labels.append(lab)
      part_of.append(np.full(lab.shape, p, np.int32))
  return ({k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels),
          np.concatenate(part_of))


def expert_pixels(config, part_of: np.ndarray) -> list[np.ndarray]:
  """Per expert, the val grid pixels its temperature is fitted on (bool [N]): with
  calibrate.expert_region "domain", those of its own val split when that is a part of the
  val split (A2D2: highway_val of all_val; the theorem's expert calibrated on its region),
  else all; "all": every val pixel (the paper's code, whose experts share one input)."""
  parts = input_pipeline.split_parts(config.data, config.data.val_split)
  masks = []
  for name in input_pipeline.expert_names(config.data):
    own = input_pipeline.expert_split(config.data, name, "val")
    masks.append(part_of == parts.index(own)
                 if config.calibrate.expert_region == "domain" and own in parts
                 else np.ones(part_of.shape, bool))
  return masks


@functools.partial(jax.jit, static_argnames=("bounds", "iterations"))
def _fit(log_probs: jax.Array, labels: jax.Array, *, bounds: tuple[float, float],
         iterations: int) -> jax.Array:
  """[T, val NLL at T = 1, val NLL at T] of one method's grid log-probabilities (compiled
  once per shape: every method's grid has the same)."""
  t = temperature.fit_temperature(log_probs, labels, bounds=bounds, iterations=iterations)
  return jnp.stack([t, temperature.nll(jnp.float32(0.0), log_probs, labels),
                    temperature.nll(jnp.log(t), log_probs, labels)])


def _expert_keys(config, rename: dict[str, str]) -> list[str]:
  """The output keys of the experts (in expert order) among a run's."""
  by_name = {name: key for key, name in rename.items()}
  return [by_name[name] for name in stages.expert_methods(config) if name in by_name]


def tempered_sources(config, runs: list[tuple]) -> list[str]:
  """The methods that get an aggregate temperature: the source of each "<method>_ts"."""
  from moe_jax import evaluate
  return [name.removesuffix(TS_SUFFIX) for name, kind in evaluate.variants(config, runs).items()
          if name.endswith(TS_SUFFIX)]


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Fits the temperatures (see the module docstring) -> `<workdir>/calibration.json`.

  Skipped when the file exists and was fitted on the current checkpoints.

  Returns:
    {"val_split", "stride", "pixels", "checkpoints": {name: step}, "settings" (the
     config's calibrate section),
     "expert_temperatures": {expert method: T}, "aggregate": {method: T},
     "val_nll": {method: {"before", "after"}}, "hard_subset": {"moe", "quantile",
     "disagreement_threshold"}} (method names as in results.json).
  """
  from moe_jax import evaluate  # reads data through TensorFlow
  runs, metas = evaluate.restored_runs(config, workdir)
  steps = {name: meta["step"] for name, meta in metas.items()}
  settings = json.loads(config.calibrate.to_json())
  path = Path(workdir) / CALIBRATION_FILE
  if path.exists():
    done = json.loads(path.read_text())
    if done.get("checkpoints") == steps and done.get("settings") == settings:
      print(f"calibrate: already fitted ({path}); skipped. Delete it to fit again.")
      return done
  start = time.perf_counter()
  section = config.calibrate
  stride = grid_stride(input_pipeline.num_examples(config.data, config.data.val_split),
                       tuple(config.data.image_size), section.max_pixels)
  result = {"val_split": config.data.val_split, "stride": stride, "checkpoints": steps,
            "settings": settings, "expert_temperatures": {}, "aggregate": {}, "val_nll": {}}
  experts = stages.expert_methods(config)
  sources = tempered_sources(config, runs)
  mocae = [m for m in sources if m.endswith("_mocae")]
  specs = stages.gate_specs(config)
  # Every method in one compiled call (evaluate's), first with unit expert temperatures,
  # then with the fitted ones for the MoCaE variants: the same program, other data.
  unit = {"expert_temperatures": {e: 1.0 for e in experts}, "aggregate": {}}
  outputs, extras = evaluate.combined_outputs(config, runs, unit)
  models = tuple(run_models for _, run_models, _, _ in runs)
  have_moes = bool(specs) and stages.STAGES["gate"].checkpoints(config) in [r[0] for r in runs]
  first = [m for m in sources if m not in mocae]
  # Both passes gather the same methods, so that they run one compiled program.
  gathered = (tuple(first + mocae + (experts if have_moes else [])), stride,
              (tuple(experts), specs[0].method) if have_moes else None)
  log_probs, labels, part_of = _gather(config, outputs, models, extras, *gathered)
  labelled = labels != input_pipeline.IGNORE_LABEL
  result["pixels"] = int(np.sum(labelled))
  bounds, iterations = tuple(section.bounds), section.iterations

  def fit_all(values, names):
    for name in names:
      t, before, after = map(float, _fit(values[name], labels, bounds=bounds,
                                         iterations=iterations))
      result["aggregate"][name] = t
      result["val_nll"][name] = {"before": before, "after": after}

  fit_all(log_probs, first)
  if have_moes:
    result["hard_subset"] = {
        "moe": specs[0].method, "quantile": HARD_QUANTILE,
        "disagreement_threshold": float(np.quantile(log_probs[DISAGREEMENT][labelled],
                                                    HARD_QUANTILE))
        if labelled.any() else float("inf")}
    # MoCaE: each expert's temperature on its own log-softmax (= its logits up to a
    # per-pixel constant, which softmax(./T) ignores) over its pixels (`expert_pixels`;
    # the others ignored, as labels 255), then the tempered MoEs' aggregate T.
    for expert, own in zip(experts, expert_pixels(config, part_of)):
      t, before, after = map(float, _fit(log_probs[expert],
                                         np.where(own, labels, input_pipeline.IGNORE_LABEL),
                                         bounds=bounds, iterations=iterations))
      result["expert_temperatures"][expert] = t
      result["val_nll"][expert] = {"before": before, "after": after}
    if mocae:
      _, extras = evaluate.combined_outputs(
          config, runs, {"expert_temperatures": result["expert_temperatures"], "aggregate": {}})
      tempered, _, _ = _gather(config, outputs, models, extras, *gathered)
      fit_all(tempered, mocae)
  output_files.write_json(path, result)
  print(f"calibrate: {len(result['aggregate'])} aggregate and "
        f"{len(result['expert_temperatures'])} expert temperatures on "
        f"{config.data.val_split} ({result.get('pixels', 0)} pixels, grid stride {stride}) in "
        f"{time.perf_counter() - start:.0f} s -> {path}")
  width = max((len(m) for m in result["val_nll"]), default=0) + 2
  for method, t in result["aggregate"].items():
    nll = result["val_nll"][method]
    print(f"  {method:<{width}} T {t:6.3f}   val NLL {nll['before']:.4f} -> {nll['after']:.4f}")
  for name, t in result["expert_temperatures"].items():
    nll = result["val_nll"][name]
    print(f"  {name:<{width}} T {t:6.3f}   val NLL {nll['before']:.4f} -> {nll['after']:.4f} "
          f"(MoCaE, {config.calibrate.expert_region} pixels)")
  return result


def load(workdir: str | Path, metas: dict[str, dict]) -> dict | None:
  """calibration.json if the calibrate stage fitted it on these checkpoints (metas:
  {name: meta}), else None (printing why the calibrated variants are left out)."""
  path = Path(workdir) / CALIBRATION_FILE
  if not path.exists():
    print(f"evaluate: no {path.name} (the calibrate stage has not run): the temperature-"
          "scaled and MoCaE methods are left out.")
    return None
  fitted = json.loads(path.read_text())
  if fitted.get("checkpoints") != {name: meta["step"] for name, meta in metas.items()}:
    print(f"evaluate: {path} was fitted on other checkpoints: the temperature-scaled and "
          "MoCaE methods are left out. Run --stages=calibrate to fit them again.")
    return None
  return fitted


def for_run(config: ml_collections.ConfigDict, fitted: dict | None, rename: dict[str, str]
            ) -> methods.Calibration | None:
  """The `methods.Calibration` of one evaluation run (its {output key: method name}) from
  calibration.json's content; None without one."""
  if fitted is None:
    return None
  temperatures = fitted["expert_temperatures"]  # {expert method: T}, in expert order
  experts = _expert_keys(config, rename)
  return methods.Calibration(
      jnp.asarray([temperatures[rename[key]] for key in experts]
                  or list(temperatures.values()) or [1.0], jnp.float32),
      {key: jnp.float32(fitted["aggregate"][name]) for key, name in rename.items()
       if name in fitted["aggregate"]})
