"""Bayesian routers (moe_jax.models.bayesian_routers) against closed forms and limiting
cases: the Gaussian KLs against Monte Carlo, fcvr with a diagonal factor against mfvr,
σ -> 0 and an unused SWAG against the gate, der with M = 1 against the gate, vtsr at T = 1
against temp_sampling, SWAG's draws against their moments; seeds, sample counts, gradients
and every (gate, router) pair.

Compilation dominates on CPU: the experts are built once per module and run in one test
(their gradient); the other MoEs route fixed expert outputs (`FrozenExperts`) and the
router-level tests random features, so that each program compiles little but a router.
"""

import dataclasses
from pathlib import Path
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.scipy.stats import multivariate_normal

from moe_jax import losses
from moe_jax.models import bayesian_routers as br
from moe_jax.models import build, routers

A2D2_CONFIG = runpy.run_path(str(Path(__file__).parents[1] / "configs" / "a2d2.py"))
GATES = ("simple", "classwise", "pixel")
ROUTERS = tuple(br.BAYESIAN_ROUTERS)
STOCHASTIC = ("temp_sampling", "mcdr", "swagr", "mfvr", "fcvr", "vtsr")
H, W = 32, 48
SAMPLES, ENSEMBLE = 3, 2
UNIT_AXES = {"simple": (), "classwise": ("C",), "pixel": (H, W)}


def config(**routing):
  """The smoke preset at test sizes, every gate and router, routing settings overridden."""
  c = A2D2_CONFIG["get_config"]("smoke")
  c.model.width = 0.125
  c.model.aspp_channels = 8
  c.model.gate_hidden = 8
  c.model.gates = GATES
  c.model.routers = ROUTERS
  c.model.bayesian_gates = GATES
  c.eval.routing_samples = SAMPLES
  c.model.routing.ensemble = ENSEMBLE
  c.model.routing.update(routing)
  return c


def settings(**changes):
  """The routers' settings in the router-level tests: S = 4 samples, M = 3 members (the
  same in every test where possible, so that their compiled programs are shared)."""
  return dataclasses.replace(br.RoutingSettings.default(samples=4), ensemble=3, **changes)


def set_output_layer(head, bias):
  """Makes gate `head` output the constant `bias` (over its last axis) for every input:
  its last layer's kernel zero, its bias `bias` (classwise: for every class)."""
  out = head.gates.out if isinstance(head, routers.ClasswiseRouter) else head.out
  out.kernel[...] = jnp.zeros_like(out.kernel[...])
  out.bias[...] = jnp.broadcast_to(jnp.asarray(bias, out.bias[...].dtype), out.bias[...].shape)


class Cached(nnx.Variable):
  """Outputs computed once (not a parameter)."""


class FrozenExperts(nnx.Module):
  """Stands in for the experts of a built MoE: returns fixed (logits, aspp)."""

  def __init__(self, outputs):
    self.logits, self.aspp = Cached(outputs[0]), Cached(outputs[1])

  def __call__(self, images):
    return self.logits[...], self.aspp[...]


@pytest.fixture(scope="module")
def experts():
  stacked = build.experts(config(), 2)
  stacked.eval()
  return stacked


@pytest.fixture(scope="module")
def batch():
  image = jax.random.randint(jax.random.key(0), (2, H, W, 3), 0, 256).astype(jnp.uint8)
  label = jax.random.randint(jax.random.key(1), (2, H, W), 0, config().data.num_classes)
  label = label.at[:, :4].set(losses.IGNORE_LABEL)
  return {"image": image, "label": label}


@pytest.fixture(scope="module")
def expert_outputs():
  """Stand-ins for two experts' (logits [K, B, H, W, C], aspp [K, B, h, w, A]): the router
  and the fusion read nothing else of them."""
  c = config()
  logits = 3.0 * jax.random.normal(jax.random.key(2), (2, 2, H, W, c.data.num_classes))
  aspp = jax.nn.relu(jax.random.normal(
      jax.random.key(3), (2, 2, H // 16, W // 16, c.model.aspp_channels)))
  return logits, aspp


def mixture(experts, expert_outputs, gate, router, **routing):
  """build.mixture of the given gate and router, in eval mode, on the cached outputs."""
  moe = build.mixture(config(**routing), experts, gate, router)
  moe.eval()
  moe.experts = FrozenExperts(expert_outputs)
  return moe


@nnx.jit
def combine(moe, expert_logits, aspp, key):
  return moe.combine(expert_logits, aspp, key=key)


# Router-level tests: the routers on random features of the MoE's shapes.
K = 3
ARGS = routers.RouterArgs(in_ch=K * 8, feature_hw=(H // 16, W // 16), num_experts=K,
                          num_classes=5, hidden=8)


def features(seed=0, batch_size=2):
  return jax.random.normal(jax.random.key(seed), (batch_size, *ARGS.feature_hw, ARGS.in_ch))


@nnx.jit
def infer(router, x, key):
  return router(x, output_size=(H, W), key=key)


@nnx.jit
def train_call(router, x):
  return router(x, output_size=(H, W))


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_routes_eight_experts(router):
  """K = 8: the weights of every routing sample are a distribution over the 8 experts, and
  gate entropy normalised by log 8 stays in [0, 1] (1 for uniform weights)."""
  from moe_jax import measures
  args = dataclasses.replace(ARGS, in_ch=8 * 8, num_experts=8)
  model = br.make(router, "simple", args, settings(), rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, *args.feature_hw, args.in_ch))
  routing = nnx.jit(lambda r, x, key: r(x, output_size=(H, W), key=key))(
      model, x, jax.random.key(1))
  r = {"deterministic": 1, "der": 3}.get(router, 4)  # settings(): M = 3, S = 4
  assert routing.weights.shape == (r, 2, 8)
  np.testing.assert_allclose(routing.weights.sum(-1), 1.0, rtol=1e-5)
  prediction = jnp.zeros((2, 4, 4), jnp.int32)
  ge = measures.normalise("gate_entropy", routers.gate_entropy_map(routing, prediction),
                          num_classes=5, num_experts=8)
  assert ((ge >= 0) & (ge <= 1)).all()
  uniform = routers.Routing(jnp.full((1, 2, 8), 1 / 8), jnp.zeros((1, 2, 8)), unit="image")
  np.testing.assert_allclose(measures.normalise(
      "gate_entropy", routers.gate_entropy_map(uniform, prediction), 5, 8), 1.0, rtol=1e-6)


# ------------------------------------------------------------------ 1. closed-form KLs

# The pure functions, compiled once each (eager, every operation compiles on its own).
kl_diag = jax.jit(br.gaussian_kl_diag, static_argnums=2)
kl_full = jax.jit(br.gaussian_kl_full, static_argnums=2)
cholesky_factor = jax.jit(br.cholesky_factor, static_argnums=1)
swag_update = jax.jit(br.swag_update)
swag_draws = jax.jit(jax.vmap(br.swag_sample, in_axes=(None,) * 4 + (0,)))

DELTA = jnp.array([1.5, -2.0, 1.0, 2.5])
SIGMA = jnp.array([0.6, 1.2, 0.8, 1.5])
MU0 = jnp.array([1.0, -2.0, 0.0, 0.5])
MC_SAMPLES = 100_000


@jax.jit
def monte_carlo_kl(mean, cov, prior_mean, prior_cov, chol):
  """E_q[log q − log p] from MC_SAMPLES draws of q = N(mean, chol cholᵀ), and its standard
  error; the log densities are jax.scipy's."""
  z = jax.random.normal(jax.random.key(42), (MC_SAMPLES, mean.shape[0]))
  x = mean + z @ chol.T
  ratio = (multivariate_normal.logpdf(x, mean, cov)
           - multivariate_normal.logpdf(x, prior_mean, prior_cov))
  return jnp.mean(ratio), jnp.std(ratio) / np.sqrt(MC_SAMPLES)


@pytest.mark.parametrize("prior_std", [0.7, 1.0])
def test_gaussian_kl_diag_equals_monte_carlo(prior_std):
  mc, error = monte_carlo_kl(MU0 + DELTA, jnp.diag(SIGMA ** 2), MU0,
                             prior_std ** 2 * jnp.eye(4), jnp.diag(SIGMA))
  assert error < 0.0025 * mc  # the 1% asked is 4 standard errors or more
  kl = kl_diag(DELTA, SIGMA, prior_std)
  assert kl.shape == ()
  np.testing.assert_allclose(kl, mc, rtol=0.01)


@pytest.mark.parametrize("prior_std", [0.7, 1.0])
def test_gaussian_kl_full_equals_monte_carlo(prior_std):
  a = jax.random.normal(jax.random.key(3), (4, 4))
  chol = jnp.tril(a, -1) * 0.6 + jnp.diag(SIGMA)
  mc, error = monte_carlo_kl(MU0 + DELTA, chol @ chol.T, MU0, prior_std ** 2 * jnp.eye(4),
                             chol)
  assert error < 0.0025 * mc
  np.testing.assert_allclose(kl_full(DELTA, chol, prior_std), mc, rtol=0.01)


# ------------------------------------------------- 2. fcvr with a diagonal factor is mfvr

@pytest.mark.parametrize("prior_std", [0.7, 1.0])
def test_full_kl_of_a_diagonal_factor_is_the_mean_field_kl(prior_std):
  delta = jax.random.normal(jax.random.key(0), (2, 3, 4))
  sigma = jnp.exp(jax.random.normal(jax.random.key(1), (2, 3, 4)))
  chol = sigma[..., None] * jnp.eye(4)
  full = kl_full(delta, chol, prior_std)
  assert full.shape == (2, 3)
  np.testing.assert_allclose(full, kl_diag(delta, sigma, prior_std), rtol=1e-5)


def test_cholesky_factor_is_lower_triangular_with_a_softplus_diagonal():
  raw = np.asarray(jax.random.normal(jax.random.key(0), (2, 6)), np.float64) * 2.0
  sp = lambda v: np.log1p(np.exp(v))
  chol = cholesky_factor(raw, 3)
  assert chol.shape == (2, 3, 3)
  for b in range(2):
    r = raw[b]
    expected = np.array([[sp(r[0]), 0.0, 0.0],
                         [r[1], sp(r[2]), 0.0],
                         [r[3], r[4], sp(r[5])]])
    np.testing.assert_allclose(chol[b], expected, rtol=1e-6)
  assert (np.diagonal(cholesky_factor(np.full((2, 6), -20.0), 3), 0, -2, -1) > 0).all()


def test_fcvr_with_a_diagonal_factor_samples_as_mfvr():
  """fcvr and mfvr around the same gate and offset head; both scale heads output the same
  σ (fcvr: raw diagonal softplus⁻¹(σ), off-diagonal 0): same samples, same KL."""
  mfvr = br.make("mfvr", "simple", ARGS, settings(), rngs=nnx.Rngs(0))
  fcvr = br.make("fcvr", "simple", ARGS, settings(), rngs=nnx.Rngs(1))
  nnx.update(fcvr.base, nnx.state(mfvr.base))
  nnx.update(fcvr.delta, nnx.state(mfvr.delta))
  sigma = jnp.array([0.3, 1.7, 0.8])
  set_output_layer(mfvr.scale, jnp.log(sigma))
  raw = jnp.zeros(K * (K + 1) // 2)
  rows, cols = np.tril_indices(K)
  raw = raw.at[np.flatnonzero(rows == cols)].set(jnp.log(jnp.expm1(sigma)))
  set_output_layer(fcvr.scale, raw)
  x, key = features(), jax.random.key(7)
  a, b = infer(mfvr, x, key), infer(fcvr, x, key)
  assert a.weights.shape == (4, 2, K)
  assert not np.allclose(a.weights[0], a.weights[1])  # really random
  np.testing.assert_allclose(b.logits, a.logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(b.weights, a.weights, atol=1e-6)
  np.testing.assert_allclose(b.aux_losses["kl"], a.aux_losses["kl"], rtol=1e-5)


def test_fcvr_samples_have_the_posterior_moments():
  """Many routing samples of l ~ N(l_det + Δμ, L Lᵀ) from fcvr's own (random) heads: mean
  l_det + Δμ, covariance L Lᵀ; KL the closed form. (mfvr is fcvr with a diagonal L.)"""
  n = 20_000
  model = br.make("fcvr", "simple", ARGS, settings(samples=n), rngs=nnx.Rngs(0))
  x = features()
  det, delta, factor = nnx.jit(lambda m, x: m.posterior(x, output_size=(H, W)))(model, x)
  assert not np.allclose(factor[..., 1, 0], 0.0)  # a full covariance
  cov = factor @ jnp.swapaxes(factor, -1, -2)
  routing = infer(model, x, jax.random.key(3))
  samples = routing.logits  # [n, B, K]
  mean = samples.mean(0)
  np.testing.assert_allclose(mean, det + delta,
                             atol=5 * float(jnp.sqrt(jnp.max(jnp.diagonal(cov, 0, -2, -1)) / n)))
  centred = samples - mean
  empirical = jnp.einsum("nbi,nbj->bij", centred, centred) / (n - 1)
  scale = jnp.sqrt(jnp.diagonal(cov, 0, -2, -1))
  # The standard error of a covariance entry is at most √(2 Σii Σjj / n).
  np.testing.assert_allclose(empirical, cov,
                             atol=5 * float(jnp.max(scale) ** 2 * np.sqrt(2 / n)))
  kl = kl_full(delta, factor, 1.0)  # β = 1e-2, σ0 = 1
  np.testing.assert_allclose(routing.aux_losses["kl"], 1e-2 * jnp.mean(kl), rtol=1e-5)


# --------------------------------------------------------- 3. σ -> 0 and unused SWAG

def test_mfvr_with_vanishing_variance_is_the_deterministic_gate(experts, expert_outputs):
  det = mixture(experts, expert_outputs, "simple", "deterministic")
  mfvr = mixture(experts, expert_outputs, "simple", "mfvr")
  nnx.update(mfvr.gate.base, nnx.state(det.gate))
  set_output_layer(mfvr.gate.delta, 0.0)
  log_sigma = br.LOG_SIGMA_RANGE[0]
  set_output_layer(mfvr.gate.scale, log_sigma)
  key = jax.random.key(11)
  expected = combine(det, *expert_outputs, key)
  out = combine(mfvr, *expert_outputs, key)
  assert out["routing"].weights.shape == (SAMPLES, 2, 2)
  for r in range(SAMPLES):
    np.testing.assert_allclose(out["routing"].weights[r], expected["routing"].weights[0],
                               atol=1e-5)
  # The predictive: the mean of the samples' softmaxes (log-probabilities) against the
  # gate's fused logits (R = 1: the logits themselves).
  np.testing.assert_allclose(out["logits"], jax.nn.log_softmax(expected["logits"]),
                             atol=1e-4)
  # KL(N(l, σ² I) ‖ N(l, I)) per image, K = 2 experts, times β.
  kl = 0.5 * 2 * (np.exp(2 * log_sigma) - 1 - 2 * log_sigma)
  np.testing.assert_allclose(out["routing"].aux_losses["kl"], 1e-2 * kl, rtol=1e-5)


def test_swagr_before_any_collection_is_the_gate(experts, expert_outputs):
  det = mixture(experts, expert_outputs, "simple", "deterministic")
  swag = mixture(experts, expert_outputs, "simple", "swagr")
  nnx.update(swag.gate.base, nnx.state(det.gate))
  assert int(swag.gate.swag_count[...]) == 0
  key = jax.random.key(5)
  expected = combine(det, *expert_outputs, key)["routing"]
  routing = combine(swag, *expert_outputs, key)["routing"]
  assert routing.weights.shape[0] == SAMPLES
  for r in range(SAMPLES):
    np.testing.assert_array_equal(routing.weights[r], expected.weights[0])
    np.testing.assert_array_equal(routing.logits[r], expected.logits[0])
  # In training it is the gate (one sample).
  x = jax.random.normal(jax.random.key(8), (2, H // 16, W // 16, 16))
  np.testing.assert_array_equal(train_call(swag.gate, x).weights,
                                train_call(det.gate, x).weights)


# --------------------------------------------------------------- 4. der with M = 1

def test_der_with_one_member_is_the_deterministic_gate(experts, expert_outputs):
  det = mixture(experts, expert_outputs, "simple", "deterministic")
  der = mixture(experts, expert_outputs, "simple", "der", ensemble=1)
  params = nnx.state(det.gate, nnx.Param)
  assert not all(np.array_equal(a, b[0]) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(nnx.state(der.gate.members, nnx.Param))))
  nnx.update(der.gate.members, jax.tree.map(lambda a: a[None], params))
  key = jax.random.key(2)
  expected = combine(det, *expert_outputs, key)
  out = combine(der, *expert_outputs, key)
  assert out["routing"].weights.shape == expected["routing"].weights.shape
  assert out["routing"].unit == expected["routing"].unit
  np.testing.assert_array_equal(out["routing"].weights, expected["routing"].weights)
  np.testing.assert_array_equal(out["logits"], expected["logits"])


# ------------------------------------------------- 5. vtsr at T = 1 is temp_sampling

def vtsr_and_temp_sampling(**changes):
  """A vtsr and a temp_sampling router (T = 1) with the same base gate and noise stream."""
  vtsr = br.make("vtsr", "simple", ARGS, settings(**changes), rngs=nnx.Rngs(0))
  temp = br.make("temp_sampling", "simple", ARGS, settings(temperature=1.0, **changes),
                 rngs=nnx.Rngs(1))
  nnx.update(temp.base, nnx.state(vtsr.base))
  nnx.update(temp.noise, nnx.state(vtsr.noise))
  return vtsr, temp


def test_vtsr_with_temperature_fixed_at_one_is_temp_sampling():
  """Head output m = 0 and log v = 2·min log σ (σ at the variational routers' floor):
  log T ~ N(0, e^-24) is 1 up to ~1e-5, so the samples are temp_sampling's at T = 1."""
  vtsr, temp = vtsr_and_temp_sampling()
  set_output_layer(vtsr.temperature, jnp.array([0.0, 2 * br.LOG_SIGMA_RANGE[0]]))
  x = features()
  m, std = nnx.jit(lambda r, x: r.log_temperature_posterior(x, output_size=(H, W)))(vtsr, x)
  np.testing.assert_array_equal(m, 0.0)
  np.testing.assert_allclose(std, np.exp(br.LOG_SIGMA_RANGE[0]), rtol=1e-5)
  key = jax.random.key(9)
  a, b = infer(vtsr, x, key), infer(temp, x, key)
  assert a.weights.shape == b.weights.shape == (4, 2, K)
  np.testing.assert_allclose(a.weights, b.weights, atol=1e-4)
  # KL(N(0, σ²) ‖ N(0, 1)) per image, times β.
  s = br.LOG_SIGMA_RANGE[0]
  np.testing.assert_allclose(a.aux_losses["kl"], 1e-2 * 0.5 * (np.exp(2 * s) - 1 - 2 * s),
                             rtol=1e-4)


def test_vtsr_warm_up_starts_at_temperature_one():
  """In training the first call uses T = 1 (ramp 0) whatever the head says, so it equals
  temp_sampling's first training call; past warm-up, and at inference, the head's T."""
  vtsr, temp = vtsr_and_temp_sampling()
  assert vtsr.settings.warmup_steps == 10
  set_output_layer(vtsr.temperature, jnp.array([1.5, -8.0]))  # T ≈ e^1.5
  x = features()
  assert int(vtsr.steps[...]) == 0
  np.testing.assert_array_equal(train_call(vtsr, x).weights, train_call(temp, x).weights)
  assert int(vtsr.steps[...]) == 1
  vtsr.steps[...] = jnp.array(10, jnp.int32)  # warm-up over
  a, b = train_call(vtsr, x), train_call(temp, x)
  assert not np.allclose(a.weights, b.weights, atol=1e-3)
  assert a.weights.shape == (1, 2, K)
  # Inference never ramps: a fresh router's T is the head's at once.
  fresh, temp = vtsr_and_temp_sampling()
  set_output_layer(fresh.temperature, jnp.array([1.5, -8.0]))
  key = jax.random.key(4)
  assert not np.allclose(infer(fresh, x, key).weights, infer(temp, x, key).weights, atol=1e-3)


# ----------------------------------------------------------------------------- 6. SWAG

@pytest.mark.parametrize("iterates", [2, 8])
def test_swag_draws_have_the_collected_mean_and_covariance(iterates):
  """P = 5 parameters, rank M = 3; 2 iterates (M' = 2) or 8 (the ring wrapped, M' = 3)."""
  p, rank, n = 5, 3, 20_000
  thetas = jax.random.normal(jax.random.key(0), (iterates, p)) * jnp.array(
      [0.5, 1.0, 2.0, 0.3, 1.5]) + jnp.arange(p)
  state = (jnp.zeros(p), jnp.zeros(p), jnp.zeros((rank, p)), jnp.zeros((), jnp.int32))
  for theta in thetas:
    state = swag_update(*state, theta)
  mean, square, deviations, count = state
  assert int(count) == iterates
  # Independently: the moments of all iterates, the deviations of the last M from the
  # running mean after each.
  t = np.asarray(thetas, np.float64)
  np.testing.assert_allclose(mean, t.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(square, (t ** 2).mean(0), rtol=1e-5, atol=1e-6)
  running = np.cumsum(t, 0) / np.arange(1, iterates + 1)[:, None]
  d = (t - running)[-rank:]
  filled = min(iterates, rank)
  cov = 0.5 * np.diag(t.var(0)) + d.T @ d / (2 * (filled - 1))
  ring = np.arange(iterates - filled, iterates) % rank  # iterate i went to row i mod M
  np.testing.assert_allclose(np.asarray(deviations)[ring], d, rtol=1e-4, atol=1e-5)
  draws = np.asarray(swag_draws(*state, jax.random.split(jax.random.key(1), n)), np.float64)
  sd = np.sqrt(np.diag(cov))
  np.testing.assert_allclose(draws.mean(0), t.mean(0), atol=5 * sd.max() / np.sqrt(n))
  # The standard error of a covariance entry is at most √(2 Σii Σjj / n).
  np.testing.assert_allclose(np.cov(draws.T), cov,
                             atol=5 * np.sqrt(2.0 / n) * np.outer(sd, sd).max())


@pytest.mark.parametrize("every", [1, 2])
def test_swagr_collects_only_after_swag_start(every):
  total, start = 10, 0.5
  router = br.make("swagr", "simple", ARGS, settings(swag_start=start, swag_every=every),
                   rngs=nnx.Rngs(0))  # (swag_start is the default)
  params = jax.tree.map(jnp.copy, nnx.state(router.base, nnx.Param))
  counts, collected = [], []
  for step in range(1, total + 1):  # the gate stage's steps are 1-based
    nnx.update(router.base, jax.tree.map(lambda a: a + 0.1 * step, params))
    router.after_train_step(step, total)
    counts.append(int(router.swag_count[...]))
    if counts[-1] > (counts[-2] if step > 1 else 0):
      collected.append(step)
  first = int(start * total)  # no collection up to here
  expected = [s for s in range(first + 1, total + 1) if (s - first) % every == 0]
  assert collected == expected
  assert counts[:first] == [0] * first and counts[-1] == len(expected)
  np.testing.assert_allclose(router.swag_mean[...],
                             ravel_pytree(params)[0] + 0.1 * np.mean(expected), rtol=1e-5,
                             atol=1e-5)
  if every > 1:
    return
  # Inference now draws from SWAG: the samples differ from each other.
  x = features()
  routing = infer(router, x, jax.random.key(0))
  assert not np.allclose(routing.logits[0], routing.logits[1])
  np.testing.assert_array_equal(routing.weights, infer(router, x, jax.random.key(0)).weights)


# --------------------------------------------- 7. seeds and the number of samples

@pytest.mark.parametrize("router", ROUTERS)
def test_sampling_is_deterministic_per_key_and_counts_samples(router):
  model = br.make(router, "simple", ARGS, settings(), rngs=nnx.Rngs(0))
  if router == "swagr":  # collect varied iterates, so that SWAG is stochastic
    params = jax.tree.map(jnp.copy, nnx.state(model.base, nnx.Param))
    for i in range(4):
      nnx.update(model.base, jax.tree.map(
          lambda a: a + 0.3 * jax.random.normal(jax.random.key(i), a.shape), params))
      model.after_train_step(10, 10)  # the last step collects
  x = features()
  first, train = infer(model, x, jax.random.key(1)), train_call(model, x)
  again = infer(model, x, jax.random.key(1))  # (the router's state has moved on)
  other, train_again = infer(model, x, jax.random.key(2)), train_call(model, x)
  r = {"deterministic": 1, "der": 3}.get(router, 4)
  assert first.weights.shape == (r, 2, K) and first.unit == "image"
  np.testing.assert_array_equal(first.weights, again.weights)
  np.testing.assert_allclose(first.weights.sum(-1), 1.0, rtol=1e-5)
  if router in STOCHASTIC:
    assert not np.allclose(first.weights, other.weights)
    assert not np.allclose(first.weights[0], first.weights[1])
  else:
    np.testing.assert_array_equal(first.weights, other.weights)
  assert train.weights.shape == ({"der": 3}.get(router, 1), 2, K)
  if router in ("temp_sampling", "mcdr", "mfvr", "fcvr", "vtsr"):
    # Training draws from the router's own stream, which moves on.
    assert not np.allclose(train.weights, train_again.weights)
  else:
    np.testing.assert_array_equal(train.weights, train_again.weights)


# --------------------------------------------------------------------- 8. gradients

@nnx.jit
def gradients(moes, batch):
  return [nnx.grad(losses.mixture_loss)(moe, batch) for moe in moes]


def nonzero(tree):
  return any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(tree))


def test_gradients_reach_the_heads_and_not_the_frozen_experts(experts, expert_outputs,
                                                             batch):
  """β = 0, so that the heads learn from the cross-entropy through the sampled routing.
  The mfvr MoE runs the real experts (their gradient must be exactly zero); fcvr and vtsr
  fixed expert outputs (one compilation of the experts is enough)."""
  moe = build.mixture(config(kl_weight=0.0), experts, "simple", "mfvr")
  moe.eval()
  moes = (moe, *(mixture(experts, expert_outputs, "simple", router, kl_weight=0.0)
                 for router in ("fcvr", "vtsr")))
  moes[2].gate.steps[...] = jnp.array(10, jnp.int32)  # vtsr past its warm-up
  grads = gradients(moes, batch)
  assert int(moes[2].gate.steps[...]) == 11  # the warm-up clock moved on in the step
  expert_grads = jax.tree.leaves(grads[0]["experts"])
  assert len(expert_grads) == len(jax.tree.leaves(nnx.state(experts, nnx.Param)))
  assert not nonzero(expert_grads)
  for grad, heads in zip(grads, (("base", "delta", "scale"), ("base", "delta", "scale"),
                                 ("base", "temperature"))):
    for head in heads:
      assert nonzero(grad["gate"][head]), head
  # During vtsr's warm-up (ramp 0) T = 1 does not depend on the temperature head.
  moes[2].gate.steps[...] = jnp.array(0, jnp.int32)
  grads = gradients(moes, batch)
  assert not nonzero(grads[2]["gate"]["temperature"])
  assert nonzero(grads[2]["gate"]["base"])


# ----------------------------------------------------- 9. every (gate, router) pair

@nnx.jit
def training_losses(moes, batch):
  return [losses.mixture_loss(moe, batch) for moe in moes]


def inference_routing(moe, images, key):
  return moe(images, key)["routing"]


@pytest.fixture(scope="module")
def every_pair(experts, expert_outputs, batch):
  """gate -> {router: (training loss, the inference Routing's shapes)}: one compiled
  program per gate (compilation dominates); the inference numerics of each router are
  tested above on the simple gate, here its Routing is traced (nnx.eval_shape)."""
  cache = {}

  def get(gate):
    if gate not in cache:
      moes = tuple(mixture(experts, expert_outputs, gate, router) for router in ROUTERS)
      images = batch["image"].astype(jnp.float32) / 255.0
      shapes = [nnx.eval_shape(inference_routing, moe, images, jax.random.key(3))
                for moe in moes]
      cache[gate] = dict(zip(ROUTERS, zip(training_losses(moes, batch), shapes)))
    return cache[gate]
  return get


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("gate", GATES)
def test_every_gate_and_router_builds_trains_and_routes(every_pair, gate, router):
  loss, routing = every_pair(gate)[router]
  assert np.isfinite(loss) and loss > 0
  assert routing.unit == routers.get(gate).unit
  r = {"deterministic": 1, "der": ENSEMBLE}.get(router, SAMPLES)
  unit = tuple(config().data.num_classes if a == "C" else a for a in UNIT_AXES[gate])
  assert routing.weights.shape == routing.logits.shape == (r, 2, *unit, 2)
  assert set(routing.aux_losses) == ({"kl"} if router in ("mfvr", "fcvr", "vtsr") else set())


# ------------------------------------------- 10. evaluation: one compile, the measures

def test_evaluation_of_sampled_routers_compiles_once_and_decomposes_pe(experts,
                                                                      expert_outputs):
  """Every router around the same experts in one evaluation call: the sample axis is
  static, so 3 batches compile once; the same seed gives the same statistics; each MoE's
  routing-epistemic + expert-disagreement + aleatoric maps sum to its PE (gate-weighted
  members), and a deterministic router has no routing-epistemic uncertainty."""
  from moe_jax import evaluate, methods
  moes = tuple(mixture(experts, expert_outputs, "simple", r)
               for r in ("deterministic", "mfvr", "der"))
  outputs = methods.mixtures_with("weighted", variants=(False, False, False))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 255, (2, H, W, 3), np.uint8),
              "label": rng.integers(0, 38, (2, H, W), np.uint8)} for _ in range(3)]
  compiled = evaluate._chunk_statistics._cache_size
  before = compiled()
  # The fixture's experts hold a whole batch's outputs: one micro-batch of 2 per batch.
  first = evaluate.accumulate(outputs, moes, batches, 38, uncertainty=True, seed=0,
                              micro_batch=2)
  assert compiled() - before == 1
  again = evaluate.accumulate(outputs, moes, batches, 38, uncertainty=True, seed=0,
                              micro_batch=2)
  for method in ("moe_0", "moe_1", "moe_2"):
    for name, value in first[method].items():
      np.testing.assert_array_equal(value, again[method][name], err_msg=f"{method} {name}")
  out = jax.jit(lambda images, key: outputs(moes, images, key))(
      jnp.zeros((2, H, W, 3)), jax.random.key(0))
  for method in ("moe_0", "moe_1", "moe_2"):
    parts = sum(out[method][m] for m in ("routing_epistemic", "expert_disagreement",
                                         "aleatoric"))
    np.testing.assert_allclose(parts, out[method]["predictive_entropy"], atol=2e-6)
  assert float(jnp.max(out["moe_0"]["routing_epistemic"])) == 0.0
  assert float(jnp.max(out["moe_0"]["routing_mutual_information"])) == 0.0
  assert float(jnp.max(out["moe_1"]["routing_epistemic"])) > 0.0


def test_routing_stability_counts_only_valid_images_and_is_one_when_the_routing_cannot_move(
    experts, expert_outputs):
  """`stability.sums` on fixed expert outputs (noise cannot move the routing): every valid
  unit agrees at top 1 and has no total variation, at every σ and for every router; the
  padding image counts nothing."""
  from moe_jax import sharding, stability
  moes = tuple(mixture(experts, expert_outputs, "simple", r) for r in ("deterministic", "mfvr"))
  batch = {"image": np.random.default_rng(0).integers(0, 255, (2, H, W, 3), np.uint8),
           "valid": np.array([True, False])}
  sums, images = stability.sums(moes, batch, (0.0, 0.5), 1, jax.random.key(0),
                                sharding.one_device_mesh(), 2)  # the fixture's batch of 2
  assert images == 1
  for per_sigma in sums:
    assert len(per_sigma) == 2
    for s in per_sigma:
      assert s["units"] == 1.0  # one valid image, routed per image
      assert s["top1_agreement"] == s["jaccard"] == 1.0  # K = 2 > top_k = 1: jaccard
      assert s["total_variation"] == 0.0
      assert stability.means([s])["top1_agreement"] == [1.0]
