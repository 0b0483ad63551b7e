"""Post-hoc temperature scaling: identities at T = 1, recovery of a known over-confidence,
agreement with a brute-force grid search, the clamps, ignored pixels, the per-expert fit
and determinism.

One data shape ([10000, 10]) throughout, so each jitted function compiles once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses, temperature

N, C = 10000, 10


@functools.lru_cache(maxsize=None)
def _calibrated() -> tuple[np.ndarray, np.ndarray]:
  """Logits z [N, C] of a calibrated model and labels [N] drawn from softmax(z)."""
  rng = np.random.default_rng(0)
  z = (rng.normal(size=(N, C)) * 2.0).astype(np.float32)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  labels = (p.cumsum(-1) > rng.random((N, 1))).argmax(-1).astype(np.int32)
  return z, labels


_fit = jax.jit(temperature.fit_temperature)
_nll = jax.jit(temperature.nll)
_nll_and_grad = jax.jit(jax.value_and_grad(temperature.nll))


@jax.jit
def _nll_on_grid(log_temperatures, logits, labels):
  return jax.lax.map(lambda t: temperature.nll(t, logits, labels), log_temperatures,
                     batch_size=16)


def _grid_search(logits, labels) -> float:
  """argmin of the NLL over log T: a 101-point grid on [-3, 3] (step 0.06), then a
  101-point grid of step 1.2e-3 (T to 6e-4 relative) around the coarse minimum."""
  coarse = np.linspace(-3.0, 3.0, 101)
  centre = coarse[np.argmin(_nll_on_grid(jnp.asarray(coarse, jnp.float32), logits, labels))]
  fine = centre + np.linspace(-0.06, 0.06, 101)
  values = np.asarray(_nll_on_grid(jnp.asarray(fine, jnp.float32), logits, labels))
  assert 0 < np.argmin(values) < len(fine) - 1  # an interior minimum
  return float(np.exp(fine[np.argmin(values)]))


def test_unit_temperature_reproduces_the_untempered_outputs_exactly():
  z, labels = _calibrated()
  np.testing.assert_array_equal(temperature.apply(z, 1.0), z)
  experts = np.stack([z, 2 * z, -z])
  np.testing.assert_array_equal(temperature.apply(experts, jnp.ones(3)), experts)
  np.testing.assert_array_equal(_nll(0.0, z, labels), losses.cross_entropy(z, labels))


def test_apply_divides_each_expert_by_its_own_temperature():
  z, _ = _calibrated()
  experts = np.stack([z[:50], 2 * z[:50], -z[:50]]).reshape(3, 5, 10, C)
  t = np.array([0.5, 2.0, 4.0], np.float32)
  np.testing.assert_allclose(temperature.apply(experts, t),
                             experts / t[:, None, None, None], rtol=1e-6)
  np.testing.assert_allclose(temperature.apply(z, 4.0), z / 4.0, rtol=1e-6)


def test_nll_is_the_mean_over_labelled_pixels():
  z, labels = _calibrated()
  t = 1.7
  scaled = z[:100] / t
  log_p = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
  labelled = labels[:100].copy()
  labelled[::3] = 255
  keep = labelled != 255
  expected = -log_p[keep, labelled[keep]].mean()
  np.testing.assert_allclose(temperature.nll(np.log(t), z[:100], labelled), expected,
                             rtol=1e-5)


def test_over_confident_logits_are_cooled_back_by_their_factor():
  z, labels = _calibrated()
  fitted = float(_fit(5.0 * z, labels))
  assert fitted == pytest.approx(5.0, rel=0.03)
  assert _nll(np.log(fitted), 5.0 * z, labels) <= _nll(0.0, 5.0 * z, labels)


@pytest.mark.parametrize("case", ["calibrated", "random_labels", "noise_logits"])
def test_fitting_never_increases_the_nll(case):
  z, labels = _calibrated()
  rng = np.random.default_rng(1)
  if case == "random_labels":
    labels = rng.integers(0, C, N).astype(np.int32)
  elif case == "noise_logits":
    z = (rng.normal(size=(N, C)) * 0.3).astype(np.float32)
  fitted = _fit(z, labels)
  assert np.isfinite(fitted)
  assert _nll(jnp.log(fitted), z, labels) <= _nll(0.0, z, labels)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_fit_matches_a_brute_force_grid_search(scale):
  z, labels = _calibrated()
  logits = scale * z
  fitted = float(_fit(logits, labels))
  assert fitted == pytest.approx(_grid_search(logits, labels), rel=1e-2)
  assert fitted == pytest.approx(scale, rel=0.03)


def test_temperature_is_clamped_into_the_bounds():
  z, labels = _calibrated()
  # Under-confident (1/100 of the calibrated logits): the optimum is T ~ 0.01.
  assert _fit(0.01 * z, labels) == np.float32(0.1)
  # Anti-correlated logits: the NLL falls all the way to T = infinity.
  assert _fit(-z, labels) == np.float32(10.0)
  with pytest.raises(ValueError, match="bounds"):
    temperature.fit_temperature(z, labels, bounds=(0.0, 10.0))


def test_ignored_pixels_do_not_change_the_result():
  z, labels = _calibrated()
  half = N // 2
  logits = 5.0 * z
  # First half labelled, second half ignored, with garbage logits there.
  ignored = labels.copy()
  ignored[half:] = 255
  garbage = logits.copy()
  garbage[half:] = np.where(np.arange(C) % 2, np.inf, np.nan)
  zeros = logits.copy()
  zeros[half:] = 0.0
  fitted = _fit(garbage, ignored)
  assert np.isfinite(fitted)
  assert fitted == _fit(zeros, ignored)  # bit-identical: ignored values are inert
  value, grad = _nll_and_grad(jnp.log(fitted), garbage, ignored)
  assert np.isfinite(value) and np.isfinite(grad)
  # The labelled half repeated twice has the same mean NLL: the same T.
  repeated = np.concatenate([logits[:half], logits[:half]])
  twice = np.concatenate([labels[:half], labels[:half]])
  assert float(fitted) == pytest.approx(float(_fit(repeated, twice)), rel=1e-3)


def test_log_probabilities_of_zero_are_handled():
  """Fused log-probabilities may hold -inf (p underflowed to 0): off the label they
  must neither poison the gradient nor change T."""
  z, labels = _calibrated()
  log_probs = np.asarray(jax.nn.log_softmax(5.0 * z))
  rng = np.random.default_rng(2)
  zero = (np.arange(C) != labels[:, None]) & (rng.random((N, C)) < 0.1)
  with_inf = np.where(zero, -np.inf, log_probs).astype(np.float32)
  very_negative = np.where(zero, -1e4, log_probs).astype(np.float32)
  value, grad = _nll_and_grad(jnp.float32(0.5), with_inf, labels)
  assert np.isfinite(value) and np.isfinite(grad)
  fitted = float(_fit(with_inf, labels))
  assert fitted == pytest.approx(float(_fit(very_negative, labels)), rel=1e-5)
  assert fitted == pytest.approx(5.0, rel=0.05)


def test_all_ignored_returns_unit_temperature():
  z, _ = _calibrated()
  none = np.full(N, 255, np.int32)
  assert _nll(0.0, z, none) == 0.0
  assert _fit(z, none) == 1.0


def test_guard_falls_back_to_unit_temperature(monkeypatch):
  """A non-finite or worse optimiser result is replaced by T = 1 (eager: the jitted
  `_fit` has already traced the real optimiser)."""
  z, labels = _calibrated()
  z, labels = z[:500], labels[:500]
  for log_t in [np.nan, 3.0]:  # T = e^3 -> clamped 10: far worse than T = 1
    monkeypatch.setattr(temperature, "_minimise_log_temperature",
                        lambda *args, v=log_t: (jnp.float32(v), jnp.int32(0)))
    assert temperature.fit_temperature(z, labels) == 1.0
  monkeypatch.setattr(temperature, "_minimise_log_temperature",
                      lambda *args: (jnp.float32(np.log(2.0)), jnp.int32(0)))
  assert temperature.fit_temperature(2.0 * z, labels) == np.float32(2.0)  # accepted


def test_fit_is_deterministic():
  z, labels = _calibrated()
  first, second = _fit(3.0 * z, labels), _fit(3.0 * z, labels)
  assert np.asarray(first).tobytes() == np.asarray(second).tobytes()
  assert first.dtype == jnp.float32 and first.shape == ()
