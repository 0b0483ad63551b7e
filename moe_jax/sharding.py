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

Several processes (hosts): `initialize_distributed` joins JAX's runtime, the mesh spans the
devices of all processes, each process reads and feeds its own rows of every global batch
(`process_rows`, `put_batch`), every process computes the same results, and process 0
writes the files (`is_writer`, `sync`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moe_jax.config_checks import MESH_DEFAULTS, ConfigError

AXES = tuple(MESH_DEFAULTS)  # ("data", "expert")


# Environment variables by which a launcher says this is one of several processes:
# jax.distributed's own (any cluster, or plain env vars), SLURM's, Open MPI's, a TPU pod's.
def _several_processes(env: Mapping[str, str]) -> bool:
  counts = (env.get("JAX_NUM_PROCESSES"), env.get("SLURM_NTASKS") if "SLURM_JOB_ID" in env
            else None, env.get("OMPI_COMM_WORLD_SIZE"))
  return (bool(env.get("JAX_COORDINATOR_ADDRESS")) or any(int(n or 1) > 1 for n in counts)
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
  """Joins JAX's distributed runtime (`jax.distributed.initialize`) when the environment
  says this process is one of several, before anything touches a device; True if it did.

  Plain env vars: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  SLURM (srun), Open MPI (mpirun) and Cloud TPU pods are detected by JAX itself. CPU
  devices of several processes talk through gloo (jax_cpu_collectives_implementation).
  """
  if not _several_processes(env):
    return False
  if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = {}
  if env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
    explicit = dict(num_processes=int(env["JAX_NUM_PROCESSES"]),
                    process_id=int(env["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**explicit)
  return True


def is_writer() -> bool:
  """True in the one process that writes the run's files (process 0); every process
  computes the same results, and Orbax writes each process's checkpoint shards itself."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process got here (no-op with one process): e.g. process 0's files
  are written before the others read them."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def process_rows() -> tuple[int, int]:
  """(this process's index, the number of processes): each process reads rows
  index * b .. (index + 1) * b of every global batch of b * count images."""
  return jax.process_index(), jax.process_count()


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


# Where a batch's leading axes live: training images [B, ...] split on "data"; stacked
# training batches [K, B, ...] (member k's own batch) also on "expert" over K; evaluation
# batches [B, ...] split over every device (evaluation replicates the models).
TRAIN, STACKED, EVAL = P("data"), P("expert", "data"), P(AXES)


def put_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], spec: P = TRAIN
              ) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded as `spec` (TRAIN,
  STACKED or EVAL).

  Args:
    batch: {name: [b, ...]} ([K, b, ...] for STACKED), b = the global batch / processes:
      this process's rows (one process: the whole batch).
  """
  sharding = NamedSharding(mesh, spec)
  axis = 1 if spec == STACKED else 0
  out = {}
  for name, local in batch.items():
    local = np.asarray(local)
    shape = list(local.shape)
    shape[axis] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, local, tuple(shape))
  return out


def check_eval_batch(batch_size: int, micro_batch: int, mesh: Mesh) -> None:
  """ConfigError unless eval.batch_size splits over every device of `mesh` in whole
  micro-batches of eval.micro_batch images (`chunk_steps`)."""
  if batch_size % (mesh.size * micro_batch):
    raise ConfigError(
        f"config key eval.batch_size={batch_size} does not split over {mesh.size} devices in "
        f"micro-batches of eval.micro_batch={micro_batch}; use a multiple of "
        f"{mesh.size * micro_batch} (devices x micro-batch).")


# The XLA options of a `map_chunk` program. XLA compiles a program for several devices with
# an SPMD pipeline and one for a single device without it; the SPMD pipeline's cleanup
# (DCE, tuple simplification, CSE) runs before the main simplification passes, which then
# rewrite the deduplicated program otherwise (e.g. x / c against x * (1 / c)) and round
# some floats differently. Without it both pipelines give one device's program (measured
# on CPU, jax 0.10: tests/test_mesh.py); later passes still remove what it would have.
# (On CPU a program's numbers also depend on how many devices its process has: XLA's CPU
# compiler sets its loops' parallel partitions from that count; docs/scaling.md.)
SAME_ON_EVERY_MESH = {"xla_disable_hlo_passes": "spmd-cleanup"}


def chunk_steps(mesh: Mesh, micro_batch: int, batch: Mapping[str, np.ndarray]
                ) -> list[tuple[dict[str, jax.Array], jax.Array]]:
  """This process's rows of a global evaluation batch -> its micro-batches, one step per
  micro-batch slot of a device, each placed for `map_chunk`.

  The batch of B images is split into B / micro_batch chunks (chunk c: images
  c * micro_batch ..), and device d of the mesh (EVAL order) holds chunks d * n .. d * n +
  n - 1, n = B / (devices x micro_batch), as it holds their rows under EVAL. Step s gives
  every device its s-th chunk.

  Args:
    batch: {name: [b, ...]}, b = B / processes: this process's rows (one process: all).

  Returns:
    n steps of ({name: [devices x micro_batch, ...]} sharded EVAL, the global index of each
    device's chunk, int32 [devices] sharded EVAL).
  """
  rows = len(next(iter(batch.values())))
  local = rows // micro_batch
  devices = mesh.size // jax.process_count()
  n = local // devices
  first = jax.process_index() * devices * n
  ids = first + n * np.arange(devices, dtype=np.int32)
  steps = []
  for s in range(n):
    chunk = {name: np.asarray(x).reshape(devices, n, micro_batch, *x.shape[1:])[:, s]
             .reshape(devices * micro_batch, *x.shape[1:]) for name, x in batch.items()}
    steps.append((put_batch(mesh, chunk, EVAL), put_batch(mesh, {"": ids + s}, EVAL)[""]))
  return steps


def map_chunk(fn: Callable, mesh: Mesh, shared: Any, chunk: Mapping[str, jax.Array],
              ids: jax.Array, key: jax.Array) -> Any:
  """Inside a jit: `fn` on every device's own micro-batch of one `chunk_steps` step.

  Each device runs one micro-batch alone, with no collective: compiled with
  SAME_ON_EVERY_MESH, its program is the same for every mesh, one device included, and so
  is every chunk's numbers (XLA's numbers for an image depend on how many images it
  computes at once and on what the program fuses around them: on CPU, a batch of 2
  differs from one of 8 by ~1e-6).

  Args:
    fn: (shared, chunk {name: [micro_batch, ...]}, key) -> a pytree of arrays.
    shared: a pytree every chunk reads (e.g. the models' state), replicated.
    chunk, ids: one step of `chunk_steps`; chunk c gets the key fold_in(key, c).

  Returns:
    `fn`'s pytree, each leaf with a leading device axis [devices, ...] sharded EVAL (see
    `chunk_order`).
  """
  def per_device(shared, chunk, ids, key):
    out = fn(shared, chunk, jax.random.fold_in(key, ids[0]))
    return jax.tree.map(lambda x: x[None], out)

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), EVAL, EVAL, P()),
                       out_specs=EVAL, check_vma=False)(shared, chunk, ids, key)


def chunk_order(steps: list[Any]) -> Any:
  """The `map_chunk` results of a batch's `chunk_steps`, fetched to the host (from every
  process) and put in global chunk order: each leaf [B / micro_batch, ...], numpy."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    fetched = [multihost_utils.process_allgather(step, tiled=True) for step in steps]
  else:
    fetched = jax.device_get(steps)
  # Step s's row d is chunk d * n + s.
  return jax.tree.map(lambda *xs: np.stack(xs, axis=1).reshape(-1, *np.shape(xs[0])[1:]),
                      *fetched)


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh the arrays of `tree` were placed on (`place_model`, `place_state`), or None
  when its first array is not on a mesh (e.g. a model on one device)."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if leaves and isinstance(leaves[0].sharding, NamedSharding):
    return leaves[0].sharding.mesh
  return None


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


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """`x` (an array, or a typed PRNG key array, holding the same value in every process)
  placed as `sharding`. Within one process, `jax.device_put`; a mesh that spans processes
  is fed from each process's host copy (a device cannot send to another host's devices
  on every backend, e.g. CPU)."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                    impl=jax.random.key_impl(x))
  host = np.asarray(jax.device_get(x))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_model(model: nnx.Module, mesh: Mesh) -> None:
  """Moves `model`'s state onto the mesh (see `model_shardings`), in place."""
  nnx.update(model, jax.tree.map(put, nnx.state(model), model_shardings(model, mesh)))


def placed_copy(model: Any, mesh: Mesh) -> Any:
  """`model` (a module or a tuple of them) itself when all its arrays are on `mesh`, else
  a copy with its arrays placed there (`place_state`); the caller's model stays where it
  is."""
  graphdef, state = nnx.split(model)
  placed = place_state(state, mesh)
  same = all(a is b for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(placed)))
  return model if same else nnx.merge(graphdef, placed)


def place_state(tree: Any, mesh: Mesh) -> Any:
  """Every array of `tree` on `mesh`: one already placed on it (a NamedSharding of this
  mesh) stays as it is, any other is replicated. A jit then sees the same shardings at every
  call (a mix of placed and unplaced arrays would compile the step a second time)."""
  def place(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
        x.sharding.mesh == mesh:
      return x
    return put(x, replicated(mesh))
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
