"""Training losses of the stages (pure, jit-able; module-level so jit can key on them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
import optax

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


def mixture_loss(moe: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """The MoE on batch {"image": uint8 [B, H, W, 3], "label": [B, H, W]}: the mean over its
  routing samples of each sample's cross-entropy (one sample for deterministic and most
  Bayesian routers; der's M members each learn from their own), plus the router's
  auxiliary losses (e.g. β·KL; none for deterministic routers)."""
  out = moe(batch["image"].astype(jnp.float32) / 255.0)
  loss = jnp.mean(jnp.stack([cross_entropy(sample, batch["label"])
                             for sample in out["sample_logits"]]))
  for aux in out["routing"].aux_losses.values():
    loss = loss + aux
  return loss
