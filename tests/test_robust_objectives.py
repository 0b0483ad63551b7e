"""The robust gate objectives against their closed forms (gradients, η limits), hand-computed
regret / disagreement values and plain numpy loops."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from moe_jax import robust_objectives

# Everything runs jitted: one compilation per test instead of one per primitive (eager), which
# also checks that the functions trace.
_STATIC = ("detach", "axis_name")


ro = types.SimpleNamespace(  # the module's functions, jitted
    tilted_weights=jax.jit(robust_objectives.tilted_weights, static_argnames=_STATIC),
    robust_loss=jax.jit(robust_objectives.robust_loss, static_argnames=_STATIC),
    masked_mean=jax.jit(robust_objectives.masked_mean, static_argnames=("axis_name",)),
    robust_filtered_loss=jax.jit(robust_objectives.robust_filtered_loss,
                                 static_argnames=_STATIC),
    filtered_set=jax.jit(robust_objectives.filtered_set),
    pixel_nll=jax.jit(robust_objectives.pixel_nll),
    per_image_nll=jax.jit(robust_objectives.per_image_nll),
    pixel_regret_and_disagreement=jax.jit(robust_objectives.pixel_regret_and_disagreement),
    regret_and_disagreement=jax.jit(robust_objectives.regret_and_disagreement))


def _grad(f):
  return jax.jit(jax.grad(f))


def _value_and_grad(f):
  return jax.jit(jax.value_and_grad(f))


def _random_losses(n, seed=0):
  return np.random.default_rng(seed).gamma(2.0, 0.7, n)


# ------------------------------------------------------------------ tilted weights / loss

@pytest.mark.parametrize("eta", [0.5, 2.0, 7.0])
def test_gradient_through_the_weights_matches_the_closed_form(eta):
  valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
  with jax.enable_x64(True):
    losses = jnp.asarray(_random_losses(10))
    grad = _grad(lambda l: ro.robust_loss(l, eta, valid))(losses)
    grad_detached = _grad(lambda l: ro.robust_loss(l, eta, valid, detach=True))(losses)
    assert grad.dtype == jnp.float64
    grad, grad_detached, l = np.asarray(grad), np.asarray(grad_detached), np.asarray(losses)
  w = np.where(valid, special.softmax(np.where(valid, eta * l, -np.inf)), 0.0)
  mean_w = np.sum(w * l)
  np.testing.assert_allclose(grad, w * (1 + eta * (l - mean_w)), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(grad_detached, w, rtol=1e-12, atol=1e-14)
  # Units more than 1/η below the weighted mean are pushed up (negative coefficients).
  np.testing.assert_array_equal(grad < 0, valid & (l < mean_w - 1 / eta))
  if eta >= 2.0:
    assert np.any(grad < 0)
  assert np.all(grad_detached >= 0)


def test_weights_are_the_softmax_of_the_valid_units_and_sum_to_one():
  losses = _random_losses(7, seed=1)
  valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
  w = ro.tilted_weights(losses, 2.0, valid)
  expected = np.zeros(7)
  expected[valid] = special.softmax(2.0 * losses[valid])
  np.testing.assert_allclose(w, expected, rtol=1e-5)
  assert np.all(np.asarray(w)[~valid] == 0.0)
  np.testing.assert_allclose(np.sum(w), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ro.robust_loss(losses, 2.0, valid),
                             np.sum(expected * losses), rtol=1e-5)


def test_weights_jacobian_is_the_softmax_jacobian_unless_detached():
  losses = _random_losses(6, seed=11).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 1], bool)
  w = np.asarray(ro.tilted_weights(losses, 2.0, valid))
  jacobian = jax.jit(jax.jacobian(lambda l: ro.tilted_weights(l, 2.0, valid)))(losses)
  expected = 2.0 * (np.diag(w) - np.outer(w, w))      # zero rows/columns for the invalid unit
  np.testing.assert_allclose(jacobian, expected, atol=1e-6)
  detached = jax.jit(jax.jacobian(lambda l: ro.tilted_weights(l, 2.0, valid, detach=True)))
  np.testing.assert_array_equal(detached(losses), 0.0)


def test_small_eta_is_erm_in_value_and_gradient():
  losses = jnp.asarray(_random_losses(9, seed=2), jnp.float32)
  valid = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1], bool)
  mean = np.mean(np.asarray(losses)[valid])
  np.testing.assert_allclose(ro.robust_loss(losses, 1e-6, valid), mean, rtol=1e-5)
  np.testing.assert_allclose(ro.masked_mean(losses, valid), mean, rtol=1e-6)
  grad = _grad(lambda l: ro.robust_loss(l, 1e-6, valid))(losses)
  np.testing.assert_allclose(grad, valid / valid.sum(), rtol=1e-5, atol=1e-7)


def test_large_eta_picks_the_largest_valid_loss():
  losses = np.array([0.3, 2.5, 1.1, 9.0, 2.2])
  valid = np.array([1, 1, 1, 0, 1], bool)   # the overall maximum (9.0) is invalid
  np.testing.assert_allclose(ro.robust_loss(losses, 300.0, valid), 2.5, rtol=1e-6)
  w = ro.tilted_weights(losses, 300.0, valid)
  np.testing.assert_allclose(w, [0, 1, 0, 0, 0], atol=1e-6)
  grad = _grad(lambda l: ro.robust_loss(jnp.asarray(l), 300.0, valid, detach=True))(
      jnp.asarray(losses, jnp.float32))
  np.testing.assert_allclose(grad, [0, 1, 0, 0, 0], atol=1e-6)


def test_invalid_units_do_not_change_value_or_gradient_even_when_nan_or_inf():
  losses = _random_losses(6, seed=3).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 0, 1], bool)
  kept = losses[valid]
  value_and_grad = _value_and_grad(lambda l, v: ro.robust_loss(l, 2.0, v))
  kept_value, kept_grad = value_and_grad(kept, np.ones(kept.shape, bool))
  for filler in (0.0, 1e3, np.inf, np.nan):
    value, grad = value_and_grad(jnp.asarray(np.where(valid, losses, filler)), valid)
    np.testing.assert_allclose(value, kept_value, rtol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid] == 0.0)
    np.testing.assert_allclose(np.asarray(grad)[valid], kept_grad, rtol=1e-5)


def test_no_valid_unit_gives_zero_weights_and_a_finite_zero_loss():
  losses = jnp.asarray([1.0, np.nan, 3.0])
  valid = np.zeros(3, bool)
  w = ro.tilted_weights(losses, 2.0, valid)
  np.testing.assert_array_equal(w, [0.0, 0.0, 0.0])
  value, grad = _value_and_grad(lambda l: ro.robust_loss(l, 2.0, valid))(losses)
  assert value == 0.0
  np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0])
  assert ro.masked_mean(losses, valid) == 0.0


def test_pixel_units_need_not_be_flattened_and_eta_may_be_traced():
  losses = _random_losses(2 * 3 * 4, seed=4).reshape(2, 3, 4).astype(np.float32)
  valid = np.random.default_rng(5).random(losses.shape) > 0.3
  flat = ro.robust_loss(losses.ravel(), 2.0, valid.ravel())
  np.testing.assert_allclose(ro.robust_loss(losses, jnp.float32(2.0), valid), flat, rtol=1e-6)


def test_axis_name_reduces_over_the_shards_as_over_the_global_batch():
  losses = _random_losses(12, seed=6).astype(np.float32)
  valid = np.random.default_rng(7).random(12) > 0.25
  shards = lambda x: x.reshape(3, 4)
  per_shard = jax.jit(jax.vmap(lambda l, v: ro.robust_loss(l, 2.0, v, axis_name="data"),
                               axis_name="data"))(shards(losses), shards(valid))
  np.testing.assert_allclose(per_shard, np.full(3, ro.robust_loss(losses, 2.0, valid)),
                             rtol=1e-6)
  w = jax.jit(jax.vmap(lambda l, v: ro.tilted_weights(l, 2.0, v, axis_name="data"),
                       axis_name="data"))(shards(losses), shards(valid))
  np.testing.assert_allclose(w.ravel(), ro.tilted_weights(losses, 2.0, valid), rtol=1e-6)


# ------------------------------------------------------------------ NLL per pixel / image

def test_per_image_nll_matches_numpy_with_ignored_pixels():
  rng = np.random.default_rng(8)
  log_probs = special.log_softmax(rng.normal(size=(3, 5, 6, 4)), axis=-1)
  labels = rng.integers(0, 4, (3, 5, 6))
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[2] = 255                                   # an image without a labelled pixel
  nll, valid = ro.per_image_nll(log_probs.astype(np.float32), labels.astype(np.uint8))
  expected = np.zeros(3)
  for b in range(2):
    values = [-log_probs[b, i, j, labels[b, i, j]]
              for i in range(5) for j in range(6) if labels[b, i, j] != 255]
    expected[b] = np.mean(values)
  np.testing.assert_allclose(nll, expected, rtol=1e-5)
  np.testing.assert_array_equal(valid, [True, True, False])

  pixel, pixel_valid = ro.pixel_nll(log_probs, labels)
  np.testing.assert_array_equal(pixel_valid, labels != 255)
  assert np.all(np.asarray(pixel)[labels == 255] == 0.0)
  b, i, j = np.argwhere(labels != 255)[0]
  np.testing.assert_allclose(pixel[b, i, j], -log_probs[b, i, j, labels[b, i, j]], rtol=1e-5)


# ------------------------------------------------------------------ Robust Filtered

def _tiny_example():
  """K = 2 experts, C = 2 classes, one image of 1x3 pixels; the third pixel is ignored.

  p̄ = Σ_k r_k p_k. Pixel a (label 0): p1 = (.8, .2), p2 = (.6, .4), r = (.5, .5),
  p̄ = (.7, .3). Pixel b (label 1): p1 = (.4, .6), p2 = (.9, .1), r = (.25, .75),
  p̄ = (.775, .225). Pixel c (255): p1 = (.5, .5), p2 = (.1, .9), r = (.5, .5).
  """
  p1 = np.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
  p2 = np.array([[0.6, 0.4], [0.9, 0.1], [0.1, 0.9]])
  r = np.array([[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]])
  mix = r[:, :1] * p1 + r[:, 1:] * p2
  shape = (1, 1, 3)
  return (np.log(mix).reshape(*shape, 2), np.log(np.stack([p1, p2])).reshape(2, *shape, 2),
          r.reshape(*shape, 2), np.array([0, 1, 255]).reshape(shape))


def test_regret_and_disagreement_by_hand():
  mix_lp, expert_lp, weights, labels = _tiny_example()
  regret, dis, valid = ro.pixel_regret_and_disagreement(mix_lp, expert_lp, weights, labels)
  # a: −log .7 + log .8; b: −log .225 + log .6 (expert 1 is best for both).
  np.testing.assert_allclose(regret[0, 0], [np.log(8 / 7), np.log(8 / 3), 0.0], rtol=1e-5)
  # a: .5·(.1² + .1²) + .5·(.1² + .1²) = .02; b: .25·2·.375² + .75·2·.125² = .09375; c would
  # be .08 but is ignored.
  np.testing.assert_allclose(dis[0, 0], [0.02, 0.09375, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(valid[0, 0], [True, True, False])

  image_regret, image_dis = ro.regret_and_disagreement(mix_lp, expert_lp, weights, labels)
  np.testing.assert_allclose(image_regret, [(np.log(8 / 7) + np.log(8 / 3)) / 2], rtol=1e-5)
  np.testing.assert_allclose(image_dis, [(0.02 + 0.09375) / 2], rtol=1e-5)
  # An image routing [B, 1, 1, K] broadcasts to every pixel.
  _, dis_b = ro.regret_and_disagreement(mix_lp, expert_lp, np.array([[[[0.5, 0.5]]]]), labels)
  assert dis_b.shape == (1,)


def _random_experts(rng, k=3, shape=(2, 4, 5), c=4):
  expert_lp = special.log_softmax(rng.normal(size=(k, *shape, c)), axis=-1)
  weights = special.softmax(rng.normal(size=(*shape, k)), axis=-1)
  labels = rng.integers(0, c, shape)
  labels[rng.random(shape) < 0.2] = 255
  return expert_lp, weights, labels


def test_regret_is_zero_when_the_mixture_is_the_best_expert():
  rng = np.random.default_rng(9)
  expert_lp, weights, labels = _random_experts(rng)
  picked = np.take_along_axis(expert_lp, np.where(labels == 255, 0, labels)[None, ..., None],
                              axis=-1)[..., 0]
  best = np.argmax(picked, axis=0)                       # the best expert of each pixel
  mix_lp = np.take_along_axis(expert_lp, best[None, ..., None], axis=0)[0]
  regret, _, _ = ro.pixel_regret_and_disagreement(mix_lp, expert_lp, weights, labels)
  np.testing.assert_array_equal(regret, 0.0)
  # ...and positive where the mixture is worse than the best expert at the label.
  worst = np.argmin(picked, axis=0)
  mix_lp = np.take_along_axis(expert_lp, worst[None, ..., None], axis=0)[0]
  regret, _, valid = ro.pixel_regret_and_disagreement(mix_lp, expert_lp, weights, labels)
  differs = np.asarray(valid) & (best != worst)
  assert differs.any() and np.all(np.asarray(regret)[differs] > 0)
  # A fused mixture (logits, not probabilities) can beat every expert: regret is clipped at 0.
  sharp = np.where(np.arange(4) == np.where(labels == 255, 0, labels)[..., None], 0.0, -30.0)
  regret, _, _ = ro.pixel_regret_and_disagreement(sharp, expert_lp, weights, labels)
  np.testing.assert_array_equal(regret, 0.0)


def test_disagreement_is_zero_when_all_experts_agree():
  rng = np.random.default_rng(10)
  expert_lp, weights, labels = _random_experts(rng)
  same = np.broadcast_to(expert_lp[0], expert_lp.shape)
  regret, dis = ro.regret_and_disagreement(expert_lp[0], same, weights, labels)
  np.testing.assert_allclose(dis, 0.0, atol=1e-12)
  np.testing.assert_allclose(regret, 0.0, atol=1e-12)
  _, dis = ro.regret_and_disagreement(expert_lp[0], expert_lp, weights, labels)
  assert np.all(np.asarray(dis) > 0)


def test_filtered_set_by_hand():
  regret = np.array([0.0, 1e-5, 0.0, 0.0, 1.0, 0.0], np.float32)
  dis = np.array([0.0, 0.0, 0.02, 0.005, 0.0, 0.01], np.float32)
  valid = np.array([1, 1, 1, 1, 0, 1], bool)
  # Strict thresholds: dis = τ_d exactly is not relevant; the invalid unit never is.
  np.testing.assert_array_equal(ro.filtered_set(regret, dis, valid),
                                [False, True, True, False, False, False])
  np.testing.assert_array_equal(ro.filtered_set(regret, dis, valid, tau_r=1e-4, tau_d=0.001),
                                [False, False, True, True, False, True])


def test_robust_filtered_loss_on_a_subset_and_on_the_empty_set():
  losses = np.array([0.4, 1.7, 0.9, 2.6, 5.0, 1.2], np.float32)
  regret = np.array([0.0, 1e-3, 0.0, 0.0, 1.0, 0.0], np.float32)
  dis = np.array([0.0, 0.0, 0.05, 0.0, 0.0, 0.0], np.float32)
  valid = np.array([1, 1, 1, 1, 0, 1], bool)
  mean = np.mean(losses[valid])
  kept = losses[[1, 2]]
  expected = mean + np.sum(special.softmax(2.0 * kept) * kept)
  np.testing.assert_allclose(ro.robust_filtered_loss(losses, regret, dis, valid, 2.0),
                             expected, rtol=1e-6)
  # Gradient: 1/N for each valid unit plus the tilted gradient on the kept ones.
  grad = _grad(lambda l: ro.robust_filtered_loss(l, regret, dis, valid, 2.0))(
      jnp.asarray(losses))
  w = special.softmax(2.0 * kept)
  tilted = np.zeros(6)
  tilted[[1, 2]] = w * (1 + 2.0 * (kept - np.sum(w * kept)))
  np.testing.assert_allclose(grad, valid / valid.sum() + tilted, rtol=1e-5, atol=1e-7)

  nothing = np.zeros(6, np.float32)
  value, grad = _value_and_grad(
      lambda l: ro.robust_filtered_loss(l, nothing, nothing, valid, 2.0))(jnp.asarray(losses))
  np.testing.assert_allclose(value, 2 * mean, rtol=1e-6)
  np.testing.assert_allclose(grad, 2 * valid / valid.sum(), rtol=1e-6)
  assert ro.robust_filtered_loss(losses, regret, dis, np.zeros(6, bool)) == 0.0
