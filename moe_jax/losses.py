"""Training losses of the stages (pure, jit-able; module-level so jit can key on them)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
import optax

from moe_jax import robust_objectives
from moe_jax.models import routers

IGNORE_LABEL = 255


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over pixels whose label is not 255.

  Args:
    logits: float [..., H, W, C].
    labels: int [..., H, W]; 255 = ignore.

  Returns:
    float32 scalar; 0 when every pixel is ignored (PyTorch would return nan).
  """
  labels = labels.astype(jnp.int32)
  valid = labels != IGNORE_LABEL
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def expert_loss(experts: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Sum over experts of each expert's loss on its own batch.

  batch: {"image": uint8 [K, B, H, W, 3], "label": [K, B, H, W]}. Summing keeps expert
  k's gradient equal to the gradient of its own mean loss.
  """
  logits, _ = experts(batch["image"].astype(jnp.float32) / 255.0, per_expert=True)
  return jnp.sum(jax.vmap(cross_entropy)(logits, batch["label"]))


def single_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """One DeepLabV3Plus on batch {"image": uint8 [B, H, W, 3], "label": [B, H, W]}."""
  logits, _ = model(batch["image"].astype(jnp.float32) / 255.0)
  return cross_entropy(logits, batch["label"])


def with_expert_outputs(moes: tuple[nnx.Module, ...], batch: dict[str, jax.Array]
                        ) -> dict[str, jax.Array]:
  """The batch plus "experts": the frozen experts' outputs (logits [K,B,H,W,C], ASPP
  features [K,B,H/16,W/16,A]) on batch["image"], computed once for every MoE of a
  training step (they share the experts; the gate stage's `shared`)."""
  images = batch["image"].astype(jnp.float32) / 255.0
  return {**batch, "experts": jax.lax.stop_gradient(moes[0].experts(images))}


def mixture_output(moe: nnx.Module, batch: dict[str, jax.Array]) -> dict:
  """The MoE's forward on batch["image"] (see `MixtureOfExperts`), from batch["experts"]
  when the training step already ran the experts (`with_expert_outputs`)."""
  if "experts" in batch:
    return moe.combine(*batch["experts"])
  return moe(batch["image"].astype(jnp.float32) / 255.0)


def mixture_loss(moe: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """The MoE on batch {"image": uint8 [B, H, W, 3], "label": [B, H, W]} (and optionally
  "experts", see `mixture_output`): the mean over its routing samples of each sample's
  cross-entropy (one sample for deterministic and most Bayesian routers; der's M members
  each learn from their own), plus the router's auxiliary losses (e.g. β·KL; none for
  deterministic routers)."""
  out = mixture_output(moe, batch)
  loss = _samples_cross_entropy(out, batch["label"])
  for aux in out["routing"].aux_losses.values():
    loss = loss + aux
  return loss


def _samples_cross_entropy(out: dict, labels: jax.Array) -> jax.Array:
  """The mean over an MoE output's routing samples of each sample's cross-entropy."""
  return jnp.mean(jnp.stack([cross_entropy(sample, labels) for sample in out["sample_logits"]]))


# The gate stage's training objectives (config train.gate_objectives), Wong et al., arXiv
# 2606.20544: "erm" (`mixture_loss`), "robust" (the tilted softmax over the batch's units)
# and "robust_filtered" (ERM plus the tilted loss on the routing-relevant units); see
# `moe_jax.robust_objectives` and docs/calibration.md.
GATE_OBJECTIVES = ("erm", "robust", "robust_filtered")


@dataclasses.dataclass(frozen=True)
class RobustSettings:
  """The robust objectives' settings (config train.robust, defaults in
  config_checks.ROBUST_DEFAULTS; hashable, static under jit).

  Attributes:
    eta: η of w = softmax(η ℓ) over images (unit "image").
    pixel_eta: η when the unit is "pixel" (the pixel NLLs spread far wider than the images'
      means, so the same η would put all weight on a few pixels).
    unit: "image" (ℓ_i = an image's mean pixel NLL) or "pixel".
    warmup: the fraction of the gate's steps trained by ERM before the robust loss.
    detach: stop the gradient through w (true DRO/TERM); False is the paper's code.
    tau_r, tau_d: Robust Filtered's regret and disagreement thresholds.
  """
  eta: float
  pixel_eta: float
  unit: str
  warmup: float
  detach: bool
  tau_r: float
  tau_d: float

  @classmethod
  def from_config(cls, config) -> "RobustSettings":
    return cls(**{field.name: config.train.robust[field.name]
                  for field in dataclasses.fields(cls)})


def robust_mixture_loss(moe: nnx.Module, batch: dict[str, jax.Array], *, objective: str,
                        settings: RobustSettings) -> jax.Array:
  """A robust gate objective on the MoE's predictive distribution (R = 1 routing sample:
  the deterministic router's fused logits).

  Per unit (image, or labelled pixel) ℓ = the NLL of the MoE's prediction; "robust" is
  Σ softmax(η ℓ)·ℓ, "robust_filtered" mean ℓ + the tilted loss over the units whose
  mixture regret or routing-weighted disagreement exceeds its τ (regret and disagreement
  of an image: the means over its labelled pixels, with the weights each pixel's
  prediction used). ERM (`mixture_loss`) until the step passes settings.warmup of the
  stage's steps (batch["step"], batch["total_steps"], which the training loop adds;
  without them the robust loss applies from the start).
  """
  out = mixture_output(moe, batch)
  labels = batch["label"].astype(jnp.int32)
  erm = _samples_cross_entropy(out, labels)
  log_probs = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
  pixel = settings.unit == "pixel"
  eta = settings.pixel_eta if pixel else settings.eta
  nll, valid = (robust_objectives.pixel_nll if pixel
                else robust_objectives.per_image_nll)(log_probs, labels)
  if objective == "robust":
    robust = robust_objectives.robust_loss(nll, eta, valid, detach=settings.detach)
  else:
    used = routers.at_prediction(out["routing"], jnp.argmax(log_probs, axis=-1))
    weights = jnp.moveaxis(jnp.broadcast_to(routers.member_weights(used),
                                            (out["expert_logits"].shape[0], *labels.shape)),
                           0, -1)  # [B, H, W, K]
    expert_log_probs = jax.nn.log_softmax(out["expert_logits"].astype(jnp.float32), axis=-1)
    regret, dis = (robust_objectives.pixel_regret_and_disagreement(
        log_probs, expert_log_probs, weights, labels)[:2] if pixel
                   else robust_objectives.regret_and_disagreement(
                       log_probs, expert_log_probs, weights, labels))
    robust = robust_objectives.robust_filtered_loss(
        nll, regret, dis, valid, eta, settings.tau_r, settings.tau_d, detach=settings.detach)
  if "step" in batch:
    robust = jnp.where(batch["step"] > settings.warmup * batch["total_steps"], robust, erm)
  for aux in out["routing"].aux_losses.values():
    robust = robust + aux
  return robust


@functools.cache
def gate_loss(objective: str, settings: RobustSettings) -> Callable:
  """The gate stage's loss for `objective` (GATE_OBJECTIVES), the same object for the same
  arguments (static under jit)."""
  if objective == "erm":
    return mixture_loss
  return functools.partial(robust_mixture_loss, objective=objective, settings=settings)
