"""Uncertainty measures: hand-computed values, an independent numpy implementation, and
property tests (ranges, invariances, edge cases)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from moe_jax import measures, uncertainty as u
from moe_jax.models import routers


def numpy_entropy(p):
  """H(p) over the last axis in numpy, 0 log 0 = 0."""
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def numpy_measures(probs, weights=None):
  """Direct float64 formulas, written independently of the running sums."""
  probs = np.asarray(probs, np.float64)
  s = probs.shape[0]
  w = np.ones(probs.shape[:-1]) if weights is None else np.broadcast_to(
      np.asarray(weights, np.float64), probs.shape[:-1])
  w = w / w.sum(0)
  mean = np.einsum("s...,s...c->...c", w, probs)
  pe = numpy_entropy(mean)
  mi = pe - sum(w[k] * numpy_entropy(probs[k]) for k in range(s))
  c = np.argmax(mean, -1)
  at = np.take_along_axis(probs, np.broadcast_to(c[None, ..., None], probs.shape[:-1] + (1,)),
                          -1)[..., 0]
  ev = np.sqrt(np.sum(w * (at - np.take_along_axis(mean, c[..., None], -1)[..., 0]) ** 2, 0))
  return pe, mi, ev


def test_two_confident_disagreeing_members_by_hand():
  probs = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # S=2, one pixel, C=2
  out = u.measures(u.moments(probs))
  np.testing.assert_allclose(out["predictive_entropy"], [np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(out["mutual_information"], [np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(out["expert_variance"], [0.5], rtol=1e-6)
  norm = measures.normalised(out, num_classes=2)
  np.testing.assert_allclose([norm[k][0] for k in ("predictive_entropy", "mutual_information",
                                                   "expert_variance")], [1, 1, 1], rtol=1e-6)


def test_weighted_members_by_hand():
  probs = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
  weights = jnp.array([[0.75], [0.25]])
  out = u.measures(u.moments(probs, weights))
  pe = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose(out["predictive_entropy"], [pe], rtol=1e-6)
  np.testing.assert_allclose(out["mutual_information"], [pe], rtol=1e-6)  # members certain
  np.testing.assert_allclose(out["expert_variance"], [np.sqrt(0.1875)], rtol=1e-6)
  assert int(out["prediction"][0]) == 0


def test_matches_an_independent_numpy_implementation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3, 5, 7)) * 3
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  weights = rng.random((4, 3, 1))  # per image, broadcast over the pixels
  for w in (None, weights):
    pe, mi, ev = numpy_measures(probs, w)
    w_j = None if w is None else jnp.asarray(w)
    np.testing.assert_allclose(u.predictive_entropy(jnp.asarray(probs), w_j), pe, atol=1e-5)
    np.testing.assert_allclose(u.mutual_information(jnp.asarray(probs), w_j), mi, atol=1e-5)
    np.testing.assert_allclose(u.expert_variance(jnp.asarray(probs), w_j), ev, atol=1e-5)


def test_streamed_members_equal_all_at_once():
  rng = np.random.default_rng(1)
  probs = jnp.asarray(rng.dirichlet(np.ones(6), size=(5, 2, 4)), jnp.float32)  # S=5
  weights = jnp.asarray(rng.random((5, 2, 1)), jnp.float32)
  streamed = u.measures(jax.jit(lambda: u.scan_members(lambda s: probs[s], 5, weights))())
  direct = u.measures(u.moments(probs, weights))
  for key in direct:
    np.testing.assert_allclose(streamed[key], direct[key], atol=1e-6)


probs_strategy = st.integers(1, 5).flatmap(lambda s: st.integers(2, 6).flatmap(
    lambda c: hnp.arrays(np.float64, (s, 3, c), elements=st.floats(0, 1))))


def to_probs(raw):
  raw = raw + 1e-3 * (raw.sum(-1, keepdims=True) == 0)  # avoid all-zero rows
  return jnp.asarray(raw / raw.sum(-1, keepdims=True), jnp.float32)


# One compiled program per shape (eager, each operation compiles on its own).
measures_of = jax.jit(lambda probs, weights: u.measures(u.moments(probs, weights)))


@settings(max_examples=30, deadline=None)
@given(probs_strategy, st.randoms(use_true_random=False))
def test_ranges_and_permutation_invariance(raw, random):
  probs = to_probs(raw)
  s, _, c = probs.shape
  weights = jnp.asarray(np.array([random.random() + 0.01 for _ in range(s)])[:, None])
  for w in (None, weights):
    out = measures_of(probs, w)
    pe, mi, ev = (np.asarray(out[k]) for k in
                  ("predictive_entropy", "mutual_information", "expert_variance"))
    assert np.all(mi >= 0) and np.all(mi <= pe + 1e-5) and np.all(pe <= np.log(c) + 1e-5)
    assert np.all(ev >= 0) and np.all(ev <= 0.5 + 1e-6)
    order = list(range(s))
    random.shuffle(order)
    permuted = measures_of(probs[jnp.array(order)], None if w is None else w[jnp.array(order)])
    for key in ("predictive_entropy", "mutual_information", "expert_variance"):
      np.testing.assert_allclose(permuted[key], out[key], atol=2e-6)
    norm = measures.normalised(out, num_classes=c)
    assert all(np.all((0 <= norm[k]) & (norm[k] <= 1)) for k in
               ("predictive_entropy", "mutual_information", "expert_variance"))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float64, (3, 5), elements=st.floats(0, 1)), st.integers(1, 6))
def test_identical_members_have_no_disagreement(raw, s):
  probs = jnp.broadcast_to(to_probs(raw), (s, 3, 5))
  out = u.measures(u.moments(probs))
  np.testing.assert_array_equal(out["expert_variance"], 0.0)
  np.testing.assert_allclose(out["mutual_information"], 0.0, atol=1e-6)
  np.testing.assert_allclose(out["predictive_entropy"], u.entropy(probs[0]), atol=1e-6)


def test_weights_are_normalised_over_members():
  rng = np.random.default_rng(2)
  probs = jnp.asarray(rng.dirichlet(np.ones(4), size=(3, 6)), jnp.float32)
  w = jnp.asarray(rng.random((3, 6)), jnp.float32)
  a, b = u.measures(u.moments(probs, w)), u.measures(u.moments(probs, 7.0 * w))
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_logits_exact_probabilities_and_bfloat16_stay_finite(dtype):
  logits = jnp.array([[[1e4, -1e4, 0.0]], [[-1e4, 1e4, 0.0]], [[0.0, 0.0, 0.0]]], dtype)
  probs = u.probabilities(logits)
  assert probs.dtype == jnp.float32 and set(np.unique(np.asarray(probs[:2]))) <= {0.0, 1.0}
  out = measures.normalised(u.measures(u.moments(probs.astype(dtype))), num_classes=3)
  for key in ("predictive_entropy", "mutual_information", "expert_variance"):
    assert np.all(np.isfinite(out[key])) and np.all((0 <= out[key]) & (out[key] <= 1)), key
  one_member = u.measures(u.moments(probs[:1]))  # one certain member: no uncertainty at all
  assert float(one_member["predictive_entropy"][0]) == 0.0
  assert float(one_member["expert_variance"][0]) == 0.0


def _routing(weights, unit):
  weights = jnp.asarray(weights)[None]  # R = 1
  return routers.Routing(weights, jnp.log(weights), unit=unit)


def test_gate_entropy_of_image_class_and_pixel_routers():
  simple = [[0.5, 0.5], [1.0, 0.0]]  # [B=2, K=2]
  prediction = jnp.array([[[0, 1]], [[1, 1]]])  # [B=2, H=1, W=2]
  np.testing.assert_allclose(routers.gate_entropy_map(_routing(simple, "image"), prediction),
                             [[[np.log(2)] * 2], [[0.0] * 2]], atol=1e-7)
  classwise = [[[1.0, 0.0], [0.5, 0.5]], [[0.9, 0.1], [0.0, 1.0]]]  # [B, C=2, K]
  expected = [[[0.0, np.log(2)]], [[0.0, 0.0]]]  # the predicted class's gate
  np.testing.assert_allclose(routers.gate_entropy_map(_routing(classwise, "class"), prediction),
                             expected, atol=1e-7)
  pixel = [[[[0.5, 0.5], [0.0, 1.0]]], [[[1.0, 0.0], [0.25, 0.75]]]]  # [B, H=1, W=2, K]
  h = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
  np.testing.assert_allclose(routers.gate_entropy_map(_routing(pixel, "pixel"), prediction),
                             [[[np.log(2), 0.0]], [[0.0, h]]], atol=1e-7)
  norm = measures.normalised({"gate_entropy": jnp.array([np.log(2), 0.0])}, num_classes=3,
                             num_experts=2)
  np.testing.assert_allclose(norm["gate_entropy"], [1.0, 0.0], atol=1e-6)


def test_gate_entropy_of_several_routing_samples_is_that_of_their_mean():
  samples = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # R=2 confident, opposite samples; B=1
  routing = routers.Routing(samples, jnp.log(samples), unit="image")
  ge = routers.gate_entropy_map(routing, jnp.zeros((1, 2, 2), jnp.int32))
  np.testing.assert_allclose(ge, np.full((1, 2, 2), np.log(2)), atol=1e-7)


@pytest.mark.parametrize("samples", [1, 4])
def test_routing_decomposition_matches_numpy_and_one_sample_has_no_routing_epistemic(samples):
  rng = np.random.default_rng(samples)
  probs = rng.dirichlet(np.ones(5), (3, 7)).astype(np.float32)           # [K, N, C]
  weights = rng.dirichlet(np.ones(3), (samples, 7)).transpose(0, 2, 1)  # [R, K, N]
  weights = weights.astype(np.float32)
  out = jax.jit(u.routing_decomposition)(probs, weights)
  p64, w64 = probs.astype(np.float64), weights.astype(np.float64)
  mean_w = w64.mean(0)
  total = numpy_entropy(np.einsum("kn,knc->nc", mean_w, p64))
  sample = np.mean([numpy_entropy(np.einsum("kn,knc->nc", w, p64)) for w in w64], 0)
  aleatoric = np.sum(mean_w * numpy_entropy(p64), 0)
  np.testing.assert_allclose(out["total"], total, atol=2e-6)
  np.testing.assert_allclose(out["routing_epistemic"], np.maximum(total - sample, 0), atol=2e-6)
  np.testing.assert_allclose(out["expert_disagreement"], sample - aleatoric, atol=2e-6)
  np.testing.assert_allclose(out["aleatoric"], aleatoric, atol=2e-6)
  if samples == 1:  # a deterministic router: exactly none, whatever the compiler rounds
    np.testing.assert_array_equal(out["routing_epistemic"], 0.0)
  else:
    assert np.all(np.asarray(out["routing_epistemic"]) > 0)
