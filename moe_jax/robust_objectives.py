"""Robust gate objectives of "Toward Calibrated Mixture-of-Experts Under Distribution Shift"
(arXiv 2606.20544), ported to segmentation (pure, jit-able; no modules).

The paper's objectives (../shared/reference/related_seed_methods.md, B.3, B.4 and B.10):

- Robust MoE (tilted softmax): ℓ_i = −log p̄(y_i | x_i) is the mixture's NLL of unit i,
  w = softmax_i(η ℓ) over the batch, loss = Σ_i w_i ℓ_i. The weights are NOT detached in the
  paper's code, so the gradient is w_j (1 + η (ℓ_j − Σ_i w_i ℓ_i)), not the DRO / TERM
  gradient w_j (`detach=True`). η → 0 gives ERM (the mean), η → ∞ the largest loss.
- Robust Filtered: ERM on every unit plus the tilted loss on the "routing-relevant" units
  R = {i : regret_i > τ_r or dis_i > τ_d}, where regret_i = max(0, ℓ_i^mix − min_k ℓ_ik)
  and dis_i = Σ_k r_ik ‖p_k − p̄‖²₂; when R is empty the robust term is the mean loss.

Segmentation: a unit is an image (its mean NLL over labelled pixels; `per_image_nll`,
`regret_and_disagreement`; the default of B.10, closest to the paper's "sample") or a pixel
(`pixel_nll`, `pixel_regret_and_disagreement`; the softmax then runs over every labelled
pixel of the batch, so η must be rescaled: with ~10⁶ pixels and η = 2 it is very peaked).
Labels 255 are ignored; units without a labelled pixel get weight 0. The warm-up (ERM for
the first steps) is the caller's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax import uncertainty

IGNORE_LABEL = 255


def _float(x: jax.Array) -> jax.Array:
  """x as a float array of at least float32 (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _valid(losses: jax.Array, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return jnp.ones(losses.shape, bool)
  return jnp.broadcast_to(jnp.asarray(valid, bool), losses.shape)


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Σ over every element (and over the devices of `axis_name`)."""
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def masked_mean(losses: jax.Array, valid: jax.Array | None = None, *,
                axis_name: str | None = None) -> jax.Array:
  """ERM: the mean of the valid units' losses; 0 when no unit is valid.

  Args:
    losses: float [N] (any shape: every element is a unit).
    valid: bool, the shape of `losses`, or None (all valid).
    axis_name: see `tilted_weights`.

  Returns:
    scalar.
  """
  losses = _float(losses)
  valid = _valid(losses, valid)
  count = _sum(valid.astype(losses.dtype), axis_name)
  return _sum(jnp.where(valid, losses, 0.0), axis_name) / jnp.maximum(count, 1.0)


def tilted_weights(losses: jax.Array, eta: float | jax.Array, valid: jax.Array | None = None,
                   *, detach: bool = False, axis_name: str | None = None) -> jax.Array:
  """The adversary's weights w = softmax(η ℓ) over the valid units.

  w maximises Σ_i w_i ℓ_i − (1/η) KL(w ‖ uniform) over the simplex (KL-ball DRO on the
  batch). Invalid units get weight exactly 0 (masked to −inf before the softmax), whatever
  their loss (nan and inf included); with no valid unit every weight is 0, not nan.

  Data parallelism: the softmax runs over every element of `losses`, through one max and
  one sum. Under jit with a globally sharded batch (jax.sharding) these are already global
  reductions (XLA inserts the collectives), so the weights are the global batch's. Inside
  shard_map / pmap, where each device sees its shard, pass `axis_name`: the max and the sum
  become pmax / psum over it, which is the only change.

  Args:
    losses: float [N], one loss per unit (images [B], or pixels [B·H·W]; any shape: every
      element is a unit, e.g. pixels [B, H, W] need not be flattened).
    eta: η ≥ 0, the tilt (the paper's default 2.0); a traced scalar is fine.
    valid: bool, the shape of `losses`, or None (all valid).
    detach: stop the gradient through w (the DRO / TERM gradient w_j). False (the
      default) matches the paper's code, whose gradient also flows through w.
    axis_name: the mapped axis the batch is split over (shard_map / pmap / vmap), or None.

  Returns:
    float, the shape of `losses`; sums to 1 over the valid units (of every shard).
  """
  losses = _float(losses)
  valid = _valid(losses, valid)
  z = eta * jnp.where(valid, losses, 0.0)
  shift = jnp.max(jnp.where(valid, z, -jnp.inf))
  if axis_name is not None:
    shift = jax.lax.pmax(shift, axis_name)
  shift = jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))
  # Invalid units never reach exp with −inf or nan: no nan in values or gradients.
  e = jnp.where(valid, jnp.exp(jnp.where(valid, z, shift) - shift), 0.0)
  total = _sum(e, axis_name)
  w = e / jnp.where(total > 0, total, 1.0)
  return jax.lax.stop_gradient(w) if detach else w


def robust_loss(losses: jax.Array, eta: float | jax.Array, valid: jax.Array | None = None,
                *, detach: bool = False, axis_name: str | None = None) -> jax.Array:
  """Robust MoE: Σ_i w_i ℓ_i with w = `tilted_weights(losses, eta, valid)`.

  Gradient w.r.t. ℓ_j: w_j (1 + η (ℓ_j − Σ_i w_i ℓ_i)) when w is not detached (the paper's;
  units more than 1/η below the weighted mean get a negative coefficient), w_j with
  `detach=True`. η → 0: the mean of the valid losses; η → ∞: their maximum. 0 when no unit
  is valid.

  Args:
    losses, eta, valid, detach, axis_name: as for `tilted_weights`.

  Returns:
    scalar.
  """
  losses = _float(losses)
  valid = _valid(losses, valid)
  w = tilted_weights(losses, eta, valid, detach=detach, axis_name=axis_name)
  return _sum(w * jnp.where(valid, losses, 0.0), axis_name)


# ------------------------------------------------------------------ per-unit losses

def pixel_nll(log_probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each pixel's negative log-likelihood of its label.

  Args:
    log_probs: float [..., H, W, C], log of the predictive distribution (e.g. the mixture's
      log_softmax).
    labels: int [..., H, W] in [0, C), or 255 = ignore.

  Returns:
    (nll [..., H, W], 0 at ignored pixels; valid bool [..., H, W]).
  """
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = labels != IGNORE_LABEL
  picked = jnp.take_along_axis(_float(log_probs), jnp.where(valid, labels, 0)[..., None],
                               axis=-1)[..., 0]
  return jnp.where(valid, -picked, 0.0), valid


def _image_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
  """Mean over the valid pixels [..., H, W] -> [...]; 0 for an image without one."""
  count = jnp.sum(valid, axis=(-2, -1))
  return (jnp.sum(jnp.where(valid, values, 0.0), axis=(-2, -1))
          / jnp.maximum(count, 1).astype(values.dtype))


def per_image_nll(log_probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each image's mean pixel NLL over its labelled pixels (the "image" unit).

  Args:
    log_probs: float [B, H, W, C] (any leading shape), log of the predictive distribution.
    labels: int [B, H, W]; 255 = ignore.

  Returns:
    (nll [B], 0 for an image without a labelled pixel; valid bool [B], the image has at
    least one labelled pixel).
  """
  nll, valid = pixel_nll(log_probs, labels)
  return _image_mean(nll, valid), jnp.any(valid, axis=(-2, -1))


# ------------------------------------------------------------------ Robust Filtered

def pixel_regret_and_disagreement(
    mixture_log_probs: jax.Array, expert_log_probs: jax.Array, weights: jax.Array,
    labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per pixel: the mixture's regret against its best expert and the experts' routing-
  weighted disagreement with the mixture.

  regret = max(0, ℓ_mix − min_k ℓ_k) with ℓ = −log p(y); dis = Σ_k r_k ‖p_k − p̄‖²₂ with
  p̄ = exp(mixture_log_probs). For a mixture of probabilities (p̄ = Σ_k r_k p_k) regret ≥ 0
  and dis is the trace of the experts' routing-weighted covariance; moe_jax fuses logits,
  so p̄ is not exactly that average and the max(0, ·) matters.

  Args:
    mixture_log_probs: float [B, H, W, C], log p̄.
    expert_log_probs: float [K, B, H, W, C], log p_k.
    weights: float [B, H, W, K], the routing weights r_k each pixel used (or broadcastable
      to it, e.g. [B, 1, 1, K] for an image routing).
    labels: int [B, H, W]; 255 = ignore.

  Returns:
    (regret [B, H, W], dis [B, H, W], both 0 at ignored pixels; valid bool [B, H, W]).
  """
  mix_nll, valid = pixel_nll(mixture_log_probs, labels)
  num_experts = expert_log_probs.shape[0]
  best_nll = functools.reduce(
      jnp.minimum, [pixel_nll(expert_log_probs[k], labels)[0] for k in range(num_experts)])
  regret = jnp.where(valid, jnp.maximum(mix_nll - best_nll, 0.0), 0.0)

  r = jnp.moveaxis(jnp.broadcast_to(_float(weights), (*labels.shape, num_experts)), -1, 0)
  dis = jnp.where(valid, uncertainty.weighted_disagreement(
      jnp.exp(_float(expert_log_probs)), jnp.exp(_float(mixture_log_probs)), r), 0.0)
  return regret, dis, valid


def regret_and_disagreement(
    mixture_log_probs: jax.Array, expert_log_probs: jax.Array, weights: jax.Array,
    labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per image ("image" unit): the means over its labelled pixels of
  `pixel_regret_and_disagreement`.

  Args:
    as for `pixel_regret_and_disagreement`.

  Returns:
    (regret [B], dis [B]); 0 for an image without a labelled pixel.
  """
  regret, dis, valid = pixel_regret_and_disagreement(
      mixture_log_probs, expert_log_probs, weights, labels)
  return _image_mean(regret, valid), _image_mean(dis, valid)


def filtered_set(regret: jax.Array, dis: jax.Array, valid: jax.Array | None = None,
                 tau_r: float = 1e-6, tau_d: float = 0.01) -> jax.Array:
  """The routing-relevant units R = valid & (regret > τ_r | dis > τ_d).

  Args:
    regret, dis: float [N] (any shape), from `regret_and_disagreement` or its per-pixel
      variant.
    valid: bool, their shape, or None (all valid).
    tau_r, tau_d: the paper's thresholds (defaults 1e-6 and 0.01).

  Returns:
    bool, the shape of `regret`.
  """
  relevant = (jnp.asarray(regret) > tau_r) | (jnp.asarray(dis) > tau_d)
  return relevant & _valid(relevant, valid)


def robust_filtered_loss(losses: jax.Array, regret: jax.Array, dis: jax.Array,
                         valid: jax.Array | None = None, eta: float | jax.Array = 2.0,
                         tau_r: float = 1e-6, tau_d: float = 0.01, *, detach: bool = False,
                         axis_name: str | None = None) -> jax.Array:
  """Robust Filtered: mean_i ℓ_i + Σ_{i∈R} softmax_R(η ℓ)_i ℓ_i over the valid units, R =
  `filtered_set(regret, dis, valid, tau_r, tau_d)`; the second term is mean_i ℓ_i when R is
  empty (the paper's rule), so the loss is then twice the mean. 0 when no unit is valid.

  regret and dis only select R (no gradient flows through them).

  Args:
    losses: float [N] (any shape), one loss per unit (the mixture's NLL).
    regret, dis: float, the shape of `losses`.
    valid: bool, the shape of `losses`, or None (all valid).
    eta, tau_r, tau_d: the paper's η, τ_r, τ_d (defaults 2.0, 1e-6, 0.01).
    detach, axis_name: as for `tilted_weights`.

  Returns:
    scalar.
  """
  losses = _float(losses)
  valid = _valid(losses, valid)
  erm = masked_mean(losses, valid, axis_name=axis_name)
  kept = filtered_set(regret, dis, valid, tau_r, tau_d)
  robust = robust_loss(losses, eta, kept, detach=detach, axis_name=axis_name)
  any_kept = _sum(kept.astype(jnp.int32), axis_name) > 0
  return erm + jnp.where(any_kept, robust, erm)
