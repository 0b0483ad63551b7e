"""Routers: from the experts' concatenated ASPP features to expert weights, as one contract.

Every router is registered by name (`ROUTERS`, `register`) and returns a `Routing`, the
only thing the rest of the code reads (fusion, the MoE's uncertainty, the evaluation's
gate statistics, predict). A router declares the *unit* its weights belong to:

  unit     weights                     the paper's / what it maps to
  "image"  [R, B, K]                   "simple" gate: one weight per expert and image
  "class"  [R, B, C, K]                "classwise" gate: per image and class
  "pixel"  [R, B, H, W, K]             per pixel (token-level routing in segmentation)

R is the number of routing samples (1 for a deterministic router; a stochastic router
draws R samples from its key). Nothing decides the unit from an array's rank.

Built-in routers:
- `simple` (the paper's): 3x3 conv to 1 channel, ReLU, flatten, dense `hidden`, ReLU,
  dense K. The flatten size follows from the feature map (the reference hard-codes
  3249 = 57x57, i.e. 912x912 inputs only).
- `classwise`: C independent simple gates (stacked parameters, vmapped).
- `pixel`: 3x3 conv to `hidden`, ReLU, 1x1 conv to K on the feature map, routing logits
  upsampled bilinearly to the image size.

A new router subclasses `Router`: a class attribute `unit`, built from `RouterArgs`, and
`logits(features, *, output_size)` -> routing logits [B, ..., K] of that unit; registered
with `@register("name")`, `--config.model.gates='("name",)'` then trains, evaluates and
restores it (see docs/architecture.md). A router that is not a softmax of one set of
logits overrides `__call__(features, *, output_size, key=None) -> Routing`. Every router's
logits can be wrapped by the Bayesian routers of `moe_jax.models.bayesian_routers`
(model.routers), which put a distribution on the routing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx, struct
import jax
import jax.numpy as jnp

from moe_jax import uncertainty
from moe_jax.config_checks import ConfigError
from moe_jax.models.backbone import conv

UNITS = ("image", "class", "pixel")


@struct.dataclass
class Routing:
  """What a router decides (a pytree; `unit` is static).

  Attributes:
    weights: expert weights, softmax over the last axis: [R, B, K] ("image"),
      [R, B, C, K] ("class") or [R, B, H, W, K] ("pixel").
    logits: the routing logits the weights come from, same shape.
    aux_losses: scalars the training loss adds (e.g. a KL term); {} for most routers.
    unit: "image", "class" or "pixel" (see the module docstring).
  """
  weights: jax.Array
  logits: jax.Array
  aux_losses: dict[str, jax.Array] = struct.field(default_factory=dict)
  unit: str = struct.field(pytree_node=False, default="image")


def deterministic(logits: jax.Array, unit: str) -> Routing:
  """The Routing of one set of logits (R = 1): logits [B, ..., K] -> softmax weights."""
  if unit not in UNITS:
    raise ValueError(f"unknown routing unit {unit!r}; use one of {UNITS}")
  return Routing(jax.nn.softmax(logits, axis=-1)[None], logits[None], unit=unit)


@dataclasses.dataclass(frozen=True)
class RouterArgs:
  """What every router is built from (the MoE passes all of them; use what you need)."""
  in_ch: int                       # F = K x ASPP channels of the concatenated features
  feature_hw: tuple[int, int]      # (H/16, W/16), the features' spatial size
  num_experts: int                 # K
  num_classes: int                 # C
  hidden: int                      # config key model.gate_hidden


ROUTERS: dict[str, Callable[..., nnx.Module]] = {}


def register(name: str):
  """Class decorator: registers a router under `name` (the value in config model.gates)."""
  def add(cls):
    ROUTERS[name] = cls
    return cls
  return add


def get(name: str) -> Callable[..., nnx.Module]:
  """The router class registered as `name` (its `unit` is declared on the class)."""
  if name not in ROUTERS:
    raise ConfigError(f"unknown gate {name!r} (config key model.gates); the routers: "
                     f"{', '.join(ROUTERS)}.")
  return ROUTERS[name]


def make(name: str, args: RouterArgs, *, rngs: nnx.Rngs) -> nnx.Module:
  """The registered router `name`, built from `args`."""
  return get(name)(args, rngs=rngs)


class Router(nnx.Module):
  """What every router has (see the module docstring): `unit`, `logits`, and a call that
  gives the deterministic `Routing` (R = 1) of its logits."""
  unit = "image"

  def logits(self, features: jax.Array, *, output_size: tuple[int, int]) -> jax.Array:
    """Routing logits [B, K], [B, C, K] or [B, H, W, K] (the unit's) from features
    [B, h, w, F]; output_size (H, W) is the image size (for "pixel")."""
    raise NotImplementedError

  def __call__(self, features: jax.Array, *, output_size: tuple[int, int],
               key: jax.Array | None = None) -> Routing:
    del key
    return deterministic(self.logits(features, output_size=output_size), self.unit)

  def after_train_step(self, step: int, total_steps: int) -> None:
    """Called by the gate stage after each optimiser step (1-based); SWAG collects here."""
    del step, total_steps


@register("simple")
class SimpleRouter(Router):
  """The paper's simple gate. Call: features [B, h, w, F] -> Routing "image" [1, B, K]."""
  unit = "image"

  def __init__(self, args: RouterArgs, *, rngs: nnx.Rngs):
    h, w = args.feature_hw
    self.conv = conv(args.in_ch, 1, 3, bias=True, rngs=rngs)
    self.hidden = nnx.Linear(h * w, args.hidden, rngs=rngs)
    self.out = nnx.Linear(args.hidden, args.num_experts, rngs=rngs)

  def logits(self, features: jax.Array, *, output_size: tuple[int, int] | None = None
             ) -> jax.Array:
    """Routing logits [B, K] (before the softmax)."""
    del output_size
    x = nnx.relu(self.conv(features))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.out(x)


@register("classwise")
class ClasswiseRouter(Router):
  """C simple gates with stacked parameters. Call: features [B, h, w, F] -> Routing
  "class" [1, B, C, K]."""
  unit = "class"

  def __init__(self, args: RouterArgs, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=args.num_classes)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return SimpleRouter(args, rngs=rngs)
    self.gates = create(rngs)

  def logits(self, features: jax.Array, *, output_size: tuple[int, int] | None = None
             ) -> jax.Array:
    """Routing logits [B, C, K]."""
    return self._apply(features)[0]

  def __call__(self, features: jax.Array, *, output_size: tuple[int, int],
               key: jax.Array | None = None) -> Routing:
    del output_size, key
    logits, weights = self._apply(features)
    return Routing(weights[None], logits[None], unit=self.unit)

  def _apply(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    graphdef, state = nnx.split(self.gates)

    def apply(gate_state, x):  # each gate's softmax under the vmap: the paper's C gates
      logits = nnx.merge(graphdef, gate_state).logits(x)
      return logits, jax.nn.softmax(logits, axis=-1)
    # jax.vmap over the split state (not nnx.vmap), so that Bayesian routers can sample it
    # under their own jax.vmap.
    return jax.vmap(apply, in_axes=(0, None), out_axes=1)(state, features)


@register("pixel")
class PixelRouter(Router):
  """Per-pixel weights. Call: features [B, h, w, F] -> Routing "pixel" [1, B, H, W, K]
  (logits from a 3x3 and a 1x1 conv, upsampled bilinearly to output_size (H, W))."""
  unit = "pixel"

  def __init__(self, args: RouterArgs, *, rngs: nnx.Rngs):
    self.conv = conv(args.in_ch, args.hidden, 3, bias=True, rngs=rngs)
    self.out = conv(args.hidden, args.num_experts, 1, bias=True, rngs=rngs)

  def logits(self, features: jax.Array, *, output_size: tuple[int, int]) -> jax.Array:
    """Routing logits [B, H, W, K] at the image size."""
    logits = self.out(nnx.relu(self.conv(features)))
    b, _, _, k = logits.shape
    return jax.image.resize(logits, (b, *output_size, k), "bilinear")


# ------------------------------------------------------------------ reading a Routing

def fuse_sample(expert_logits: jax.Array, weights: jax.Array, unit: str) -> jax.Array:
  """One routing sample's weighted sum of expert logits, as in the paper (fusion on logits,
  not probabilities).

  Args:
    expert_logits: [K, B, H, W, C].
    weights: one sample's weights of `unit`: [B, K], [B, C, K] or [B, H, W, K].
    unit: "image", "class" or "pixel".

  Returns:
    [B, H, W, C].
  """
  if unit == "image":
    per_pixel = weights.T[:, :, None, None, None]
  elif unit == "class":
    per_pixel = jnp.moveaxis(weights, -1, 0)[:, :, None, None, :]
  else:
    per_pixel = jnp.moveaxis(weights, -1, 0)[..., None]
  # Summed slice by slice (see uncertainty.sum_members).
  return uncertainty.sum_members(expert_logits * per_pixel)


def at_prediction(routing: Routing, prediction: jax.Array) -> Routing:
  """The routing each pixel's prediction used: a "class" routing becomes the "pixel"
  routing of each pixel's predicted class; "image" and "pixel" stay as they are.

  Args:
    routing: any unit, weights [R, B, ...].
    prediction: int [B, H, W] predicted classes.
  """
  if routing.unit != "class":
    return routing
  take = lambda x: jnp.take_along_axis(x[:, :, None, None, :, :],
                                       prediction[None, ..., None, None], axis=4)[..., 0, :]
  return Routing(take(routing.weights), take(routing.logits), routing.aux_losses, "pixel")


def expected_weights(routing: Routing) -> jax.Array:
  """The weights averaged over the R routing samples: [B, K], [B, C, K] or [B, H, W, K]."""
  return jnp.mean(routing.weights, axis=0)


def hard(routing: Routing) -> Routing:
  """Top-1 routing: each unit of each routing sample puts weight 1 on its argmax expert
  (ties: the lowest index) and 0 on the others; the logits and aux losses stay the
  router's. Fusing with it evaluates each unit's argmax expert alone."""
  top = jnp.argmax(routing.weights, axis=-1)
  return routing.replace(weights=jax.nn.one_hot(top, routing.weights.shape[-1],
                                                dtype=routing.weights.dtype))


def member_weights(routing: Routing) -> jax.Array:
  """Expected weights of an "image" or "pixel" routing as member weights broadcastable to
  members' probabilities [K, B, H, W]: [K, B, 1, 1] or [K, B, H, W]."""
  weights = expected_weights(routing)
  if routing.unit == "image":
    return weights.T[:, :, None, None]
  if routing.unit == "pixel":
    return jnp.moveaxis(weights, -1, 0)
  raise ValueError("member_weights takes an 'image' or 'pixel' routing (see at_prediction)")


def sample_member_weights(routing: Routing) -> jax.Array:
  """Each routing sample's weights of an "image" or "pixel" routing as member weights
  broadcastable to members' probabilities [K, B, H, W]: [R, K, B, 1, 1] or [R, K, B, H, W]."""
  if routing.unit == "image":
    return jnp.moveaxis(routing.weights, -1, 1)[..., None, None]
  if routing.unit == "pixel":
    return jnp.moveaxis(routing.weights, -1, 1)
  raise ValueError("sample_member_weights takes an 'image' or 'pixel' routing (see "
                   "at_prediction)")


def _per_pixel(routing: Routing, values: jax.Array, prediction: jax.Array) -> jax.Array:
  """A value per routing unit of an at_prediction routing [B] or [B, H, W] -> [B, H, W]."""
  if routing.unit == "image":
    return jnp.broadcast_to(values[:, None, None], prediction.shape)
  return values


def routing_mutual_information_map(routing: Routing, prediction: jax.Array) -> jax.Array:
  """Per-pixel mutual information between the routing sample and the expert choice,
  H(ḡ) − mean_r H(g^(r)) (nats, ≥ 0; 0 for R = 1) of the weights each pixel was routed
  with: [B, H, W]."""
  routing = at_prediction(routing, prediction)
  mean_entropy = jnp.mean(uncertainty.entropy(routing.weights), axis=0)
  values = jnp.maximum(uncertainty.entropy(expected_weights(routing)) - mean_entropy, 0.0)
  return _per_pixel(routing, values, prediction)


def gate_entropy_map(routing: Routing, prediction: jax.Array) -> jax.Array:
  """Per-pixel entropy (nats) of the expected weights each pixel was routed with: [B, H, W].

  "image": one value per image, broadcast over its pixels; "class": the gate of each
  pixel's predicted class; "pixel": the pixel's own.
  """
  routing = at_prediction(routing, prediction)
  return _per_pixel(routing, uncertainty.entropy(expected_weights(routing)), prediction)


def resized(routing: Routing, size: tuple[int, int]) -> Routing:
  """A "pixel" routing's weights and logits resized (bilinear) to size (H, W); other units
  have no spatial axes and come back as they are."""
  if routing.unit != "pixel":
    return routing
  r, b, _, _, k = routing.logits.shape
  logits = jax.image.resize(routing.logits, (r, b, *size, k), "bilinear")
  return Routing(jax.nn.softmax(logits, axis=-1), logits, routing.aux_losses, routing.unit)
