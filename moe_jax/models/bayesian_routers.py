"""Bayesian routers: a distribution on the routing decision around any router's logits
(Li, "Bayesian Mixture-of-Experts", arXiv 2509.23830; ../shared/reference
related_seed_methods.md §A).

Each entry of `BAYESIAN_ROUTERS` (config model.routers) wraps a gate type of
`routers.ROUTERS` (config model.gates: simple, classwise, pixel, or a registered one),
reads its `logits(features, output_size)` and returns a `routers.Routing` of the same unit
with R routing samples. The experts run once; only the router is sampled.

  name           family     what is random                           training         inference
  deterministic  baseline   nothing (the gate type itself)            the gate         R = 1
  temp_sampling  baseline   Gumbel noise: softmax((l + G) / T), T fixed 1 sample        S samples
  mcdr           weight     a dropout mask on the router's input      1 mask           S masks
  swagr          weight     router parameters ~ SWAG posterior        the gate + SWAG  S draws
  der            weight     M routers from different seeds            all M            the M
  mfvr           logit      l ~ N(l_det + Δμ, diag σ²)                 1 sample + β·KL  S samples
  fcvr           logit      l ~ N(l_det + Δμ, L Lᵀ), L Cholesky        1 sample + β·KL  S samples
  vtsr           selection  log T ~ N(m, v); softmax((l + G) / T)      1 sample + β·KL  S samples

The predictive distribution of the MoE is the mean over the R samples of each sample's
fused prediction, p(y|x) = (1/R) Σ_r softmax(Σ_k g_rk l_k(x)) (`moe.predictive_logits`);
in training the loss is the mean over the samples of each sample's cross-entropy (one
sample, or the M members of `der`), plus β·KL for the variational routers.

Randomness: at evaluation the routing samples come from the `key` the MoE is called with
(same key, same samples); in training (key=None) from the router's own `nnx.Rngs` stream,
which is checkpointed with it. The KL terms are closed forms (`gaussian_kl_diag`,
`gaussian_kl_full`), averaged over routing units (images, image×class or pixels).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from flax import nnx
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections

from moe_jax.config_checks import ROUTING_DEFAULTS, ConfigError
from moe_jax.models import routers
from moe_jax.models.routers import Routing, RouterArgs

# Above this many logits (samples × routing map), samples are drawn in chunks under
# lax.map instead of all at once under vmap (a per-pixel router at full resolution).
MAX_VMAP_ELEMENTS = 1 << 24
LOG_SIGMA_RANGE = (-12.0, 4.0)  # clip of the variational routers' log σ


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
  """The Bayesian routers' hyperparameters (config model.routing, eval.routing_samples).

  samples: S, routing samples at inference (not used by deterministic and der).
  prior_std: σ0 of the logit prior N(l_det, σ0² I) (mfvr, fcvr) and of log T (vtsr).
  kl_weight: β of the variational routers' loss CE + β·KL.
  dropout: mcdr's dropout rate on the router's input features.
  swag_rank: SWAG's deviation-matrix rank (the last swag_rank collected iterates).
  swag_start: the fraction of the gate's steps after which SWAG collects.
  swag_every: SWAG collects every swag_every steps after swag_start.
  ensemble: der's M routers.
  temperature: temp_sampling's fixed T.
  hard: temp_sampling and vtsr select one expert (a one-hot of the sampled weights, with
    the soft weights' gradient: straight-through) instead of soft weights.
  max_log_temperature: vtsr clips log T to [-max, max].
  warmup_steps: vtsr's log T ramps from 0 (T = 1) to its sampled value over these steps.
  """
  samples: int
  prior_std: float
  kl_weight: float
  dropout: float
  swag_rank: int
  swag_start: float
  swag_every: int
  ensemble: int
  temperature: float
  hard: bool
  max_log_temperature: float
  warmup_steps: int

  @classmethod
  def default(cls, samples: int = 16) -> "RoutingSettings":
    """config_checks.ROUTING_DEFAULTS with S = samples."""
    return cls(samples=samples, **ROUTING_DEFAULTS)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RoutingSettings":
    """From config.model.routing and config.eval.routing_samples; a missing key keeps its
    default (workdirs made before Bayesian routing)."""
    section = config.model.get("routing", None) or {}
    return cls(samples=config.eval.get("routing_samples", 16),
               **{key: section.get(key, value) for key, value in ROUTING_DEFAULTS.items()})


# ------------------------------------------------------------------ closed forms (pure)

def gaussian_kl_diag(delta: jax.Array, sigma: jax.Array, prior_std: float) -> jax.Array:
  """KL(N(μ0 + Δμ, diag σ²) ‖ N(μ0, σ0² I)) over the last axis (K): [...].

  = ½ Σ_i [σ_i²/σ0² + Δμ_i²/σ0² − 1 − log(σ_i²/σ0²)].
  """
  ratio = (sigma / prior_std) ** 2
  return 0.5 * jnp.sum(ratio + (delta / prior_std) ** 2 - 1.0 - jnp.log(ratio), axis=-1)


def gaussian_kl_full(delta: jax.Array, chol: jax.Array, prior_std: float) -> jax.Array:
  """KL(N(μ0 + Δμ, L Lᵀ) ‖ N(μ0, σ0² I)) for Cholesky factors L [..., K, K]: [...].

  = ½ [tr(L Lᵀ)/σ0² + ‖Δμ‖²/σ0² − K − 2 Σ_i log|L_ii| + 2K log σ0].
  """
  k = delta.shape[-1]
  trace = jnp.sum(chol ** 2, axis=(-2, -1))
  log_det = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(chol, axis1=-2, axis2=-1))), axis=-1)
  return 0.5 * (trace / prior_std ** 2 + jnp.sum(delta ** 2, axis=-1) / prior_std ** 2 - k
                - 2.0 * log_det + 2.0 * k * math.log(prior_std))


def cholesky_factor(raw: jax.Array, k: int) -> jax.Array:
  """raw [..., K(K+1)/2] -> lower-triangular L [..., K, K]: the strictly lower triangle as
  given (row-major, `jnp.tril_indices`), the diagonal through softplus (> 0)."""
  rows, cols = jnp.tril_indices(k)
  chol = jnp.zeros((*raw.shape[:-1], k, k), raw.dtype).at[..., rows, cols].set(raw)
  diagonal = jax.nn.softplus(jnp.diagonal(chol, axis1=-2, axis2=-1))
  eye = jnp.eye(k, dtype=bool)
  return jnp.where(eye, diagonal[..., None, :] * jnp.eye(k, dtype=raw.dtype), chol)


def gumbel_logits(logits: jax.Array, temperature: jax.Array | float,
                  key: jax.Array) -> jax.Array:
  """(l + G) / T with G ~ Gumbel(0, 1) i.i.d. (drawn from fold_in(key, 0)): softmax of it
  is a Gumbel-softmax sample, its argmax a sample of Cat(softmax(l))."""
  gumbel = jax.random.gumbel(jax.random.fold_in(key, 0), logits.shape, jnp.float32)
  return (logits + gumbel) / temperature


def straight_through_one_hot(weights: jax.Array) -> jax.Array:
  """One-hot of argmax over the last axis, with the gradient of `weights`."""
  hard = jax.nn.one_hot(jnp.argmax(weights, axis=-1), weights.shape[-1], dtype=weights.dtype)
  return hard + weights - jax.lax.stop_gradient(weights)


def swag_update(mean: jax.Array, square: jax.Array, deviations: jax.Array, count: jax.Array,
                theta: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Adds iterate theta [P] to SWAG's running moments (Maddox et al. 2019).

  mean, square [P]: running means of θ and θ²; deviations [M, P]: a ring of the last M
  deviations θ − mean (after the update); count: iterates so far.
  """
  n = count.astype(jnp.float32)
  mean = (n * mean + theta) / (n + 1)
  square = (n * square + theta ** 2) / (n + 1)
  deviations = deviations.at[count % deviations.shape[0]].set(theta - mean)
  return mean, square, deviations, count + 1


def swag_sample(mean: jax.Array, square: jax.Array, deviations: jax.Array, count: jax.Array,
                key: jax.Array) -> jax.Array:
  """θ = θ̄ + (1/√2) diag(σ²)^½ z1 + (1/√(2(M'−1))) Dᵀ z2, z1, z2 ~ N(0, I): [P].

  σ² = max(mean of θ² − θ̄², 0); D are the M' = min(count, M) collected deviations (with
  M' = 1 the low-rank term is D/√2). The draws' covariance is ½ diag(σ²) + DᵀD / (2(M'−1)).
  """
  rank = deviations.shape[0]
  filled = jnp.minimum(count, rank)
  z1 = jax.random.normal(jax.random.fold_in(key, 0), mean.shape)
  z2 = jax.random.normal(jax.random.fold_in(key, 1), (rank,))
  z2 = jnp.where(jnp.arange(rank) < filled, z2, 0.0)
  variance = jnp.maximum(square - mean ** 2, 0.0)
  low_rank = (z2 @ deviations) / jnp.sqrt(2.0 * jnp.maximum(filled - 1, 1).astype(jnp.float32))
  return mean + jnp.sqrt(variance / 2.0) * z1 + low_rank


# -------------------------------------------------------------------------- the routers

def _sampled(fn: Callable[[jax.Array], jax.Array], keys: jax.Array,
             sample_shape: tuple[int, ...]) -> jax.Array:
  """fn over keys [R]: [R, *sample_shape], under vmap, or lax.map in chunks when R ×
  the sample is above MAX_VMAP_ELEMENTS."""
  per_sample = max(1, math.prod(sample_shape))
  if keys.shape[0] * per_sample <= MAX_VMAP_ELEMENTS:
    return jax.vmap(fn)(keys)
  return jax.lax.map(fn, keys, batch_size=max(1, MAX_VMAP_ELEMENTS // per_sample))


class BayesianRouter(routers.Router):
  """A distribution on the routing of gate type `gate` (see the module docstring).

  Call: features [B, h, w, F], output_size (H, W), key -> Routing of the gate's unit with
  R samples: S = settings.samples with a key (evaluation), the training samples without
  (one; der: its M routers), drawn from the router's own stream.
  """

  def __init__(self, gate: str, args: RouterArgs, settings: RoutingSettings, *,
               rngs: nnx.Rngs):
    self._setup(gate, args, settings, rngs)
    self.base = routers.make(gate, args, rngs=rngs)

  def _setup(self, gate: str, args: RouterArgs, settings: RoutingSettings,
             rngs: nnx.Rngs) -> None:
    """What every Bayesian router holds besides its parameters."""
    self.unit = routers.get(gate).unit
    self.num_experts = args.num_experts
    self.settings = settings
    self.noise = rngs["routing"].fork()

  def logits(self, features: jax.Array, *, output_size: tuple[int, int]) -> jax.Array:
    """The wrapped gate's deterministic logits (the posterior's centre)."""
    return self.base.logits(features, output_size=output_size)

  def __call__(self, features: jax.Array, *, output_size: tuple[int, int],
               key: jax.Array | None = None) -> Routing:
    training = key is None
    if training:
      key = self.noise()
    return self.sample(features, output_size=output_size, key=key, training=training)

  def sample(self, features: jax.Array, *, output_size: tuple[int, int], key: jax.Array,
             training: bool) -> Routing:
    """The routing samples (see the class docstring)."""
    raise NotImplementedError

  def _logits_shape(self, features: jax.Array, output_size: tuple[int, int]
                    ) -> tuple[int, ...]:
    """The shape of the gate's logits, traced only (nothing runs)."""
    graphdef, state = nnx.split(self.base)
    return jax.eval_shape(lambda s: nnx.merge(graphdef, s).logits(
        features, output_size=output_size), state).shape

  def _keys(self, key: jax.Array, training: bool) -> jax.Array:
    return jax.random.split(key, 1 if training else self.settings.samples)

  def _routing(self, sample_logits: jax.Array, aux: dict | None = None, *,
               hard: bool = False) -> Routing:
    weights = jax.nn.softmax(sample_logits, axis=-1)
    if hard:
      weights = straight_through_one_hot(weights)
    return Routing(weights, sample_logits, aux or {}, self.unit)


class TempSamplingRouter(BayesianRouter):
  """Fixed-temperature Gumbel sampling: weights softmax((l + G)/T) (one-hot with `hard`)."""

  def sample(self, features, *, output_size, key, training):
    logits = self.logits(features, output_size=output_size)
    samples = _sampled(lambda k: gumbel_logits(logits, self.settings.temperature, k),
                       self._keys(key, training), logits.shape)
    return self._routing(samples, hard=self.settings.hard)


class DropoutRouter(BayesianRouter):
  """MC-dropout router: dropout (rate settings.dropout) on the router's input features,
  on at inference; each sample is a pass of the router alone under its own mask."""

  def sample(self, features, *, output_size, key, training):
    rate = self.settings.dropout
    graphdef, state = nnx.split(self.base)
    shape = self._logits_shape(features, output_size)

    def one(k):
      keep = jax.random.bernoulli(k, 1.0 - rate, features.shape)
      dropped = jnp.where(keep, features / (1.0 - rate), 0.0)
      return nnx.merge(graphdef, state).logits(dropped, output_size=output_size)
    return self._routing(_sampled(one, self._keys(key, training), shape))


class SwagStatistic(nnx.Variable):
  """SWAG's running moments of the router's parameters (not trained; checkpointed)."""


class SwagRouter(BayesianRouter):
  """SWAG over the router's parameters: trained as the deterministic gate, while SWAG
  collects its iterates (after settings.swag_start of the steps, every swag_every);
  inference draws S parameter sets (`swag_sample`). Before any collection it is the gate.
  """

  def __init__(self, gate, args, settings, *, rngs):
    super().__init__(gate, args, settings, rngs=rngs)
    flat = self._flat_params()
    self.swag_mean = SwagStatistic(jnp.zeros_like(flat))
    self.swag_square = SwagStatistic(jnp.zeros_like(flat))
    self.swag_deviations = SwagStatistic(jnp.zeros((settings.swag_rank, flat.size)))
    self.swag_count = SwagStatistic(jnp.zeros((), jnp.int32))

  def _flat_params(self) -> jax.Array:
    return ravel_pytree(nnx.state(self.base, nnx.Param))[0]

  def collect(self) -> None:
    """Adds the router's current parameters to the SWAG moments."""
    mean, square, deviations, count = swag_update(
        self.swag_mean[...], self.swag_square[...], self.swag_deviations[...],
        self.swag_count[...], self._flat_params())
    self.swag_mean[...], self.swag_square[...] = mean, square
    self.swag_deviations[...], self.swag_count[...] = deviations, count

  def after_train_step(self, step: int, total_steps: int) -> None:
    start = int(self.settings.swag_start * total_steps)
    if step > start and (step - start) % self.settings.swag_every == 0:
      _collect(self)

  def sample(self, features, *, output_size, key, training):
    if training:
      return routers.deterministic(self.logits(features, output_size=output_size), self.unit)
    graphdef, params, rest = nnx.split(self.base, nnx.Param, ...)
    flat, unravel = ravel_pytree(params)
    collected = self.swag_count[...] > 0
    shape = self._logits_shape(features, output_size)

    def one(k):
      theta = swag_sample(self.swag_mean[...], self.swag_square[...],
                          self.swag_deviations[...], self.swag_count[...], k)
      theta = jnp.where(collected, theta, flat)
      return nnx.merge(graphdef, unravel(theta), rest).logits(features,
                                                              output_size=output_size)
    return self._routing(_sampled(one, self._keys(key, training), shape))


@nnx.jit
def _collect(router: SwagRouter) -> None:
  router.collect()


class EnsembleRouter(BayesianRouter):
  """Deep-ensemble router: M = settings.ensemble gates from different seeds with stacked
  parameters, trained at once (each by its own sample's loss); R = M samples always."""

  def __init__(self, gate, args, settings, *, rngs):
    self._setup(gate, args, settings, rngs)

    @nnx.split_rngs(splits=settings.ensemble)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return routers.make(gate, args, rngs=rngs)
    self.members = create(rngs)

  def logits(self, features, *, output_size):
    """Every member's logits [M, B, ..., K]."""
    graphdef, state = nnx.split(self.members)

    def apply(member_state, x):
      return nnx.merge(graphdef, member_state).logits(x, output_size=output_size)
    return jax.vmap(apply, in_axes=(0, None))(state, features)

  def sample(self, features, *, output_size, key, training):
    del key, training
    return self._routing(self.logits(features, output_size=output_size))


class VariationalRouter(BayesianRouter):
  """Logit-space variational router: l ~ N(l_det + Δμ, Σ) with heads of the gate's own
  architecture for Δμ and for Σ's factor; `full`: Σ = L Lᵀ (fcvr), else diag σ² (mfvr)."""
  full = False

  def __init__(self, gate, args, settings, *, rngs):
    super().__init__(gate, args, settings, rngs=rngs)
    k = args.num_experts
    self.delta = routers.make(gate, args, rngs=rngs)
    scale_outputs = k * (k + 1) // 2 if self.full else k
    self.scale = routers.make(gate, dataclasses.replace(args, num_experts=scale_outputs),
                              rngs=rngs)

  def posterior(self, features: jax.Array, *, output_size: tuple[int, int]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(l_det, Δμ, factor): the prior's mean, the posterior's offset [B, ..., K] and its
    scale: σ [B, ..., K] (mfvr) or the Cholesky factor L [B, ..., K, K] (fcvr)."""
    det = self.logits(features, output_size=output_size)
    delta = self.delta.logits(features, output_size=output_size)
    raw = self.scale.logits(features, output_size=output_size)
    if self.full:
      return det, delta, cholesky_factor(raw, self.num_experts)
    return det, delta, jnp.exp(jnp.clip(raw, *LOG_SIGMA_RANGE))

  def sample(self, features, *, output_size, key, training):
    det, delta, factor = self.posterior(features, output_size=output_size)
    mean = det + delta

    def one(k):
      eps = jax.random.normal(k, mean.shape)
      return mean + (jnp.einsum("...ij,...j->...i", factor, eps) if self.full
                     else factor * eps)
    samples = _sampled(one, self._keys(key, training), mean.shape)
    prior_std = self.settings.prior_std
    kl = (gaussian_kl_full(delta, factor, prior_std) if self.full
          else gaussian_kl_diag(delta, factor, prior_std))
    return self._routing(samples, {"kl": self.settings.kl_weight * jnp.mean(kl)})


class FullCovarianceRouter(VariationalRouter):
  """fcvr: `VariationalRouter` with a full covariance L Lᵀ."""
  full = True


class TrainingSteps(nnx.Variable):
  """Forward passes in training so far (vtsr's warm-up clock)."""


class TemperatureRouter(BayesianRouter):
  """Variational temperature: log T ~ N(m, v) per routing unit from a head of the gate's
  architecture (outputs m and log v), clipped to ±max_log_temperature and ramped in from
  T = 1 over warmup_steps; weights softmax((l + G)/T); loss + β·KL(N(m, v) ‖ N(0, σ0²))."""

  def __init__(self, gate, args, settings, *, rngs):
    super().__init__(gate, args, settings, rngs=rngs)
    self.temperature = routers.make(gate, dataclasses.replace(args, num_experts=2),
                                    rngs=rngs)
    self.steps = TrainingSteps(jnp.zeros((), jnp.int32))

  def log_temperature_posterior(self, features, *, output_size) -> tuple[jax.Array, jax.Array]:
    """(m, std) of log T, each [B, ...] (one per routing unit); the head's second output is
    log v = 2 log std, and log std is clipped like the variational routers' log σ."""
    out = self.temperature.logits(features, output_size=output_size)
    return out[..., 0], jnp.exp(jnp.clip(0.5 * out[..., 1], *LOG_SIGMA_RANGE))

  def sample(self, features, *, output_size, key, training):
    logits = self.logits(features, output_size=output_size)
    m, std = self.log_temperature_posterior(features, output_size=output_size)
    limit = self.settings.max_log_temperature
    if training:
      warmup = max(self.settings.warmup_steps, 1)
      ramp = jnp.minimum(self.steps[...].astype(jnp.float32) / warmup, 1.0)
      self.steps[...] = self.steps[...] + 1
    else:
      ramp = 1.0

    def one(k):
      eps = jax.random.normal(jax.random.fold_in(k, 1), m.shape)
      log_t = ramp * jnp.clip(m + std * eps, -limit, limit)
      return gumbel_logits(logits, jnp.exp(log_t)[..., None], k)
    samples = _sampled(one, self._keys(key, training), logits.shape)
    kl = gaussian_kl_diag(m[..., None], std[..., None], self.settings.prior_std)
    return self._routing(samples, {"kl": self.settings.kl_weight * jnp.mean(kl)},
                         hard=self.settings.hard)


@dataclasses.dataclass(frozen=True)
class BayesianRouterKind:
  """One entry of BAYESIAN_ROUTERS: its family and class (None: the gate itself)."""
  family: str
  summary: str
  cls: type[BayesianRouter] | None


BAYESIAN_ROUTERS: dict[str, BayesianRouterKind] = {
    "deterministic": BayesianRouterKind("baseline", "the gate as trained (R = 1)", None),
    "temp_sampling": BayesianRouterKind("baseline", "Gumbel sampling at a fixed T",
                                        TempSamplingRouter),
    "mcdr": BayesianRouterKind("weight", "dropout on the router's input, kept on",
                               DropoutRouter),
    "swagr": BayesianRouterKind("weight", "SWAG posterior of the router's parameters",
                                SwagRouter),
    "der": BayesianRouterKind("weight", "M routers from different seeds", EnsembleRouter),
    "mfvr": BayesianRouterKind("logit", "mean-field Gaussian on the logits",
                               VariationalRouter),
    "fcvr": BayesianRouterKind("logit", "full-covariance Gaussian on the logits",
                               FullCovarianceRouter),
    "vtsr": BayesianRouterKind("selection", "variational temperature, Gumbel sampling",
                               TemperatureRouter),
}


def make(router: str, gate: str, args: RouterArgs, settings: RoutingSettings, *,
         rngs: nnx.Rngs) -> routers.Router:
  """Router `router` (a key of BAYESIAN_ROUTERS) around gate type `gate`."""
  if router not in BAYESIAN_ROUTERS:
    raise ConfigError(f"unknown router {router!r} (config key model.routers); use any of "
                      f"{', '.join(BAYESIAN_ROUTERS)}.")
  cls = BAYESIAN_ROUTERS[router].cls
  if cls is None:
    return routers.make(gate, args, rngs=rngs)
  return cls(gate, args, settings, rngs=rngs)
