"""Quantile thresholds from uncertainty histograms against np.quantile of the pooled maps,
and the conditional-correctness ratios at them against a per-pixel numpy count."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import metrics
from moe_jax.quantile_thresholds import (conditional_correctness_at_quantiles,
                                         quantile_from_histogram)

SHAPE = (4, 50, 100)  # one shape for every map: the histogram compiles once
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


def _map(name: str, seed: int = 0):
  """(u float32 SHAPE in [0, 1], correct bool SHAPE, valid bool SHAPE) of a named case."""
  rng = np.random.default_rng(seed)
  n = int(np.prod(SHAPE))
  if name == "uniform":
    u = rng.random(n)
  elif name == "beta":
    u = rng.beta(0.5, 3.0, n)
  elif name == "ties_at_0_and_1":  # 30% exact zeros, 10% exact ones
    u = rng.random(n)
    kind = rng.random(n)
    u[kind < 0.3] = 0.0
    u[kind > 0.9] = 1.0
  elif name == "mostly_zero":  # 60% zeros, 39% ones: the quantiles sit on ties
    u = rng.choice([0.0, 1.0, 0.5], n, p=[0.6, 0.39, 0.01])
  elif name == "two_values_with_a_gap":  # the median interpolates across the gap
    u = np.where(rng.random(n) < 0.5, 0.0, 0.9)
  elif name == "on_and_near_edges":
    edge = rng.integers(0, 1001, n) / 1000
    u = np.clip(edge + rng.choice([-1e-7, 0.0, 1e-7], n), 0.0, 1.0)
  elif name == "mi_like":  # all in [0, 0.19]
    u = 0.19 * rng.beta(2.0, 5.0, n)
  elif name == "constant":
    u = np.full(n, 0.37)
  else:
    raise ValueError(name)
  u = u.astype(np.float32).reshape(SHAPE)
  correct = rng.random(SHAPE) < 1.0 - 0.8 * u  # errors where u is high
  valid = rng.random(SHAPE) > 0.1
  return u, correct, valid


@functools.partial(jax.jit, static_argnums=3)
def _jit_histogram(u, correct, valid, num_bins):
  return metrics.uncertainty_histogram(u, correct, valid, num_bins)


def _histogram(u, correct, valid, num_bins=metrics.NUM_BINS) -> np.ndarray:
  """int64 [2, num_bins] `metrics.uncertainty_histogram` of numpy maps."""
  return np.asarray(_jit_histogram(jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid),
                                   num_bins), np.int64)


MAPS = ("uniform", "beta", "ties_at_0_and_1", "mostly_zero", "two_values_with_a_gap",
        "on_and_near_edges", "mi_like", "constant")


def _assert_within_one_bin(t, u_pooled, q, num_bins):
  exact = np.quantile(u_pooled.astype(np.float64), q)
  np.testing.assert_array_less(np.abs(t - exact), 1.0 / num_bins + 1e-7)
  k = np.asarray(t) * num_bins
  np.testing.assert_array_equal(k, np.rint(k))  # a bin edge
  assert np.all((k >= 0) & (k < num_bins))  # t < 1, which the histogram can count


@pytest.mark.parametrize("name", MAPS)
def test_threshold_is_np_quantile_to_one_bin(name):
  u, correct, valid = _map(name)
  histogram = _histogram(u, correct, valid)
  quantiles = np.concatenate([QUANTILES, np.random.default_rng(1).random(40)])
  t = quantile_from_histogram(histogram, quantiles)
  assert t.shape == quantiles.shape
  _assert_within_one_bin(t, u[valid], quantiles, metrics.NUM_BINS)
  for q, t_q in zip(QUANTILES, t):  # a scalar q gives the same float
    scalar = quantile_from_histogram(histogram, q)
    assert isinstance(scalar, float) and scalar == t_q
  # The pooled [num_bins] histogram gives the same thresholds.
  np.testing.assert_array_equal(quantile_from_histogram(histogram.sum(0), quantiles), t)


@pytest.mark.parametrize("num_bins", [10, 1000])
def test_threshold_is_np_quantile_to_one_bin_on_small_maps(num_bins):
  """Small maps (1 to 64 pixels) of a few values, edges and near-edges included."""
  rng = np.random.default_rng(2)
  values = np.concatenate([[0.0, 1.0, 0.3, 0.05, 0.95], rng.random(3),
                           np.nextafter(np.float32([0.3, 0.5]), np.float32(0))])
  for _ in range(100):
    size = int(rng.integers(1, 65))
    u = np.zeros(64, np.float32)
    u[:size] = rng.choice(values, size) if rng.random() < 0.7 else rng.random(size)
    valid = np.arange(64) < size
    histogram = _histogram(u, rng.random(64) < 0.5, valid, num_bins)
    quantiles = np.concatenate([QUANTILES, rng.random(5)])
    _assert_within_one_bin(quantile_from_histogram(histogram, quantiles), u[valid],
                           quantiles, num_bins)


def test_threshold_of_the_documented_examples():
  n = int(np.prod(SHAPE))
  valid = np.ones(SHAPE, bool)
  correct = np.ones(SHAPE, bool)
  # Half at 0, half at 0.9: every t in (0, 0.9] has half the pixels below it; the median
  # interpolates to 0.45.
  gap = np.where(np.arange(n) % 2 == 0, 0.0, 0.9).astype(np.float32).reshape(SHAPE)
  assert quantile_from_histogram(_histogram(gap, correct, valid), 0.5) == 0.45
  # 40% zeros: the 0.1-quantile is 0 and no pixel lies below t = 0 (ties are not split).
  zeros = np.where(np.arange(n) % 5 < 2, 0.0, 0.7).astype(np.float32).reshape(SHAPE)
  assert quantile_from_histogram(_histogram(zeros, correct, valid), 0.1) == 0.0
  # All at 0.37: both neighbouring edges are within one bin; t is the one with its
  # fraction below (0 or 1) closer to q: 0.37 for q <= 0.5, 0.371 above.
  constant = np.full(SHAPE, 0.37, np.float32)
  assert quantile_from_histogram(_histogram(constant, correct, valid), 0.2) == 0.37
  assert quantile_from_histogram(_histogram(constant, correct, valid), 0.9) == 0.371


def test_fraction_below_threshold_is_close_to_q_for_a_continuous_map():
  u, correct, valid = _map("uniform")
  histogram = _histogram(u, correct, valid)
  t = quantile_from_histogram(histogram, np.array(QUANTILES))
  fraction = np.mean(u[valid][None, :] < np.float32(t)[:, None], axis=1)
  # Uniform over ~18 000 pixels: ~18 per bin, t within one bin of the quantile.
  np.testing.assert_allclose(fraction, QUANTILES, atol=2.5e-3)


@pytest.mark.parametrize("name", MAPS)
def test_ratios_at_quantiles_match_a_per_pixel_count(name):
  u, correct, valid = _map(name, seed=3)
  result = conditional_correctness_at_quantiles(_histogram(u, correct, valid), QUANTILES)
  np.testing.assert_array_equal(result["quantiles"], QUANTILES)
  u, ok = u[valid], correct[valid]
  for j, t in enumerate(result["thresholds"]):
    certain = u < np.float32(t)  # the convention: certain <=> u < t, strict, in float32
    n_ac = np.sum(certain & ok)
    n_ic = np.sum(certain & ~ok)
    n_au = np.sum(~certain & ok)
    n_iu = np.sum(~certain & ~ok)
    expected = {
        "p_accurate_given_certain": n_ac / (n_ac + n_ic) if n_ac + n_ic else np.nan,
        "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu) if n_ic + n_iu else np.nan,
        "pavpu": (n_ac + n_iu) / u.size,
        "n_ac": n_ac, "n_ic": n_ic, "n_au": n_au, "n_iu": n_iu,
    }
    for key, value in expected.items():
      np.testing.assert_allclose(result[key][j], value, rtol=1e-12, err_msg=f"{key} q={j}")


def test_measure_in_a_narrow_range_is_informative_at_its_median():
  """The issue's MI: values in [0, 0.19] are all "certain" at t = 0.49, so
  p(uncertain|inaccurate) = 0 there, but not at the measure's median."""
  u, correct, valid = _map("mi_like", seed=4)
  assert u.max() <= 0.19
  histogram = _histogram(u, correct, valid)
  fixed = metrics.conditional_correctness_from_histogram(histogram, np.array([0.49]))
  assert fixed["p_uncertain_given_inaccurate"][0] == 0.0
  result = conditional_correctness_at_quantiles(histogram, (0.5,))
  assert 0.0 < result["thresholds"][0] < 0.19
  # The errors lie at high u, so well over half of them are above the median.
  assert 0.55 < result["p_uncertain_given_inaccurate"][0] < 1.0
  assert 0.0 < result["pavpu"][0] < 1.0


def test_empty_histogram_gives_nan():
  empty = np.zeros((2, metrics.NUM_BINS), np.int64)
  assert np.isnan(quantile_from_histogram(empty, 0.5))
  assert np.all(np.isnan(quantile_from_histogram(empty, np.array(QUANTILES))))
  result = conditional_correctness_at_quantiles(empty, QUANTILES)
  for key in ("thresholds", "p_accurate_given_certain", "p_uncertain_given_inaccurate",
              "pavpu"):
    assert np.all(np.isnan(result[key])), key
  np.testing.assert_array_equal(result["n_ac"] + result["n_iu"], 0)


@pytest.mark.parametrize("q", [-0.1, 1.5, np.nan, [0.5, 1.01]])
def test_quantile_outside_zero_one_is_refused(q):
  histogram = np.ones((2, metrics.NUM_BINS), np.int64)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    quantile_from_histogram(histogram, q)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    conditional_correctness_at_quantiles(histogram, np.atleast_1d(q))
