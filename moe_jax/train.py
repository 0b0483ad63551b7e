"""Losses, optimisers and the compiled train step shared by every stage.

Status: the step and its pieces exist and are tested; the stage loops (experts, baseline,
gate) that drive them from `moe_jax.main` come next (issue 3).
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

# Same value as data_pipelines.transforms.IGNORE_LABEL; not imported from there because
# that module loads TensorFlow, which the library touches only at the input boundary.
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


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """optax optimiser from a config's `train.optimizer` section.

  Keys: name ("sgd" | "adamw"), learning_rate, momentum (sgd), weight_decay,
  schedule ("constant" | "cosine"). SGD's weight decay is added to the gradient before
  momentum, as torch.optim.SGD does (the reference's optimiser).
  """
  if config.schedule == "constant":
    lr = config.learning_rate
  elif config.schedule == "cosine":
    lr = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  else:
    raise ValueError(f"config key train.optimizer.schedule={config.schedule!r}; use "
                     "'constant' or 'cosine'.")
  if config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None))
  if config.name == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  raise ValueError(f"config key train.optimizer.name={config.name!r}; use 'sgd' or 'adamw'.")


def expert_loss(experts: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """Sum over experts of each expert's loss on its own batch.

  batch: {"image": uint8 [K, B, H, W, 3], "label": [K, B, H, W]}. Summing keeps expert
  k's gradient equal to the gradient of its own mean loss.
  """
  logits, _ = experts(batch["image"].astype(jnp.float32) / 255.0, per_expert=True)
  return jnp.sum(jax.vmap(cross_entropy)(logits, batch["label"]))


@nnx.jit(static_argnums=(0,), donate_argnums=(1, 2))
def train_step(loss_fn: Callable, model: nnx.Module, optimizer: nnx.Optimizer,
               batch: dict[str, jax.Array]) -> jax.Array:
  """One optimiser step on `loss_fn(model, batch)`; returns the loss (float32 scalar).

  The optimiser's `wrt` filter decides what trains (e.g. only the gate).
  """
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(
      model, batch)
  optimizer.update(model, grads)
  return loss
