"""Calibration under shift: hard routing, temperature scaling in the outputs, MoCaE, the
hard subset and its disagreement, and the robust gate loss inside the MoE."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest

from moe_jax import losses, methods, robust_objectives, uncertainty
from moe_jax.models import routers
from test_methods import IMAGES, tiny_moe


def test_hard_routing_is_one_hot_on_the_argmax_expert_with_ties_to_the_lowest():
  weights = jnp.asarray([[[0.2, 0.5, 0.3], [0.4, 0.4, 0.2]]])  # [R=1, B=2, K=3]
  hard = routers.hard(routers.Routing(weights, jnp.log(weights), unit="image"))
  np.testing.assert_array_equal(hard.weights, [[[0, 1, 0], [1, 0, 0]]])
  np.testing.assert_array_equal(hard.logits, jnp.log(weights))  # the router's own


@pytest.mark.parametrize("gate", ["simple", "classwise"])
def test_hard_routing_equals_evaluating_the_argmax_expert_alone(gate):
  moe = tiny_moe(gate)
  out, routing, expert_logits = nnx.jit(lambda m, x: (
      methods.mixtures((m,), x, None), m.route(*m.experts(x)), m.experts(x)[0]))(moe, IMAGES)
  top = np.asarray(jnp.argmax(routing.weights[0], -1))  # [B] or [B, C]
  logits = np.asarray(expert_logits)  # [K, B, H, W, C]
  if gate == "simple":
    expected = np.stack([logits[top[b], b] for b in range(logits.shape[1])])
  else:  # class c of each image from its own argmax expert
    expected = np.stack([np.stack([logits[top[b, c], b, ..., c]
                                   for c in range(logits.shape[-1])], -1)
                         for b in range(logits.shape[1])])
  np.testing.assert_allclose(out["moe_0_hard"]["probs"], jax.nn.softmax(expected, -1),
                             atol=1e-6)
  np.testing.assert_array_equal(out["moe_0_hard"]["prediction"], expected.argmax(-1))
  # The router's uncertainty stays the soft router's (at the hard prediction's class).
  expected_ge = routers.gate_entropy_map(routing, out["moe_0_hard"]["prediction"]) / np.log(3)
  np.testing.assert_allclose(out["moe_0_hard"]["gate_entropy"], expected_ge, atol=1e-6)


def test_tempered_at_one_reproduces_the_method_and_keeps_its_prediction():
  probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4, 5)) * 3))
  output = {"prediction": jnp.argmax(probs, -1), "probs": probs}
  same = methods.tempered(output, jnp.float32(1.0))
  np.testing.assert_allclose(same["probs"], probs, atol=1e-6)
  hot = methods.tempered(output, jnp.float32(4.0))
  np.testing.assert_array_equal(hot["prediction"], output["prediction"])
  assert np.all(np.max(hot["probs"], -1) <= np.max(probs, -1) + 1e-6)  # T > 1 softens
  assert np.all(hot["predictive_entropy"] >= same["predictive_entropy"] - 1e-6)
  np.testing.assert_allclose(hot["probs"],
                             jax.nn.softmax(jnp.log(probs) / 4.0, -1), atol=1e-6)


def test_with_temperatures_adds_ts_only_for_calibrated_keys():
  probs = jax.nn.softmax(jnp.ones((1, 2, 2, 3)))
  outputs = {"a": {"prediction": jnp.zeros((1, 2, 2), int), "probs": probs},
             "b": {"prediction": jnp.zeros((1, 2, 2), int), "probs": probs}}
  calibration = methods.Calibration(jnp.ones(2), {"a": jnp.float32(2.0),
                                                  "missing": jnp.float32(3.0)})
  assert set(methods.with_temperatures(outputs, calibration)) == {"a", "b", "a_ts"}
  assert methods.with_temperatures(outputs, None) is outputs


def test_mocae_with_unit_temperatures_equals_the_moe_and_tempers_the_experts():
  moe = tiny_moe("simple")
  run = nnx.jit(lambda m, x, c: methods.mixtures((m,), x, None, c))
  ones = run(moe, IMAGES, methods.Calibration(jnp.ones(3), {}))
  for variant in ("", "_hard"):
    for name in ("prediction", "probs", "mutual_information", "gate_entropy"):
      np.testing.assert_allclose(ones[f"moe_0_mocae{variant}"][name],
                                 ones[f"moe_0{variant}"][name], atol=1e-6)
  t = jnp.asarray([0.5, 2.0, 4.0])
  tempered = run(moe, IMAGES, methods.Calibration(t, {}))
  expert_logits, aspp = moe.experts(IMAGES)
  expected = moe.fuse(expert_logits / t[:, None, None, None, None],
                      moe.route(expert_logits, aspp))["logits"]
  np.testing.assert_allclose(tempered["moe_0_mocae"]["probs"], jax.nn.softmax(expected, -1),
                             atol=1e-5)
  # The experts' own outputs stay untempered.
  np.testing.assert_allclose(tempered["expert_0"]["probs"], ones["expert_0"]["probs"])


def test_weighted_disagreement_by_hand():
  expert_probs = jnp.asarray([[0.9, 0.1], [0.5, 0.5]])[:, None, None, None, :]  # K=2, 1 px
  probs = jnp.asarray([0.7, 0.3])[None, None, None, :]
  weights = jnp.asarray([0.25, 0.75])[:, None, None, None]
  # 0.25 * (0.2² + 0.2²) + 0.75 * (0.2² + 0.2²) = 0.08
  np.testing.assert_allclose(uncertainty.weighted_disagreement(expert_probs, probs, weights),
                             [[[0.08]]], atol=1e-7)
  same = jnp.broadcast_to(probs, (2, 1, 1, 1, 2))
  np.testing.assert_allclose(uncertainty.weighted_disagreement(same, probs, weights), 0.0)


def test_hard_subset_on_a_hand_made_case():
  # 1 image of 1 x 3 pixels, K = 2 experts, C = 2 classes, image routing (0.5, 0.5).
  def out(probs):
    probs = jnp.asarray(probs, jnp.float32)[None, None]  # [1, 1, 3, C]
    return {"prediction": jnp.argmax(probs, -1), "probs": probs}
  outputs = {"e0": out([[0.9, 0.1], [0.6, 0.4], [0.9, 0.1]]),
             "e1": out([[0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]),
             "moe": {**out([[0.55, 0.45], [0.6, 0.4], [0.8, 0.2]]),
                     "routing": routers.Routing(jnp.full((1, 1, 2), 0.5),
                                                jnp.zeros((1, 1, 2)), unit="image")}}
  # Pixel 0: argmaxes differ. Pixel 1: all agree, no disagreement. Pixel 2: argmaxes agree,
  # dis = 0.5 * 2 * 0.1² + 0.5 * 2 * 0.1² = 0.02.
  dis = methods.disagreement(outputs, ("e0", "e1"), "moe")
  np.testing.assert_allclose(dis[0, 0, 1:], [0.0, 0.02], atol=1e-7)
  for threshold, expected in [(np.inf, [True, False, False]), (0.01, [True, False, True]),
                              (0.03, [True, False, False])]:
    np.testing.assert_array_equal(
        methods.hard_subset(outputs, ("e0", "e1"), "moe", jnp.float32(threshold))[0, 0],
        expected)


def _batch(step, total):
  labels = np.random.default_rng(2).integers(0, 4, (2, 32, 48))
  labels[0, :5] = 255
  return {"image": (np.asarray(IMAGES) * 255).astype(np.uint8), "label": labels,
          "step": np.int32(step), "total_steps": np.int32(total)}


@pytest.mark.parametrize("objective", ["robust", "robust_filtered"])
def test_robust_gate_loss_is_erm_during_warmup_then_its_objective(objective):
  moe = tiny_moe("simple")
  settings = losses.RobustSettings(eta=2.0, pixel_eta=0.2, unit="image", warmup=0.5,
                                   detach=False, tau_r=1e-6, tau_d=0.01)
  loss = losses.gate_loss(objective, settings)
  assert loss is losses.gate_loss(objective, settings)  # static under jit
  warm, after = _batch(5, 10), _batch(6, 10)  # 5 <= 0.5 * 10 < 6

  @nnx.jit
  def evaluate(model, first, warm, after):
    images = after["image"].astype(jnp.float32) / 255.0
    return (losses.mixture_loss(model, first), loss(model, warm), loss(model, after),
            nnx.grad(loss)(model, after), model(images)["logits"])

  erm, warmup, robust, grads, logits = evaluate(moe, _batch(1, 10), warm, after)
  np.testing.assert_allclose(warmup, erm, rtol=1e-6)
  assert np.isfinite(robust) and abs(float(robust) - float(erm)) > 1e-6
  nll, _ = robust_objectives.per_image_nll(jax.nn.log_softmax(logits, -1),
                                           jnp.asarray(after["label"]))
  if objective == "robust":  # Σ softmax(η ℓ) ℓ over the images, between mean and max ℓ
    w = np.exp(2.0 * np.asarray(nll)) / np.sum(np.exp(2.0 * np.asarray(nll)))
    np.testing.assert_allclose(robust, np.sum(w * np.asarray(nll)), rtol=1e-5)
    assert np.mean(nll) < float(robust) < np.max(nll)
  # Gradients reach the gate, never the frozen experts.
  assert any(np.any(g != 0) for g in jax.tree.leaves(nnx.state(grads, nnx.PathContains("gate"))))
  assert all(np.all(g == 0) for g in jax.tree.leaves(
      nnx.state(grads, nnx.PathContains("experts"))))


def test_each_expert_is_calibrated_on_its_own_domain_or_on_all_val_pixels():
  from moe_jax import calibrate
  from test_evaluate import smoke_config
  config = smoke_config()  # A2D2: all_val = highway_val + urban_val, experts (highway, urban)
  part_of = np.asarray([0, 0, 1, 1, 1])
  highway, urban = calibrate.expert_pixels(config, part_of)
  np.testing.assert_array_equal(highway, [True, True, False, False, False])
  np.testing.assert_array_equal(urban, [False, False, True, True, True])
  config.calibrate.expert_region = "all"
  assert all(mask.all() for mask in calibrate.expert_pixels(config, part_of))


def test_the_grid_stride_is_the_smallest_that_keeps_the_grid_within_max_pixels():
  from moe_jax import calibrate
  assert calibrate.grid_stride(60, (80, 128), 2 ** 20) == 1   # 614400 pixels fit
  assert calibrate.grid_stride(60, (80, 128), 2 ** 18) == 2   # 153600 <= 262144 < 614400
  assert calibrate.grid_stride(1, (912, 912), 2 ** 18) == 2   # 456² = 207936
  assert calibrate.grid_stride(1000, (912, 912), 2 ** 18) == 57  # 16² x 1000 = 256000
  assert 1000 * math.ceil(912 / 56) ** 2 > 2 ** 18


@pytest.mark.parametrize("key, value, message", [
    ("train.gate_objectives", ("erm", "dro"), "config key train.gate_objectives=('erm', 'dro') "
     "must name distinct objectives from ('erm', 'robust', 'robust_filtered')"),
    ("train.objective_gates", ("pixel",), "config key train.objective_gates=('pixel',) must "
     "name gates of model.gates"),
    ("train.robust.unit", "patch", "config key train.robust.unit='patch'; use 'image' or "
     "'pixel'"),
    ("train.robust.warmup", 1.0, "config key train.robust.warmup=1.0 must be a fraction"),
    ("calibrate.bounds", (2.0, 10.0), "config key calibrate.bounds=(2.0, 10.0) must be "
     "(lowest, highest) temperatures with 0 < lowest <= 1 <= highest"),
    ("calibrate.expert_region", "mine", "config key calibrate.expert_region='mine'; use "
     "'domain' or 'all'"),
    ("eval.variant_routers", ("hard",), "config key eval.variant_routers=('hard',) must name "
     "routers of"),
])
def test_bad_calibration_and_objective_config_says_which_key(key, value, message):
  from moe_jax import config_checks
  from test_evaluate import smoke_config
  config = smoke_config()
  *path, last = key.split(".")
  section = config
  for part in path:
    section = section[part]
  section[last] = value
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(config)
  assert str(error.value).startswith(message), str(error.value)


def test_evaluation_leaves_the_calibrated_methods_out_without_a_matching_fit(tmp_path, capsys):
  from moe_jax import calibrate
  metas = {"gate_simple": {"step": 8}}
  assert calibrate.load(tmp_path, metas) is None
  assert "no calibration.json (the calibrate stage has not run)" in capsys.readouterr().out
  fitted = {"checkpoints": {"gate_simple": 4}, "expert_temperatures": {}, "aggregate": {}}
  (tmp_path / calibrate.CALIBRATION_FILE).write_text(json.dumps(fitted))
  assert calibrate.load(tmp_path, metas) is None
  assert "was fitted on other checkpoints" in capsys.readouterr().out
  fitted["checkpoints"] = {"gate_simple": 8}
  (tmp_path / calibrate.CALIBRATION_FILE).write_text(json.dumps(fitted))
  assert calibrate.load(tmp_path, metas) == fitted
