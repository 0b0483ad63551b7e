"""Two real processes on this machine join JAX's distributed runtime (localhost, CPU
collectives over gloo, 2 forced devices each) and train and evaluate on one 4-device mesh,
each feeding its own rows of every batch: the same numbers as one process with the same
4-device mesh. (All at one XLA CPU thread count: forced_devices.pin_cpu_threads.)"""

from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

import forced_devices

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import importlib.util, sys
from moe_jax import sharding
several = sharding.initialize_distributed()  # before anything touches a device

import jax, jax.numpy as jnp, ml_collections, numpy as np
from flax import nnx
from moe_jax import evaluate, losses, methods, stages, train
from moe_jax.models import build

assert jax.device_count() == 4
assert jax.process_count() == (2 if several else 1)
spec = importlib.util.spec_from_file_location("a2d2_config", "configs/a2d2.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config("smoke")
config.model.expert_execution = "vmap"
config.model.aspp_dropout = 0.0
SGD = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, schedule="constant",
                                     momentum=0.0, weight_decay=0.0))
K, B = 2, 4
h, w = config.data.image_size
rng = np.random.default_rng(0)
stacked = {"image": rng.integers(0, 255, (K, B, h, w, 3), np.uint8),
           "label": rng.integers(0, 38, (K, B, h, w), np.uint8)}
eval_batches = [{"image": rng.integers(0, 255, (B, h, w, 3), np.uint8),
                 "label": rng.integers(0, 38, (B, h, w), np.uint8)} for _ in range(2)]
index, count = sharding.process_rows()
rows = slice(index * B // count, (index + 1) * B // count)  # this process's rows

mesh = sharding.make_mesh(config)  # (data, expert): (4, 1), over both processes or in one
out = {}
with jax.set_mesh(mesh):
  experts = build.experts(config, K)
  experts.train()
  sharding.place_model(experts, mesh)
  optimizer = nnx.Optimizer(experts, train.make_optimizer(SGD, 1), wrt=nnx.Param)
  models, optimizers = (experts,), (optimizer,)
  nnx.update((models, optimizers), sharding.place_state(nnx.state((models, optimizers)), mesh))
  shardings = sharding.state_shardings(nnx.state((models, optimizers)))
  batch = sharding.put_batch(mesh, {k: v[:, rows] for k, v in stacked.items()},
                             sharding.STACKED)
  each, _ = train.train_step((losses.expert_loss,), models, optimizers, batch, False, None,
                             shardings)
  out["loss"] = np.asarray(each.addressable_data(0))
  for i, x in enumerate(jax.tree.leaves(nnx.state(experts, (nnx.Param, nnx.BatchStat)))):
    out[f"state/{i}"] = np.asarray(x.addressable_data(0))  # replicated: a whole copy
# Evaluation of freshly built (identical) experts: each micro-batch runs alone on its
# device (`sharding.map_chunk`), so the statistics are bit for bit the same.
experts = build.experts(config, K)
experts.eval()
moe = build.mixture(config, experts, "simple")
moe.eval()
sharding.place_model(moe, mesh)  # accumulate runs where the model is
totals = evaluate.accumulate(methods.mixtures_with("weighted"), (moe,),
                             [{k: v[rows] for k, v in b.items()} for b in eval_batches], 38,
                             uncertainty=True)
for method, stats in totals.items():
  for name, value in stats.items():
    out[f"eval/{method}/{name}"] = value
if sharding.is_writer():
  np.savez(sys.argv[1], **out)
print("process", index, "of", count, "done")
'''


def _run(script_args, devices, extra_env=None):
  env = {**forced_devices.env(devices), **(extra_env or {})}
  return subprocess.Popen([sys.executable, "-c", SCRIPT, *script_args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_train_and_evaluate_as_one_process(tmp_path):
  port = forced_devices.free_port()
  # One process at a time on this 2-core machine: first the two together, then the one.
  processes = [_run([str(tmp_path / "two.npz")], 2,
                    {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                     "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
  for i, process in enumerate(processes):
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, f"process {i}: {err[-3000:]}"
  one = _run([str(tmp_path / "one.npz")], 4)
  _, err = one.communicate(timeout=600)
  assert one.returncode == 0, err[-3000:]
  two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
  assert sorted(two.files) == sorted(one.files) and len(one.files) > 50
  # Training: the gradients' and BatchNorm's all-reduce runs over gloo between the processes
  # and in memory within one, summing in another order: equal to rounding (measured 2.6e-7;
  # the bound is 1e-5).
  worst = max(float(np.max(np.abs(two[n] - one[n]) / (1 + np.abs(one[n]))))
              for n in one.files if not n.startswith("eval/"))
  print("training, worst |two - one| / (1 + |one|):", worst)
  assert worst <= 1e-5
  # Evaluation: every statistic identical.
  for name in one.files:
    if name.startswith("eval/"):
      np.testing.assert_array_equal(two[name], one[name], err_msg=name)
  assert int(one["eval/moe_0/confusion"].sum()) == 2 * 4 * 32 * 48
