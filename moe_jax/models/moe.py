"""K DeepLabv3+ experts with stacked parameters, a router, and logit fusion.

The experts live as one module whose parameters carry a leading expert axis (created under
`nnx.vmap`), so all K run in one compiled call. How that call executes is a measured choice
(see docs/measured_facts.md): "vmap" maps the expert axis (XLA batches/groups the
convolutions), "unroll" slices the stacked parameters and runs the K experts one after
another inside the same jit (on a 2-core CPU this was 2.6x faster). Both give the same
numbers in eval mode. In train mode the dropout masks differ between the two under the
"rbg" PRNG the library uses (its vmap rule draws member k's bits differently from a sliced
call; members still get distinct masks); under the default threefry PRNG they are equal
too.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from moe_jax.config_checks import ConfigError
from moe_jax.models import bayesian_routers, routers
from moe_jax.models.backbone import conv
from moe_jax.models.deeplab import DeepLabV3Plus

EXECUTIONS = ("vmap", "unroll")


class StackedExperts(nnx.Module):
  """K modules built by `make(rngs)`, parameters stacked on a leading axis of size K.

  Call: images [B, H, W, 3] (shared by all experts) or [K, B, H, W, 3] (one batch per expert,
  `per_expert=True`) -> the module's outputs with a leading K axis, e.g. for DeepLabV3Plus
  (logits [K, B, H, W, C], aspp [K, B, H/16, W/16, A]).
  """

  def __init__(self, make: Callable[[nnx.Rngs], nnx.Module], num: int, *,
               execution: str = "vmap", rngs: nnx.Rngs):
    if execution not in EXECUTIONS:
      raise ConfigError(f"config key model.expert_execution={execution!r}; use one of "
                       f"{', '.join(EXECUTIONS)}.")

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return make(rngs)

    self.members = create(rngs)
    self.num = num
    self.execution = execution

  def __call__(self, images: jax.Array, *, per_expert: bool = False):
    if self.execution == "vmap":
      mesh = jax.sharding.get_abstract_mesh()
      if mesh.shape.get("expert", 1) > 1 and "expert" not in mesh.manual_axes:
        return self._per_device(images, per_expert)

      @nnx.vmap(in_axes=(0, 0 if per_expert else None), out_axes=0)
      def run(member, x):
        return member(x)
      return run(self.members, images)
    graphdef, state = nnx.split(self.members)
    outputs, states = [], []
    for k in range(self.num):
      member = nnx.merge(graphdef, jax.tree.map(lambda a: a[k], state))
      outputs.append(member(images[k] if per_expert else images))
      states.append(nnx.state(member))
    # Write back what the members changed (BatchNorm statistics, dropout key counters).
    nnx.update(self.members, jax.tree.map(lambda *a: jnp.stack(a), *states))
    return jax.tree.map(lambda *a: jnp.stack(a), *outputs)


  def _per_device(self, images: jax.Array, per_expert: bool):
    """The "vmap" execution when the mesh's "expert" axis splits the members
    (moe_jax.sharding): each device maps its own members (jax.shard_map, manual over
    "expert" only; the batch stays split on "data"). XLA's partitioner would otherwise
    split the vmapped convolutions' groups itself, and with one member per device it
    emits an invalid convolution (XLA CPU, jax 0.10)."""
    graphdef, state = nnx.split(self.members)
    spec = jax.sharding.PartitionSpec("expert")

    def run(state, x):
      @nnx.vmap(in_axes=(0, 0 if per_expert else None), out_axes=0)
      def each(member, x):
        return member(x)
      members = nnx.merge(graphdef, state)
      out = each(members, x)
      return out, nnx.state(members)

    out, state = jax.shard_map(
        run, in_specs=(spec, spec if per_expert else jax.sharding.PartitionSpec()),
        out_specs=spec, axis_names={"expert"}, check_vma=False)(state, images)
    nnx.update(self.members, state)  # BatchNorm statistics, dropout key counters
    return out


def make_expert(model_config, num_classes: int) -> Callable[[nnx.Rngs], DeepLabV3Plus]:
  """A factory of DeepLabV3Plus experts from the config's `model` section."""
  def make(rngs: nnx.Rngs) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, backbone=model_config.backbone, width=model_config.width,
                         aspp_channels=model_config.aspp_channels,
                         aspp_dropout=model_config.aspp_dropout,
                         decoder_dropout=model_config.decoder_dropout, rngs=rngs)
  return make


class MixtureOfExperts(nnx.Module):
  """Stacked experts + a router on their concatenated ASPP features + fusion of their logits.

  Call: images float32 [B, H, W, 3] (and an optional routing key) -> dict with
    "logits" [B, H, W, C]: the predictive distribution's log-probabilities up to a
      constant. Each routing sample r fuses the experts' logits with its weights (+ a 3x3
      conv if `fusion_conv`); with R > 1 samples the predictive is the mean over samples
      of each sample's softmax, p(y|x) = (1/R) Σ_r softmax(Σ_k g_rk l_k), and "logits" is
      its log (R = 1: the fused logits themselves),
    "sample_logits" [R, B, H, W, C]: each routing sample's fused logits,
    "expert_logits" [K, B, H, W, C],
    "routing": the router's `routers.Routing` (its unit says how to read the weights).
  The router is gate type `gate` (routers.ROUTERS) inside Bayesian router `router`
  (bayesian_routers.BAYESIAN_ROUTERS; "deterministic" is the gate itself).
  The experts' outputs reach the router through stop_gradient: the experts are frozen
  while the gate trains, so no gradient is computed through them.
  """

  def __init__(self, experts: StackedExperts, *, num_classes: int, image_size: tuple[int, int],
               gate: str = "simple", router: str = "deterministic",
               routing: bayesian_routers.RoutingSettings | None = None,
               fusion_conv: bool = False, gate_hidden: int = 128, rngs: nnx.Rngs):
    if image_size[0] % 16 or image_size[1] % 16:
      raise ConfigError(f"config key data.image_size={tuple(image_size)} must be multiples of "
                       "16 (the backbone's output stride).")
    self.experts = experts
    k = experts.num
    self.gate = bayesian_routers.make(router, gate, routers.RouterArgs(
        in_ch=k * experts.members.aspp_channels,
        feature_hw=(image_size[0] // 16, image_size[1] // 16), num_experts=k,
        num_classes=num_classes, hidden=gate_hidden),
        routing or bayesian_routers.RoutingSettings.default(), rngs=rngs)
    self.fusion_conv = conv(num_classes, num_classes, 3, rngs=rngs) if fusion_conv else None

  def __call__(self, images: jax.Array, key: jax.Array | None = None) -> dict:
    return self.combine(*jax.lax.stop_gradient(self.experts(images)), key=key)

  def combine(self, expert_logits: jax.Array, aspp: jax.Array,
              key: jax.Array | None = None) -> dict:
    """The router and the fusion on the experts' outputs (logits [K,B,H,W,C], aspp
    [K,B,H/16,W/16,A]), however they were computed; returns what `__call__` does."""
    routing = self.route(expert_logits, aspp, key=key)
    return {**self.fuse(expert_logits, routing), "expert_logits": expert_logits,
            "routing": routing}

  def fuse(self, expert_logits: jax.Array, routing: routers.Routing) -> dict:
    """The experts' logits [K,B,H,W,C] fused with `routing`'s samples: {"logits",
    "sample_logits"} as in `__call__` (e.g. with `routers.hard(routing)` for top-1 routing,
    or with tempered expert logits)."""
    def sample_logits(weights):  # one routing sample's fused logits [B, H, W, C]
      logits = routers.fuse_sample(expert_logits, weights, routing.unit)
      return logits if self.fusion_conv is None else self.fusion_conv(logits)
    # Under jit only what the caller reads is computed: the loss reads "sample_logits",
    # evaluation "logits", which streams the samples (memory for one, not R).
    return {"logits": predictive_logits(sample_logits, routing.weights),
            "sample_logits": jnp.stack([sample_logits(w) for w in routing.weights])}

  def route(self, expert_logits: jax.Array, aspp: jax.Array,
            key: jax.Array | None = None) -> routers.Routing:
    """The router alone on the experts' outputs (see `combine`)."""
    k, b, h, w, a = aspp.shape
    features = aspp.transpose(1, 2, 3, 0, 4).reshape(b, h, w, k * a)  # expert-major channels
    return self.gate(features, output_size=expert_logits.shape[2:4], key=key)


def predictive_logits(sample_logits: Callable[[jax.Array], jax.Array],
                      weights: jax.Array) -> jax.Array:
  """log p(y|x) of R routing samples, p = (1/R) Σ_r softmax(sample_logits(weights[r])).

  Args:
    sample_logits: one sample's weights -> its fused logits [B, H, W, C].
    weights: the routing samples' weights [R, ...].

  Returns:
    [B, H, W, C]: R = 1 gives the sample's own logits; otherwise log p (≥ log of the
    smallest normal float32), the samples' softmaxes summed one at a time under lax.scan.
  """
  if weights.shape[0] == 1:
    return sample_logits(weights[0])

  def add(total, w):
    return total + jax.nn.softmax(sample_logits(w).astype(jnp.float32), axis=-1), None
  first = jax.nn.softmax(sample_logits(weights[0]).astype(jnp.float32), axis=-1)
  total, _ = jax.lax.scan(add, first, weights[1:])
  tiny = jnp.finfo(jnp.float32).tiny
  return jnp.log(jnp.maximum(total / weights.shape[0], tiny))
