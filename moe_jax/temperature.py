"""Post-hoc temperature scaling (pure, jit-able and vmap-able math; no I/O).

Two uses, both fitted on a fixed subsample of validation pixels (§B.5, §B.8 of
`related_seed_methods.md`):

- MoCaE: one temperature T_k per expert, fitted on expert k's logits z_k (its own
  pixels; `moe_jax.calibrate`) and applied as z_k / T_k before the experts are mixed
  (`apply` on the stacked [K, ...] logits, in `moe_jax.methods.mixtures`).
- Aggregate: one T fitted on a method's fused log-probabilities log p and applied as
  softmax(log p / T) (`fit_temperature` on log p, then `apply`; `methods.tempered`).

The fit minimises the mean NLL over log T with optax's L-BFGS (zoom linesearch),
starting at T = 1, for a bounded number of iterations, then clamps T into bounds
(default [0.1, 10], as in the reference). Parametrising by log T keeps T > 0 without
constraints.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from moe_jax.losses import IGNORE_LABEL, cross_entropy


def _masked(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float32 logits with ignored pixels' rows zeroed (so non-finite values there are
  inert in both the value and the gradient)."""
  valid = labels.astype(jnp.int32) != IGNORE_LABEL
  return jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)


def nll(log_temperature: jax.Array, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean NLL over labelled pixels of softmax(logits / exp(log_temperature)).

  Args:
    log_temperature: float scalar, log T.
    logits: float [N, C] (any leading shape [..., C] works).
    labels: int [N] (matching logits' leading shape); 255 = ignore.

  Returns:
    float32 scalar; 0 when every pixel is ignored. The logits of ignored pixels are
    zeroed before use, so non-finite values there change neither the value nor the
    gradient. −inf entries (log-probabilities of 0) stay −inf at every T with a zero
    gradient; one on a labelled pixel's own class makes the NLL +inf at every T.
  """
  return _scaled_nll(log_temperature, _masked(logits, labels), labels)


def _scaled_nll(log_temperature: jax.Array, masked_logits: jax.Array,
                labels: jax.Array) -> jax.Array:
  temperature = jnp.exp(jnp.asarray(log_temperature, jnp.float32))
  # −inf / T without the nan gradient 0 · ∂(−inf / T)/∂T of a plain division.
  zero = masked_logits == -jnp.inf
  scaled = jnp.where(zero, -jnp.inf, jnp.where(zero, 0.0, masked_logits) / temperature)
  return cross_entropy(scaled, labels)


# Convergence test of the L-BFGS loop on log T: stop once |d NLL / d log T| is at most
# _GRAD_TOL, or a step moves log T by at most _STEP_TOL (relative 1e-6 in T; float32
# iterates then only oscillate by an ulp while the linesearch spends ~17 evaluations
# per step), or the iterate is past a bound and the NLL still decreases outward (by
# unimodality the clamped answer is then that bound).
_GRAD_TOL = 1e-6
_STEP_TOL = 1e-6


def _minimise_log_temperature(objective, iterations: int, log_bounds: tuple[float, float]
                              ) -> tuple[jax.Array, jax.Array]:
  """L-BFGS on a scalar log T from 0; returns (best finite log T seen, steps taken)."""
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def running(carry):
    step, done = carry[0], carry[1]
    return (step < iterations) & ~done

  def body(carry):
    step, _, params, state, best_params, best_value = carry
    value, grad = value_and_grad(params, state=state)
    better = jnp.isfinite(value) & (value < best_value)
    best_params = jnp.where(better, params, best_params)
    best_value = jnp.where(better, value, best_value)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    new_params = optax.apply_updates(params, updates)
    _, new_grad = value_and_grad(new_params, state=state)
    beyond = (((new_params >= log_bounds[1]) & (new_grad <= 0))
              | ((new_params <= log_bounds[0]) & (new_grad >= 0)))
    done = ((jnp.abs(grad) <= _GRAD_TOL) | (jnp.abs(new_params - params) <= _STEP_TOL)
            | beyond | ~jnp.isfinite(new_params))
    return step + 1, done, new_params, state, best_params, best_value

  params = jnp.zeros((), jnp.float32)
  carry = (jnp.int32(0), jnp.bool_(False), params, solver.init(params), params,
           objective(params))
  steps, _, params, _, best_params, best_value = jax.lax.while_loop(running, body, carry)
  last_value = objective(params)
  better = jnp.isfinite(last_value) & (last_value < best_value)
  return jnp.where(better, params, best_params), steps


def fit_temperature(logits: jax.Array,
                    labels: jax.Array,
                    *,
                    bounds: tuple[float, float] = (0.1, 10.0),
                    iterations: int = 50) -> jax.Array:
  """Temperature T minimising `nll` of softmax(logits / T), clamped into `bounds`.

  L-BFGS (`optax.lbfgs`, zoom linesearch) on log T from log T = 0 (T = 1), for at most
  `iterations` steps under `jax.lax.while_loop`, stopping early once the gradient or
  the step in log T falls below 1e-6, or once the iterate is past a bound with the
  NLL still falling outward (3-8 steps on typical data; a fixed 50 would spend ~17
  linesearch evaluations per step oscillating by an ulp after convergence).
  Deterministic, jit-able and vmap-able (under vmap, converged rows are frozen while
  the others finish). The best finite iterate seen is kept; then
  T = clip(exp(log T), *bounds).

  Clamping is exact, not a heuristic: with β = 1/T, NLL(β) = mean(logsumexp(β z) −
  β z_y) is convex in β, so it is unimodal along the monotone map log T ↦ β, and the
  clamp of its minimiser is the minimiser over the interval.

  Guard: if the clamped result is not finite or has a higher NLL than T = 1 (clamped
  into `bounds`), that T is returned instead, so with 1 in `bounds` fitting never
  increases the NLL. All pixels ignored: the NLL is constant and T = 1; likewise if
  some labelled pixel's own class has logit −inf (the NLL is +inf at every T).

  Args:
    logits: float [N, C]: an expert's logits, or a method's fused log-probabilities
      for the aggregate temperature.
    labels: int [N]; 255 = ignore.
    bounds: (lowest, highest) temperature, 0 < lowest <= highest (static floats).
    iterations: the most L-BFGS steps (static).

  Returns:
    float32 scalar T.
  """
  lowest, highest = bounds
  if not 0.0 < lowest <= highest:
    raise ValueError(f"bounds must satisfy 0 < lowest <= highest, got {bounds}")

  masked_logits = _masked(logits, labels)  # hoisted out of the loop

  def objective(log_temperature: jax.Array) -> jax.Array:
    return _scaled_nll(log_temperature, masked_logits, labels)

  log_temperature, _ = _minimise_log_temperature(
      objective, iterations, (math.log(lowest), math.log(highest)))
  temperature = jnp.clip(jnp.exp(log_temperature), lowest, highest)
  fallback = jnp.clip(jnp.float32(1.0), lowest, highest)
  value = objective(jnp.log(temperature))
  ok = jnp.isfinite(temperature) & jnp.isfinite(value) & (
      value <= objective(jnp.log(fallback)))
  return jnp.where(ok, temperature, fallback).astype(jnp.float32)


def apply(logits: jax.Array, temperature: jax.Array) -> jax.Array:
  """logits / T.

  Args:
    logits: float [..., C].
    temperature: a scalar, or [K] for logits [K, ..., C]: T is reshaped to
      [K, 1, ..., 1] so T[k] divides logits[k].

  Returns:
    float32, logits' shape.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  if temperature.ndim:
    temperature = temperature.reshape(temperature.shape + (1,) * (logits.ndim - 1))
  return logits.astype(jnp.float32) / temperature
