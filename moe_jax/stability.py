"""Routing stability under input noise (Li, arXiv 2509.23830, §A.7 of the notes), for the
dense routers of a model-level MoE.

Each image x gets Gaussian noise δ of std σ × (x's pixel std), and each router's expected
weights ḡ(x) (the mean over its routing samples, drawn with the same key for x and x + δ)
are compared per routing unit (an image, an image × class, or a pixel):

  top1_agreement   argmax_k ḡ(x) = argmax_k ḡ(x + δ)
  total_variation  ½ Σ_k |ḡ_k(x) − ḡ_k(x + δ)|
  jaccard          |A ∩ B| / |A ∪ B| of the top-k experts A of ḡ(x), B of ḡ(x + δ)
                   (only when K > k: with k ≥ K both sets are every expert)

averaged over the units of the images (`sums` gives mergeable sums; `means` the averages).
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import sharding
from moe_jax.models import routers

STATISTICS = ("top1_agreement", "total_variation", "jaccard")


def perturbed(images: jax.Array, sigma: float, key: jax.Array) -> jax.Array:
  """images [B, H, W, 3] + N(0, (σ × each image's pixel std)²) noise, same shape."""
  scale = sigma * jnp.std(images, axis=(1, 2, 3), keepdims=True)
  return images + scale * jax.random.normal(key, images.shape, images.dtype)


def unit_statistics(clean: jax.Array, noisy: jax.Array, top_k: int) -> dict[str, jax.Array]:
  """Per routing unit: weights [..., K] of x and of x + δ -> {statistic: [...]} (see the
  module docstring; "jaccard" only when K > top_k)."""
  num = clean.shape[-1]
  stats = {"top1_agreement": (jnp.argmax(clean, -1) == jnp.argmax(noisy, -1)).astype(
               jnp.float32),
           "total_variation": 0.5 * jnp.sum(jnp.abs(clean - noisy), axis=-1)}
  if num > top_k:
    top = lambda w: jnp.sum(jax.nn.one_hot(jax.lax.top_k(w, top_k)[1], num), axis=-2) > 0
    a, b = top(clean), top(noisy)
    stats["jaccard"] = jnp.sum(a & b, -1) / jnp.sum(a | b, -1)
  return stats


def _sums(moes: tuple, images: jax.Array, valid: jax.Array, noise: tuple[float, ...],
          top_k: int, key: jax.Array) -> list[list[dict[str, jax.Array]]]:
  """[moe][σ] {statistic: sum over the valid images' units, "units": their count}.

  moes: MoEs around the same experts (the experts run once per σ); images float32
  [B, H, W, 3]; valid bool [B] (padding images count nothing).
  """
  routing_key, noise_key = jax.random.split(key)

  def expected(images):
    expert_logits, aspp = moes[0].experts(images)
    return [routers.expected_weights(moe.route(expert_logits, aspp, key=routing_key))
            for moe in moes]
  clean = expected(images)
  out = [[] for _ in moes]
  for i, sigma in enumerate(noise):
    noisy = expected(perturbed(images, sigma, jax.random.fold_in(noise_key, i)))
    for j, (a, b) in enumerate(zip(clean, noisy)):
      stats = unit_statistics(a, b, top_k)
      mask = jnp.broadcast_to(valid.reshape(-1, *[1] * (a.ndim - 2)), a.shape[:-1])
      out[j].append({**{name: jnp.sum(jnp.where(mask, v, 0.0)) for name, v in stats.items()},
                     "units": jnp.sum(mask).astype(jnp.float32)})
  return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 7),
                   compiler_options=sharding.SAME_ON_EVERY_MESH)
def _chunk_sums(graphdef: nnx.GraphDef, state: nnx.State, chunk: dict[str, jax.Array],
                ids: jax.Array, noise: tuple[float, ...], top_k: int, key: jax.Array,
                mesh: jax.sharding.Mesh) -> tuple[list[list[dict[str, jax.Array]]], jax.Array]:
  """(`_sums`, the number of valid images) of every device's micro-batch of one
  `sharding.chunk_steps` step (leaves [devices])."""
  def per_chunk(state, chunk, key):
    return (_sums(nnx.merge(graphdef, state), chunk["image"].astype(jnp.float32) / 255.0,
                  chunk["valid"], noise, top_k, key),
            jnp.sum(chunk["valid"]).astype(jnp.int32))
  return sharding.map_chunk(per_chunk, mesh, state, chunk, ids, key)


def sums(moes: tuple, batch: dict[str, np.ndarray], noise: tuple[float, ...], top_k: int,
         key: jax.Array, mesh: jax.sharding.Mesh, micro_batch: int
         ) -> tuple[list[list[dict[str, np.ndarray]]], int]:
  """([moe][σ] {statistic: sum over the valid images' units, "units": their count}, the
  number of valid images) of one batch, on the host (float64 sums).

  The batch runs over every device of `mesh`, `micro_batch` images at a time, each alone on
  its device (`sharding.chunk_steps`; micro-batch c draws its noise and routing samples
  from fold_in(key, c)), and the micro-batches' sums are added in order: the same numbers
  for every mesh.

  Args:
    moes: MoEs around the same experts, placed on `mesh` (the experts run once per σ).
    batch: this process's rows of the batch (one process: all), {"image": uint8
      [b, H, W, 3], "valid": bool [b]} (padding images count nothing).
  """
  graphdef, state = nnx.split(sharding.placed_copy(moes, mesh))
  per_chunk, images = sharding.chunk_order([
      _chunk_sums(graphdef, state, chunk, ids, noise, top_k, key, mesh)
      for chunk, ids in sharding.chunk_steps(mesh, micro_batch, batch)])
  return (jax.tree.map(lambda x: x.astype(np.float64).sum(axis=0), per_chunk),
          int(images.sum()))


def means(totals: list[dict[str, np.ndarray]]) -> dict[str, list[float] | None]:
  """Summed statistics per σ -> {statistic: [mean per σ]} (None: not defined here)."""
  return {name: [float(t[name] / t["units"]) for t in totals] if name in totals[0] else None
          for name in STATISTICS}
