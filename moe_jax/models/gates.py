"""Gates: from the experts' concatenated ASPP features to expert weights.

`SimpleGate` (the paper's "simple"): 3x3 conv to 1 channel, ReLU, flatten, dense 128, ReLU,
dense K, softmax -> one weight per expert and image. The flatten size follows from the
feature map (the reference hard-codes 3249 = 57x57, i.e. 912x912 inputs only).
`ClasswiseGate`: C independent simple gates (stacked parameters, vmapped) -> per image,
per class weights.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from moe_jax import uncertainty
from moe_jax.models.backbone import conv


class SimpleGate(nnx.Module):
  """Call: features [B, h, w, F] -> weights [B, K] (softmax over experts)."""

  def __init__(self, in_ch: int, feature_hw: tuple[int, int], num_experts: int, *,
               hidden: int = 128, rngs: nnx.Rngs):
    self.conv = conv(in_ch, 1, 3, bias=True, rngs=rngs)
    self.hidden = nnx.Linear(feature_hw[0] * feature_hw[1], hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_experts, rngs=rngs)

  def logits(self, features: jax.Array) -> jax.Array:
    """Routing logits [B, K] (before the softmax)."""
    x = nnx.relu(self.conv(features))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.out(x)

  def __call__(self, features: jax.Array) -> jax.Array:
    return jax.nn.softmax(self.logits(features), axis=-1)


class ClasswiseGate(nnx.Module):
  """C simple gates with stacked parameters. Call: features [B, h, w, F] -> [B, C, K]."""

  def __init__(self, in_ch: int, feature_hw: tuple[int, int], num_experts: int,
               num_classes: int, *, hidden: int = 128, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num_classes)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return SimpleGate(in_ch, feature_hw, num_experts, hidden=hidden, rngs=rngs)
    self.gates = create(rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    @nnx.vmap(in_axes=(0, None), out_axes=1)
    def apply(gate, x):
      return gate(x)
    return apply(self.gates, features)


def fuse(expert_logits: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted sum of expert logits, as in the paper (fusion on logits, not probabilities).

  Args:
    expert_logits: [K, B, H, W, C].
    weights: [B, K] (simple gate) or [B, C, K] (classwise gate).

  Returns:
    [B, H, W, C].
  """
  # [K, B, 1, 1, 1] or [K, B, 1, 1, C]; summed slice by slice (see sum_members).
  per_pixel = (weights.T[:, :, None, None, None] if weights.ndim == 2 else
               jnp.moveaxis(weights, -1, 0)[:, :, None, None, :])
  return uncertainty.sum_members(expert_logits * per_pixel)
