"""The device mesh, and where every array that crosses a jit boundary lives.

One mesh per process, built from the config's `mesh` section (`make_mesh`), with two axes:

  data    the batch: each device holds B / data images of every batch (`put_batch`);
  expert  the stacked experts (and deep-ensemble members): each device holds K / expert
          of them (`place_model`); 1 = every device holds every expert.

Parameters and optimiser state are replicated over `data`; leaves of a `StackedExperts`
are split over `expert` on their leading member axis. jit compiles one SPMD program for
the mesh and XLA inserts the collectives: the loss and its gradients reduce over the
global batch, and BatchNorm's batch statistics are those of the global batch (PyTorch's
DataParallel, the reference's, computes them per device). Nothing else in the package
places arrays on devices.

Several processes (hosts): the mesh spans the devices of all processes, and each process
feeds its own rows of every global batch (`put_batch`). Not yet wired: joining JAX's
distributed runtime from the command line, per-process input slicing and process-0-only
outputs (docs/scaling.md says what runs today).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moe_jax.config_checks import MESH_DEFAULTS, ConfigError

AXES = tuple(MESH_DEFAULTS)  # ("data", "expert")


def mesh_shape(section: Mapping[str, int], devices: int, execution: str) -> tuple[int, int]:
  """(data, expert) from the config's mesh section for `devices` devices; -1 = the rest.

  Raises:
    ConfigError: sizes that do not multiply to the device count, or an expert axis with
      the "unroll" expert execution (it slices the stacked experts one by one, which a
      sharded expert axis cannot serve).
  """
  data, expert = (int(section.get(axis, MESH_DEFAULTS[axis])) for axis in AXES)
  if expert < 1 or data == 0 or data < -1:
    raise ConfigError(f"config key mesh=(data={data}, expert={expert}): sizes are positive "
                      "(data may be -1: every device the expert axis leaves).")
  if data == -1:
    if devices % expert:
      raise ConfigError(f"config key mesh.expert={expert} does not divide the {devices} "
                        "devices; use a divisor of the device count.")
    data = devices // expert
  if data * expert != devices:
    raise ConfigError(f"config key mesh=(data={data}, expert={expert}) needs {data * expert} "
                      f"devices, but {devices} are visible ({jax.devices()[0].platform}); "
                      "set mesh.data=-1 to use them all.")
  if expert > 1 and execution != "vmap":
    raise ConfigError(f"config key mesh.expert={expert} shards the stacked experts, which "
                      f"needs model.expert_execution='vmap' (it is {execution!r}).")
  return data, expert


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The ("data", "expert") mesh over every device of every process."""
  shape = mesh_shape(config.get("mesh", {}), jax.device_count(),
                     config.model.expert_execution)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def check_batch(batch_size: int, mesh: Mesh, key: str) -> None:
  """ConfigError unless config key `key` (a global batch size) divides over the data axis
  and over the processes."""
  data = mesh.shape["data"]
  if batch_size % data:
    raise ConfigError(f"config key {key}={batch_size} does not divide over the mesh's data "
                      f"axis of {data} devices; use a multiple of {data} (the global batch "
                      f"is split evenly, {batch_size // data or 1}+ images per device).")
  if batch_size % jax.process_count():
    raise ConfigError(f"config key {key}={batch_size} does not divide over the "
                      f"{jax.process_count()} processes; use a multiple of "
                      f"{jax.process_count()}.")


def one_device_mesh() -> Mesh:
  """A 1 x 1 mesh of this process's first device."""
  return Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), AXES,
              axis_types=(AxisType.Auto,) * len(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, stacked: bool) -> NamedSharding:
  """Images [B, ...] split on "data"; stacked batches [K, B, ...] (member k's own batch)
  also split on "expert" over K."""
  return NamedSharding(mesh, P("expert", "data") if stacked else P("data"))


def put_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], stacked: bool = False
              ) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded as `batch_sharding`.

  Args:
    batch: {name: [b, ...]} (stacked: [K, b, ...]), b = the global batch / processes: this
      process's rows (one process: the whole batch).
  """
  sharding = batch_sharding(mesh, stacked)
  axis = 1 if stacked else 0
  out = {}
  for name, local in batch.items():
    local = np.asarray(local)
    shape = list(local.shape)
    shape[axis] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(shape))
  return out


def _stacked_paths(model: nnx.Module) -> list[tuple]:
  """The graph paths of the `StackedExperts.members` inside `model` (leading member axis)."""
  from moe_jax.models.moe import StackedExperts
  return [(*path, "members") for path, module in model.iter_modules()
          if isinstance(module, StackedExperts)]


def model_shardings(model: nnx.Module, mesh: Mesh) -> Any:
  """The NamedSharding of every leaf of nnx.state(model): replicated, except the leaves of
  stacked experts, split on "expert" over their leading member axis."""
  stacked = _stacked_paths(model)
  split = mesh.shape["expert"] > 1

  def sharding(path, leaf):
    keys = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
    on_expert = split and any(keys[:len(s)] == s for s in stacked) and np.ndim(leaf) > 0
    return NamedSharding(mesh, P("expert") if on_expert else P())
  return jax.tree_util.tree_map_with_path(sharding, nnx.state(model))


def place_model(model: nnx.Module, mesh: Mesh) -> None:
  """Moves `model`'s state onto the mesh (see `model_shardings`), in place."""
  nnx.update(model, jax.device_put(nnx.state(model), model_shardings(model, mesh)))


def place_state(tree: Any, mesh: Mesh) -> Any:
  """Every array of `tree` on `mesh`: one already placed on it (a NamedSharding of this
  mesh) stays as it is, any other is replicated. A jit then sees the same shardings at every
  call (a mix of placed and unplaced arrays would compile the step a second time)."""
  def place(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
        x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(place, tree)


def state_shardings(tree: Any) -> tuple[jax.sharding.Sharding, ...]:
  """The sharding of every array leaf of `tree`, in leaf order (hashable: a jit's static
  argument, see `constrain`)."""
  return tuple(x.sharding for x in jax.tree.leaves(tree))


def constrain(tree: Any, shardings: tuple[jax.sharding.Sharding, ...]) -> Any:
  """Inside a jit: `tree`'s leaves constrained to `shardings` (`state_shardings` of the
  same tree outside it), so the outputs come back placed as the inputs were."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, s)
                                      for x, s in zip(leaves, shardings, strict=True)])


def check_members(num: int, mesh: Mesh, key: str) -> None:
  """ConfigError unless `num` stacked members (config key `key`) split over the expert
  axis."""
  expert = mesh.shape["expert"]
  if num % expert:
    raise ConfigError(f"config key mesh.expert={expert} does not divide the {num} members "
                      f"of {key}; use a divisor of {num}.")
