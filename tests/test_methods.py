"""Method outputs: predictions, probabilities and maps of the MoE, ensembles, MC dropout."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax import measures, methods, uncertainty
from moe_jax.models import moe, routers
from moe_jax.models.deeplab import DeepLabV3Plus

SMALL = ml_collections.ConfigDict(dict(backbone="resnet10", width=0.125, aspp_channels=8,
                                       aspp_dropout=0.5, decoder_dropout=0.5))
IMAGES = jnp.asarray(np.random.default_rng(0).random((2, 32, 48, 3)), jnp.float32)


def tiny_moe(gate):
  experts = moe.StackedExperts(moe.make_expert(SMALL, 4), 3, execution="unroll",
                               rngs=nnx.Rngs(0))
  model = moe.MixtureOfExperts(experts, num_classes=4, image_size=(32, 48), gate=gate,
                               gate_hidden=8, rngs=nnx.Rngs(1))
  model.eval()
  return model


@pytest.mark.parametrize("gate", ["simple", "classwise"])
def test_mixture_outputs_are_consistent_with_the_forward(gate):
  model = tiny_moe(gate)
  # One compile for the forward and all three sample sets.
  forward, outs = nnx.jit(lambda m, x: (m(x), {members: methods.mixture(
      m, x, None, members=members) for members in methods.MOE_MEMBERS}))(model, IMAGES)
  for members, out in outs.items():
    check_mixture_output(out, forward, gate, members)


def test_mixtures_of_several_gates_equal_each_mixture_on_its_own():
  moes = (tiny_moe("simple"), tiny_moe("classwise"))  # the same experts (same seed)
  together, apart = nnx.jit(lambda ms, x: (methods.mixtures(ms, x, None, variants=(False, False)), [
      methods.mixture(m, x, None) for m in ms]))(moes, IMAGES)
  assert set(together) == {"moe_0", "moe_1", "ensemble", "expert_0", "expert_1", "expert_2"}
  expected = {"moe_0": apart[0]["moe"], "moe_1": apart[1]["moe"],
              **{key: value for key, value in apart[0].items() if key != "moe"}}
  for key, out in expected.items():
    assert set(together[key]) == set(out), key
    for name, value in out.items():  # arrays, and the Routing of the MoEs
      jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6, err_msg=key + name),
                   together[key][name], value)


def check_mixture_output(out, forward, gate, members):
  assert set(out) == {"moe", "ensemble", "expert_0", "expert_1", "expert_2"}
  moe_out = out["moe"]
  np.testing.assert_array_equal(moe_out["prediction"], jnp.argmax(forward["logits"], -1))
  for measure in measures.MEASURES:
    assert moe_out[measure].shape == (2, 32, 48), measure
    assert np.all((moe_out[measure] >= 0) & (moe_out[measure] <= 1)), measure
  probs = uncertainty.probabilities(forward["expert_logits"])
  gates = forward["routing"].weights[0]  # [B,K] (simple) or [B,C,K] (classwise)
  if members == "weighted" and gate == "simple":
    expected = uncertainty.measures(uncertainty.moments(probs, gates.T[:, :, None, None]))
    np.testing.assert_allclose(moe_out["mutual_information"],
                               expected["mutual_information"] / np.log(4), atol=1e-6)
  if members == "weighted" and gate == "classwise":
    # Pixel (b, h, w) weighs the experts by the gate of its predicted class.
    b, h, w = 1, 5, 7
    c = int(moe_out["prediction"][b, h, w])
    single = uncertainty.measures(uncertainty.moments(probs[:, b, h, w], gates[b, c]))
    np.testing.assert_allclose(moe_out["expert_variance"][b, h, w],
                               single["expert_variance"] / 0.5, atol=1e-6)
  if gate == "simple":  # one gate entropy per image
    ge = np.asarray(moe_out["gate_entropy"])
    assert np.all(ge == ge[:, :1, :1])
  ensemble = out["ensemble"]
  np.testing.assert_allclose(ensemble["probs"], probs.mean(0), atol=1e-6)
  np.testing.assert_array_equal(out["expert_1"]["prediction"],
                                jnp.argmax(forward["expert_logits"][1], -1))


def test_mc_dropout_shared_encoder_equals_full_passes_and_passes_differ():
  model = DeepLabV3Plus(4, backbone="resnet10", width=0.125, aspp_channels=8, aspp_dropout=0.5,
                        decoder_dropout=0.5, rngs=nnx.Rngs(0))
  model.eval()
  # threefry: its draws under vmap equal per-key draws, so the vmapped passes
  # (mc_dropout_logits) and the scanned ones (mc_dropout) can be compared exactly; rbg,
  # the CLI's default, draws different (equally valid) masks under vmap.
  key = jax.random.key(3, impl="threefry2x32")
  run = nnx.jit(lambda *a: uncertainty.probabilities(methods.mc_dropout_logits(*a)),
                static_argnums=(3, 4))
  shared = run(model, IMAGES, key, 4, True)
  full = run(model, IMAGES, key, 4, False)
  assert shared.shape == (4, 2, 32, 48, 4)
  np.testing.assert_allclose(shared, full, atol=1e-5)
  assert not np.allclose(shared[0], shared[1])  # dropout is on, with a key per pass
  deterministic, _ = nnx.jit(lambda m, x: m(x))(model, IMAGES)  # eval mode: no dropout
  again, _ = nnx.jit(lambda m, x: m(x))(model, IMAGES)
  np.testing.assert_array_equal(deterministic, again)
  both = nnx.jit(methods.single_and_mc_dropout_with((4,)))(model, IMAGES, key)
  np.testing.assert_allclose(both["model"]["probs"], jax.nn.softmax(deterministic), atol=1e-6)
  out = both["mc_dropout_4"]
  np.testing.assert_allclose(out["probs"], shared.mean(0), atol=1e-6)
  naive = nnx.jit(functools.partial(methods.mc_dropout, passes=4, shared_encoder=False))(
      model, IMAGES, key)["mc_dropout_4"]
  for name in ("probs", *measures.of_source("members")):
    np.testing.assert_allclose(naive[name], out[name], atol=1e-5, err_msg=name)
  assert float(out["mutual_information"].max()) > 0


def test_expert_variance_at_the_fused_prediction_as_the_reference_takes_it():
  rng = np.random.default_rng(3)
  z = jnp.asarray(rng.normal(size=(3, 2, 4, 5, 6)) * 2, jnp.float32)  # K=3, B=2, C=6
  g = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3)), jnp.float32))  # [B, K]
  out = {"logits": jnp.einsum("kbhwc,bk->bhwc", z, g), "expert_logits": z,
         "routing": routers.Routing(g[None], g[None], unit="image")}
  sample = methods.mixture_outputs(out, experts=False)["moe"]
  fused = methods.mixture_outputs(out, ev_at="fused", experts=False)["moe"]
  p = np.asarray(jax.nn.softmax(z), np.float64)  # [K,B,H,W,C]
  w = np.asarray(g, np.float64).T[:, :, None, None]  # [K,B,1,1]
  mean = (w[..., None] * p).sum(0)
  c = np.asarray(fused["prediction"])  # argmax of the fused logits
  at = np.take_along_axis(p, np.broadcast_to(c[None, ..., None], (3, *c.shape, 1)), -1)[..., 0]
  ev = np.sqrt((w * (at - np.take_along_axis(mean, c[..., None], -1)[..., 0]) ** 2).sum(0))
  np.testing.assert_allclose(fused["expert_variance"], ev / 0.5, atol=2e-6)
  same = c == mean.argmax(-1)
  assert 0 < same.mean() < 1  # the two choices differ where the predictions do
  np.testing.assert_allclose(np.asarray(fused["expert_variance"])[same],
                             np.asarray(sample["expert_variance"])[same], atol=1e-6)
  for name in ("predictive_entropy", "mutual_information", "gate_entropy"):
    np.testing.assert_array_equal(fused[name], sample[name])
