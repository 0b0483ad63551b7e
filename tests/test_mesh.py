"""The device mesh (moe_jax/sharding.py) on 4 forced CPU devices: training steps under the
meshes (data, expert) = (4, 1), (2, 2), (1, 4) give one device's losses, BatchNorm
statistics and parameters and compile once; a checkpoint written under one mesh restores
under another; the mesh's configuration errors. Evaluation on every mesh:
tests/test_mesh_evaluation.py."""

import json

import pytest

import forced_devices
from moe_jax import sharding
from moe_jax.config_checks import ConfigError

SCRIPT = forced_devices.MESH_SETUP + r"""
# Plain SGD: a parameter moves by lr x its gradient, so comparing parameters compares the
# gradients' reduction (Adam's first step, lr x g / |g|, turns a rounding-sized gradient
# into a full step of either sign).
SGD = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, schedule="constant",
                                     momentum=0.0, weight_decay=0.0))
compiles = []  # the train step's compilations, from JAX's log


class CountCompiles(logging.Handler):
  def emit(self, record):
    if "Compiling jit(train_step)" in record.getMessage():
      compiles.append(record)


jax.config.update("jax_log_compiles", True)
logging.getLogger("jax").addHandler(CountCompiles())
logging.getLogger("jax").propagate = False  # counted, not printed


def steps(mesh, models, loss, batch, spec, wrt=nnx.Param, shared=None, count=2):
  # (the first step's losses, the state after it, train-step compilations per step)
  for model in models:
    sharding.place_model(model, mesh)
  tx = train.make_optimizer(SGD, count)
  optimizers = tuple(nnx.Optimizer(model, tx, wrt=wrt) for model in models)
  nnx.update((models, optimizers), sharding.place_state(nnx.state((models, optimizers)), mesh))
  shardings = sharding.state_shardings(nnx.state((models, optimizers)))
  compiled = []
  for step in range(count):
    before = len(compiles)
    each, finite = train.train_step((loss,) * len(models), models, optimizers,
                                    sharding.put_batch(mesh, batch, spec), False, shared,
                                    shardings)
    compiled.append(len(compiles) - before)
    if step == 0:
      first = (np.asarray(each), floats(nnx.state(models, wrt)),
               floats(nnx.state(models, nnx.BatchStat)))
  # The outputs keep the inputs' shardings: nothing moves between steps.
  assert sharding.state_shardings(nnx.state((models, optimizers))) == shardings
  return first, compiled


trained = {}
for shape in SHAPES:
  mesh = mesh_of(shape)
  with jax.set_mesh(mesh):
    experts = build.experts(config, K)
    experts.train()
    (expert_loss, expert_params, expert_stats), compiled = steps(
        mesh, (experts,), losses.expert_loss, stacked_batch, sharding.STACKED)
    assert compiled == [1, 0], (shape, compiled)  # compiled at the first step only
    spec = jax.tree.leaves(nnx.state(experts, nnx.Param))[0].sharding.spec
    experts.eval()
    # Every mesh's gate step around one device's experts (after their 2 steps there).
    if shape == (1, 1):
      reference_experts = jax.device_get(nnx.state(experts, (nnx.Param, nnx.BatchStat)))
    nnx.update(experts, reference_experts)
    moe = build.mixture(config, experts, "simple")
    frozen = floats(nnx.state(experts, nnx.Param))
    (gate_loss, gate_params, _), compiled = steps(
        mesh, (moe,), losses.mixture_loss, gate_batch, sharding.TRAIN, stages.GATE_PARAMS,
        losses.with_expert_outputs)
    assert compiled == [1, 0], (shape, compiled)
    for a, b in zip(frozen, floats(nnx.state(moe.experts, nnx.Param)), strict=True):
      np.testing.assert_array_equal(a, b)  # the gate stage leaves its experts alone
  trained[shape] = (expert_loss, gate_loss, expert_stats, expert_params, gate_params)
  print(shape, "param spec", spec)
  if shape == (2, 2):  # written under (2, 2), restored on one device
    with checkpoint.StageCheckpoints(sys.argv[1], "experts", save_every=1) as ckpt:
      ckpt.save(1, {"model": nnx.state(experts)}, finished=True)
    saved = floats(nnx.state(experts))

worst = {}
for shape, got in trained.items():
  for name, a, b in zip(("expert loss", "gate loss", "batch stats", "expert params",
                         "gate params"), trained[(1, 1)], got):
    a, b = ([np.atleast_1d(a)], [np.atleast_1d(b)]) if name.endswith("loss") else (a, b)
    worst[f"{shape} {name}"] = max(float(np.max(np.abs(x - y) / (1 + np.abs(x))))
                                   for x, y in zip(a, b))
print(json.dumps(worst))

one = sharding.one_device_mesh()
fresh = build.experts(config, K)
sharding.place_model(fresh, one)
with checkpoint.StageCheckpoints(sys.argv[1], "experts", save_every=1) as ckpt:
  restored, _ = ckpt.restore(None, {"model": nnx.state(fresh)})
assert all(x.sharding.mesh == one for x in jax.tree.leaves(restored["model"]))
for a, b in zip(floats(restored["model"]), saved):
  np.testing.assert_array_equal(a, b)
print("restored under (1, 1)")
"""


@pytest.mark.slow
def test_train_steps_under_every_mesh_match_one_device_and_checkpoints_move(tmp_path):
  result = forced_devices.run(SCRIPT, str(tmp_path))
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.strip().splitlines()
  assert "(2, 2) param spec P('expert',)" in lines
  assert "(1, 4) param spec P('expert',)" in lines
  assert "(4, 1) param spec P()" in lines
  worst = json.loads(lines[-2])
  print(worst)
  # |one device - mesh| / (1 + |one device|) after one SGD step: losses, BatchNorm's
  # running statistics (the global batch's moments) and parameters agree to rounding.
  # The gate's step starts from one device's experts on every mesh, and compares the
  # gate's own parameters (the experts are frozen, and checked unchanged).
  for shape in forced_devices.MESHES:
    for name in ("expert loss", "gate loss", "batch stats", "expert params", "gate params"):
      assert worst[f"{shape} {name}"] <= 1e-5, (shape, name, worst)
  assert lines[-1] == "restored under (1, 1)"


@pytest.mark.parametrize("section, devices, execution, message", [
    ({"data": 3, "expert": 1}, 4, "vmap", r"mesh=\(data=3, expert=1\) needs 3 devices, but 4"),
    ({"data": -1, "expert": 3}, 4, "vmap", "mesh.expert=3 does not divide the 4 devices"),
    ({"data": 2, "expert": 2}, 4, "unroll", "needs model.expert_execution='vmap'"),
    ({"data": 0, "expert": 1}, 4, "vmap", "sizes are positive"),
])
def test_bad_mesh_is_one_line_naming_the_key(section, devices, execution, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(section, devices, execution)


def test_mesh_shape_fills_the_data_axis():
  assert sharding.mesh_shape({}, 8, "unroll") == (8, 1)
  assert sharding.mesh_shape({"data": -1, "expert": 2}, 8, "vmap") == (4, 2)
  assert sharding.mesh_shape({"data": 2, "expert": 4}, 8, "vmap") == (2, 4)


def test_an_eval_batch_that_does_not_split_over_the_devices_is_one_line():
  mesh = sharding.one_device_mesh()
  sharding.check_eval_batch(4, 2, mesh)  # 1 device x micro-batches of 2
  with pytest.raises(ConfigError, match=r"config key eval.batch_size=4 does not split over 1 "
                                        r"devices in micro-batches of eval.micro_batch=3; use "
                                        r"a multiple of 3"):
    sharding.check_eval_batch(4, 3, mesh)


@pytest.mark.parametrize("env, several", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "node0:1234"}, True),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),  # one task, all its GPUs
    ({"SLURM_NTASKS": "2"}, False),                         # not inside a job
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),                # a single TPU VM
])
def test_the_environment_says_when_to_join_several_processes(env, several):
  assert sharding._several_processes(env) == several
  if not several:
    assert sharding.initialize_distributed(env) is False
