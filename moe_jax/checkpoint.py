"""Per-stage Orbax checkpoints and the run's resolved config.

Layout under a run's workdir::

    <workdir>/config.json                    resolved config (JSON, written atomically)
    <workdir>/checkpoints/<stage>/<step>/    one Orbax step: items "state" and "meta"
        state/   the training-state pytree (StandardSave: arrays, scalars, nnx.State, optax)
        meta/    small JSON: {"step": int, "val_miou": float | null, "finished": bool}
        metrics/ Orbax's own copy of {"val_miou": ...}, used to rank checkpoints

A training stage saves through `StageCheckpoints.save` every `save_every` steps and once
more with `finished=True` at its end; a rerun asks `is_finished()` (skip the stage) or
`latest_step()` + `restore()` (resume). Inference restores with `restore_best()`.

Atomicity is Orbax's: a step is written into `<step>.orbax-checkpoint-tmp-<ts>/` and
renamed to `<step>/` only once complete (synchronous saves: `save` returns after the
rename), so a killed run leaves a tmp directory, never a half-written step. Orbax ignores
tmp directories; the next `StageCheckpoints` on the stage deletes them, and a save that
fails (disk full) deletes its own. A step directory that is nevertheless unreadable
(copied in half, hand-made, disk trouble) is renamed to `<step>.invalid[-n]/`, which
Orbax's step matching ignores: on open when its metadata cannot be read, on restore when
its arrays cannot. Resuming (`restore(None)`) then falls back to the step before it, with
a warning. (Orbax would take such a directory for a complete step: its rename protocol
never makes one, so it only checks the name.)
"""

import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moe_jax import output_files
from moe_jax.config_checks import ADDED_CONFIG_KEYS, MUTABLE_CONFIG_KEYS

PyTree = Any

CONFIG_FILE = "config.json"
METRIC = "val_miou"
# Orbax names an in-progress step `<step><TMP_DIR_SUFFIX>-<timestamp>`.
_TMP_STEP_DIR = re.compile(r"^\d+" + re.escape(ocp.path.atomicity_types.TMP_DIR_SUFFIX))
_STATE = "state"
_META = "meta"


class CheckpointError(ValueError):
  """A checkpoint or config that cannot be used; the message names the path and the fix."""


class _Unreadable(Exception):
  """A step on disk whose files cannot be read (its __cause__ says why)."""


def stage_dir(workdir: str | os.PathLike, stage: str) -> pathlib.Path:
  """Returns `<workdir>/checkpoints/<stage>` as an absolute path (not created)."""
  return pathlib.Path(workdir).expanduser().resolve() / "checkpoints" / stage


def _metric_for_ranking(metrics: Mapping[str, Any] | None) -> float:
  # Every save records a metrics dict (so Orbax never warns about a missing metric);
  # steps without a usable val_miou rank below every real one instead of breaking the sort.
  value = None if metrics is None else metrics.get(METRIC)
  if value is None or not math.isfinite(value):
    return -math.inf
  return float(value)


class StageCheckpoints:
  """Checkpoints of one training stage in `<workdir>/checkpoints/<stage>/`.

  Each step holds the training state (any pytree of jax/numpy arrays and Python scalars:
  an `nnx.State`, or `{"params": ..., "opt_state": ..., "step": ...}`) and a JSON meta
  dict `{"step", "val_miou", "finished"}`.

  Kept on disk: the `keep` most recent steps plus the one with the highest val_miou, so at
  most `keep + 1` steps. One Orbax manager does both: its preservation policy is
  "LatestN(keep) or BestN(1 by val_miou)", and a step is deleted only when neither keeps it.

  Saving is synchronous: `save` returns once the step is renamed into place, so "the
  latest step on disk" is always complete and a rerun resumes from it. (Async saving
  would overlap the write with training but needs `wait_until_finished` on every exit
  path; the stages save rarely enough that the simpler contract wins.)

  Not safe for two processes writing the same stage at once (Orbax's own restriction).
  """

  def __init__(self, workdir: str | os.PathLike, stage: str, *, save_every: int,
               keep: int = 2):
    """Opens (creating if needed) the stage's checkpoint directory.

    Args:
      workdir: the run's directory; checkpoints go to `<workdir>/checkpoints/<stage>/`.
      stage: stage name, e.g. "experts", "baseline", "gate".
      save_every: `save(step, ...)` writes only when `step % save_every == 0`, unless
        forced or finished.
      keep: number of most recent steps kept (the best by val_miou is kept on top).
    """
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.stage = stage
    self.directory = stage_dir(workdir, stage)
    self.save_every = int(save_every)
    self.keep = int(keep)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # No InitialSavePolicy (the default adds one): a checkpoint of the first step is
        # worthless, and saves happen exactly at multiples of save_every (or when forced).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(self.save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=self.keep),
            policies.BestN(get_metric_fn=_metric_for_ranking, reverse=False, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        # best_fn is still needed: without it Orbax neither writes the metrics item nor
        # answers best_step(). Deletion is decided by preservation_policy alone.
        best_fn=_metric_for_ranking,
        best_mode="max",
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=False,
        # Orbax's own cleanup runs in a background thread that can outlive an unclosed
        # manager and fail at interpreter exit; _remove_stale_tmp_dirs does it inline.
        cleanup_tmp_directories=False,
        create=True,
    )
    # A registry (not bare item names) so that a fresh manager on an existing directory
    # can read item metadata before anything has been saved or restored through it.
    registry = ocp.handlers.create_default_handler_registry(
        **{_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
    # Restoring some top-level keys only (the model without its optimiser state) needs
    # the PyTree handler's partial restore; the standard handler reads whole trees.
    registry.add(_STATE, ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    self._remove_stale_tmp_dirs()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    self._set_aside_unreadable_steps()

  # ---------------------------------------------------------------- lifecycle

  def close(self) -> None:
    """Waits for Orbax's background work (tmp-dir cleanup) and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "StageCheckpoints":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    """Steps present on disk, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The most recent complete step, or None when the stage has no checkpoint."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest val_miou; the latest step when none recorded one."""
    return self._manager.best_step()

  def read_meta(self, step: int | None = None) -> dict:
    """The meta dict of `step` (default: latest): {"step", "val_miou", "finished"}."""
    step = self._resolve_step(step)
    return self._read_meta(step)

  def is_finished(self) -> bool:
    """True when the latest checkpoint was saved with finished=True (rerun skips the stage)."""
    step = self.latest_step()
    return step is not None and bool(self._read_meta(step).get("finished", False))

  # ---------------------------------------------------------------- save

  def save(self, step: int, state: PyTree, *, val_miou: float | None = None,
           finished: bool = False, force: bool = False) -> bool:
    """Saves `state` as `step` if it is due; returns whether a checkpoint was written.

    Due means `step % save_every == 0` and `step` is past the latest saved step;
    `force=True` or `finished=True` saves regardless (the final state must always land).

    Args:
      step: training step (>= 0); steps only move forward.
      state: pytree of jax/numpy arrays and Python scalars (nnx.State, dicts, optax states).
      val_miou: validation mIoU at this step, in [0, 1]; ranks the "best" checkpoint.
      finished: marks the stage complete; a rerun then skips it.
      force: save even when `step` is not a multiple of `save_every`.

    Raises:
      CheckpointError: a forced/finished save of a step that is already on disk, or the
        write failed (e.g. disk full); the partial step is removed first, so the steps on
        disk stay complete.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    force = force or finished
    if force and step in self._manager.all_steps():
      raise CheckpointError(
          f"step {step} is already saved in {self.directory}; save each step once and pass "
          "finished=True with the last step's save.")
    val = None if val_miou is None else float(val_miou)
    meta = {"step": step, METRIC: val, "finished": bool(finished)}
    try:
      return bool(self._manager.save(
          step,
          args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                     _META: ocp.args.JsonSave(meta)}),
          metrics={METRIC: val},
          force=force,
      ))
    except Exception as e:  # a full disk, a quota, permissions: TensorStore says which
      self._remove_stale_tmp_dirs()  # the half-written step, never renamed into place
      latest = self._manager.latest_step()
      kept = (f"the last complete checkpoint (step {latest}) is intact"
              if latest is not None else "no earlier checkpoint exists")
      raise CheckpointError(
          f"could not write the checkpoint of step {step} to {self.directory} "
          f"({type(e).__name__}: {_first_line(e)}); nothing half-written was left and "
          f"{kept}. Fix the cause (disk full? permissions?) and rerun the same command to "
          "resume") from e

  # ---------------------------------------------------------------- restore

  def restore(self, step: int | None, abstract_state: PyTree, *,
              partial: bool = False) -> tuple[PyTree, dict]:
    """Restores `step` (None: the latest) into the structure of `abstract_state`.

    Args:
      step: step to restore, or None for the latest.
      abstract_state: the target pytree; leaves are `jax.ShapeDtypeStruct` (e.g. from
        `nnx.eval_shape` + `nnx.split`) or concrete arrays (only shape/dtype are used) or
        Python scalars. Arrays come back with the target's dtype.
      partial: `abstract_state` is a dict naming some of the saved state's top-level keys
        (e.g. {"model": ...} of a {"model", "optimizer"} state); only those come back.

    Returns:
      (state, meta): `state` has `abstract_state`'s structure with every array a jax.Array
      placed as `restore_target` says (whatever devices wrote it); `meta` is the step's
      meta dict.

    Raises:
      CheckpointError: no checkpoint, no such step, or a structure/shape mismatch.
    """
    requested = step
    step = self._resolve_step(step)
    try:
      return self._restore_step(step, abstract_state, partial)
    except _Unreadable as e:  # a truncated or damaged file; Orbax/TensorStore raise anything
      why = f"{type(e.__cause__).__name__}: {_first_line(e.__cause__)}"
      moved = self._set_aside(step, why)
      if requested is None and self._manager.all_steps():
        return self.restore(None, abstract_state, partial=partial)
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} could not be read ({why}); moved it to "
          f"{moved.name}. Rerun the '{self.stage}' stage (the same command) to redo it from "
          "the checkpoint before, or use a fresh --workdir") from e.__cause__

  def _restore_step(self, step: int, abstract_state: PyTree, partial: bool
                    ) -> tuple[PyTree, dict]:
    path = self.directory / str(step)
    try:
      stored = self._state_metadata(step)
    except Exception as e:
      raise _Unreadable from e
    if partial:
      missing = sorted(set(abstract_state) - set(stored))
      if missing:
        raise CheckpointError(f"checkpoint {path} has no {missing[0]!r} state (it has "
                              f"{', '.join(sorted(stored))}); is it a different stage's?")
      stored = {key: stored[key] for key in abstract_state}
    _check_compatible(path, stored, abstract_state)
    target = restore_target(abstract_state)
    if partial:  # only the asked-for keys are read from disk
      state_args = ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()}))
    except Exception as e:
      raise _Unreadable from e
    return restored[_STATE], dict(restored[_META])

  def restore_best(self, abstract_state: PyTree, *, partial: bool = False
                   ) -> tuple[PyTree, dict]:
    """Restores the step with the highest val_miou (the latest if none has one).

    Same contract as `restore`; meta["step"] says which step it was.
    """
    return self.restore(self._resolve_step(self.best_step()), abstract_state,
                        partial=partial)

  # ---------------------------------------------------------------- internals

  def _resolve_step(self, step: int | None) -> int:
    steps = self._manager.all_steps()
    if not steps:
      raise CheckpointError(
          f"no checkpoint in {self.directory}; run the '{self.stage}' stage first, or check "
          "--workdir")
    if step is None:
      return self._manager.latest_step()
    if int(step) not in steps:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory} (steps there: "
          f"{', '.join(map(str, sorted(steps)))}); pick one of those or pass None for the "
          "latest")
    return int(step)

  def _read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))
    meta = restored[_META]
    if not isinstance(meta, dict):
      raise CheckpointError(f"checkpoint {self.directory / str(step)} has no readable meta")
    return meta

  def _state_metadata(self, step: int) -> PyTree:
    """The stored state's tree of array metadata; raises whatever Orbax raises if damaged."""
    item = self._manager.item_metadata(step)[_STATE]
    if getattr(item, "tree", None) is None:
      raise ValueError("no state metadata")
    return item.tree

  def _is_readable(self, step: int) -> bool:
    try:
      self._state_metadata(step)
      self._read_meta(step)
    except Exception:  # noqa: BLE001 - any failure means "not a usable step"
      return False
    return True

  def _remove_stale_tmp_dirs(self) -> None:
    # `<step>.orbax-checkpoint-tmp-<ts>` is a save that never reached its rename (the run
    # was killed mid-write). Orbax already ignores it; deleting it reclaims the space.
    # Process 0 only (moe_jax.sharding.is_writer): the others may share its filesystem.
    if not self.directory.is_dir() or jax.process_index() != 0:
      return
    for path in self.directory.iterdir():
      if _TMP_STEP_DIR.match(path.name) and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        logging.warning("removed %s, a checkpoint whose write never finished (the run "
                        "stopped while saving it); the steps before it are used", path)

  def _set_aside_unreadable_steps(self) -> None:
    # Orbax treats any directory named like a step as a finished checkpoint (its rename
    # protocol never produces a partial one), but a step copied in half or made by hand
    # would otherwise become "latest", break resuming and block saving that step again.
    bad = [s for s in self._manager.all_steps() if not self._is_readable(s)]
    for step in bad:
      self._set_aside(step, "its metadata cannot be read")

  def _set_aside(self, step: int, why: str) -> pathlib.Path:
    """Renames step directory `<step>` to `<step>.invalid[-n]`, which Orbax ignores."""
    src = self.directory / str(step)
    dst = self.directory / f"{step}.invalid"
    n = 0
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.invalid-{n}"
    src.rename(dst)
    self._manager.reload()
    logging.warning("checkpoint %s is unreadable (%s); moved it to %s and use the steps "
                    "before it", src, why, dst.name)
    return dst


def restore_model(workdir: str | os.PathLike, stage: str, make: Callable[[], Any]
                  ) -> tuple[Any, dict]:
  """The best checkpoint of a finished stage as a model; no random initialisation runs.

  Args:
    workdir: the run's directory.
    stage: "experts", "baseline", "deep_ensemble" or "gate".
    make: builds the nnx model as the stage did (from the run's config); it is only
      traced (`nnx.eval_shape`) for the structure and shapes.

  Returns:
    (model, meta): the model holding the checkpoint's "model" state, and the step's meta
    dict. The optimiser state is not read (a partial restore).

  Raises:
    CheckpointError: the stage has not finished (or never ran) in `workdir`, or the
      checkpoint was written for a different model config.
  """
  directory = stage_dir(workdir, stage)
  not_finished = CheckpointError(f"stage '{stage}' has not finished in {directory}; run it "
                                 f"first (--stages={stage}) with the same --workdir")
  if not directory.is_dir():  # checked first: opening the stage would create its directory
    raise not_finished
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  with StageCheckpoints(workdir, stage, save_every=1) as ckpt:
    if not ckpt.is_finished():
      raise not_finished
    restored, meta = ckpt.restore_best({"model": abstract}, partial=True)
  return nnx.merge(graphdef, restored["model"]), meta


# -------------------------------------------------------------------- restore helpers

def restore_target(abstract_state: PyTree) -> PyTree:
  """Turns an abstract/concrete state into Orbax restore targets.

  Array-like leaves (jax.ShapeDtypeStruct, jax.Array, np.ndarray) become
  `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`: a leaf already placed on a device
  mesh (a NamedSharding, see `moe_jax.sharding`) keeps its sharding, so a run restores
  straight onto its mesh; any other leaf goes to this process's first device. Other leaves
  (Python scalars) stay as they are. The sharding stored in the checkpoint is never used,
  so a checkpoint written under one mesh (or on a GPU) restores under another (or on a
  CPU-only machine) and back.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray)):
      sharding = getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if isinstance(
          sharding, jax.sharding.NamedSharding) else device)
    return x

  return jax.tree.map(leaf, abstract_state)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_by_name(tree: PyTree) -> dict[str, Any]:
  # Orbax stores every container as nested dicts/lists keyed by field name (an nnx
  # Variable's `.value`, a namedtuple's fields), so "a/b/value"-style names are what
  # the target and the checkpoint metadata have in common.
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _stored_shape(leaf) -> tuple[int, ...]:
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    # Typed PRNG keys (nnx.Rngs state) are stored as their uint32 key data.
    return tuple(jax.eval_shape(jax.random.key_data,
                                jax.ShapeDtypeStruct(leaf.shape, dtype)).shape)
  return tuple(np.shape(leaf))


def _check_compatible(path: pathlib.Path, metadata_tree: PyTree, abstract_state: PyTree):
  """Raises CheckpointError naming the first differing parameter, before Orbax runs."""
  saved = _flat_by_name(metadata_tree)
  wanted = _flat_by_name(abstract_state)
  problems = []
  for name in sorted(wanted.keys() - saved.keys()):
    problems.append(f"'{name}' is in this model but not in the checkpoint")
  for name in sorted(saved.keys() - wanted.keys()):
    problems.append(f"'{name}' is in the checkpoint but not in this model")
  for name in sorted(wanted.keys() & saved.keys()):
    here, there = _stored_shape(wanted[name]), tuple(getattr(saved[name], "shape", ()))
    if here != there:
      problems.append(f"param '{name}' has shape {here} here vs {there} in the checkpoint")
  if problems:
    more = f"; and {len(problems) - 1} more difference(s)" if len(problems) > 1 else ""
    raise CheckpointError(
        f"checkpoint in {path} was written for a different model config ({problems[0]}"
        f"{more}); use a fresh --workdir or the config it was trained with")


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else ""


# -------------------------------------------------------------------- config

def save_config(workdir: str | os.PathLike, config: Mapping[str, Any] | str) -> pathlib.Path:
  """Writes the resolved config to `<workdir>/config.json`, atomically
  (`output_files.write_json`).

  Args:
    workdir: the run's directory (created if missing).
    config: a JSON-able mapping, or a JSON object string (e.g.
      `ConfigDict.to_json_best_effort()`).

  Returns:
    The path of config.json.
  """
  if isinstance(config, str):
    try:
      config = json.loads(config)
    except json.JSONDecodeError as e:
      raise ValueError(f"config string is not JSON: {e}") from e
  if not isinstance(config, Mapping):
    raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
  return output_files.write_json(pathlib.Path(workdir) / CONFIG_FILE, config)


def check_same_run(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Refuses a config that differs from the one a workdir was run with.

  A rerun resumes or skips stages from checkpoints; with another model, data or training
  config that would mix two runs. Keys in MUTABLE_CONFIG_KEYS may differ; a key of
  ADDED_CONFIG_KEYS missing from a config counts as its old value. A workdir without
  config.json passes, and so does one without any checkpoint step or results.json: a run
  that failed before training anything (a bad data path, a typo in a value) must not
  block the corrected command.

  Raises:
    CheckpointError: naming the first differing key, both values and the fix.
  """
  root = pathlib.Path(workdir).expanduser()
  if not (root / CONFIG_FILE).is_file() or not has_results(root):
    return
  before, now = _flat_config(load_config(workdir)), _flat_config(config)
  before, now = {**ADDED_CONFIG_KEYS, **before}, {**ADDED_CONFIG_KEYS, **now}
  changed = [key for key in sorted(before.keys() | now.keys())
             if before.get(key) != now.get(key)
             and not any(key == m or key.startswith(m) for m in MUTABLE_CONFIG_KEYS)]
  if changed:
    key = changed[0]
    more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
    raise CheckpointError(
        f"config key {key}={now.get(key)!r} differs from the run in {workdir} "
        f"({before.get(key)!r} there){more}; use a fresh --workdir, or the same config")


def has_results(workdir: str | os.PathLike) -> bool:
  """Whether `workdir` holds anything trained or measured: a checkpoint step, results.json."""
  root = pathlib.Path(workdir).expanduser()
  return (root / "results.json").is_file() or any(
      p.name.isdigit() for p in root.glob("checkpoints/*/*"))


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(_flat_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def load_config(workdir: str | os.PathLike) -> dict:
  """Reads `<workdir>/config.json` (plain JSON; nothing is unpickled or executed)."""
  path = pathlib.Path(workdir).expanduser() / CONFIG_FILE
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise CheckpointError(
        f"no {CONFIG_FILE} in {path.parent}; is --workdir a directory written by "
        "moe_jax.main?") from None
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); rewrite it or rerun with a "
                          "fresh --workdir") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{path} does not hold a JSON object")
  return config
