"""Every compiled function runs in a process with several devices (preparation for the
mesh): XLA_FLAGS=--xla_force_host_platform_device_count=4 in a subprocess."""

import pytest

import four_devices

SCRIPT = r'''
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import evaluate, losses, methods, predict, stages, train
from moe_jax.models import build

config.model.gates = ("simple", "pixel")  # classwise: the same vmapped simple gate
h, w = config.data.image_size
rng = np.random.default_rng(0)


def batch(*lead):
  return {"image": jnp.asarray(rng.integers(0, 255, (*lead, h, w, 3)), jnp.uint8),
          "label": jnp.asarray(rng.integers(0, 38, (*lead, h, w)), jnp.uint8)}


def steps(models, loss, data, wrt=nnx.Param, shared=None):
  tx = train.make_optimizer(config.train.experts.optimizer, 2)
  optimizers = tuple(nnx.Optimizer(model, tx, wrt=wrt) for model in models)
  for _ in range(2):
    each, finite = train.train_step((loss,) * len(models), models, optimizers, data, False,
                                    shared)
    assert np.all(np.isfinite(np.asarray(each))) and bool(np.all(finite))


experts = build.experts(config, 2)
steps((experts,), losses.expert_loss, batch(2, 2))  # stacked members, one batch each
moes = tuple(build.mixture(config, experts, gate) for gate in config.model.gates)
for moe in moes:
  moe.eval()
# Every gate in one step around the frozen experts, run once (the gate stage's step).
steps(moes, losses.mixture_loss, batch(2), stages.GATE_PARAMS, losses.with_expert_outputs)
# Every MoE with the experts and their ensemble, and MC dropout (scanned passes).
totals = evaluate.accumulate(methods.mixtures_with("weighted"), moes,
                             [jax.device_get(batch(4))] * 2, 38, uncertainty=True,
                             panel_images=1, patch_size=4)
baseline = build.baseline(config)
baseline.eval()
totals.update(evaluate.accumulate(methods.single_and_mc_dropout_with((2,)), baseline,
                                  [jax.device_get(batch(4))], 38, uncertainty=True))
assert all(int(s["confusion"].sum()) % (4 * h * w) == 0 for s in totals.values()), list(totals)
for moe in moes[-1:]:  # the pixel router: its weights are resized with the logits
  out = predict._predict(stages._moe_members, moe, jnp.zeros((1, 40, 50, 3), jnp.uint8),
                         build.key(0), (h, w), 38)
  assert out["segmentation"].shape == (1, 40, 50)
print("ran on", jax.device_count(), "devices")
'''


@pytest.mark.slow
def test_every_compiled_function_runs_with_four_devices():
  result = four_devices.run(SCRIPT, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ran on 4 devices" in result.stdout
