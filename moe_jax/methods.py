"""What each model gives per method: a prediction, its class probabilities and its
uncertainty maps, all from one forward (jit-able).

An *output function* `(model, images float32 [B,H,W,3], key) -> {method: Output}` serves
one model kind; every method it can produce comes out of the same compiled call (the MoE
forward gives each expert, the uniform ensemble and the MoE). `key` seeds MC dropout and
stochastic routers and is ignored by the deterministic methods. The library's output
functions also take an optional 4th argument, a `Calibration` (the calibrate stage's
temperatures; only `mixtures` reads it, for its MoCaE variants); evaluation passes it when
the calibrate stage has run and adds each "<key>_ts" variant (`with_temperatures`).

Output = {"prediction": int [B,H,W], "probs": float32 [B,H,W,C] (the method's predictive
distribution, for max-softmax calibration, Brier and NLL), and normalised maps in [0, 1]
for the measures it has (`moe_jax.measures.MEASURES`)}. A single deterministic model has
only predictive entropy. The MoE's Output also has "routing": the `routers.Routing` each
pixel's prediction used (unit "image", or "pixel" for pixel and classwise routers: the
predicted class's weights).
"""

from __future__ import annotations

import functools

from flax import nnx, struct
import jax
import jax.numpy as jnp

from moe_jax import measures, uncertainty
from moe_jax import temperature as temperature_scaling
from moe_jax.config_checks import ConfigError
from moe_jax.models import routers

# The reference's MoE sample sets: gate-weighted experts, experts only (uniform), and the
# MoE output stacked with the experts (uniform over K + 1).
MOE_MEMBERS = ("weighted", "uniform", "stacked")
# Where the MoE's expert variance is taken: at argmax p̄ of its sample set ("sample", as for
# every other method), or at the MoE's fused prediction ("fused", as the reference code).
EV_AT = ("sample", "fused")

Output = dict[str, jax.Array | routers.Routing]


@struct.dataclass
class Calibration:
  """Post-hoc temperatures fitted by the calibrate stage (`moe_jax.calibrate`), a pytree
  an output function takes as its optional 4th argument.

  Attributes:
    expert_temperatures: float32 [K], expert k's logits are divided by T_k (MoCaE) in the
      "<moe>_mocae" variants of `mixtures`.
    aggregate: {output key: float32 scalar T}: `tempered` adds "<key>_ts" with the key's
      predictive distribution at temperature T (`with_temperatures`).
  """
  expert_temperatures: jax.Array
  aggregate: dict[str, jax.Array]


def tempered(output: Output, temperature: jax.Array) -> Output:
  """Aggregate temperature scaling of a method's predictive distribution: probs ->
  softmax(log probs / T). The prediction is unchanged (argmax is invariant under T > 0)
  and PE is that of the new probs; the method's other maps (MI, EV, GE, ...) do not
  depend on T and are left out (they are the untempered method's)."""
  log_probs = jnp.log(jnp.maximum(output["probs"], jnp.finfo(jnp.float32).tiny))
  probs = jax.nn.softmax(temperature_scaling.apply(log_probs, temperature), axis=-1)
  return {"prediction": output["prediction"], "probs": probs,
          "predictive_entropy": measures.normalise(
              "predictive_entropy", uncertainty.entropy(probs), probs.shape[-1])}


def with_temperatures(outputs: dict[str, Output], calibration: Calibration | None
                      ) -> dict[str, Output]:
  """`outputs` plus "<key>_ts" = `tempered` for each key of calibration.aggregate that
  `outputs` has (an output function's result; None: unchanged)."""
  if calibration is None:
    return outputs
  return {**outputs, **{f"{key}_ts": tempered(outputs[key], t)
                        for key, t in calibration.aggregate.items() if key in outputs}}


def single_output(logits: jax.Array) -> Output:
  """One deterministic model: logits [B,H,W,C] -> prediction, probs, PE."""
  probs = uncertainty.probabilities(logits)
  return {"prediction": jnp.argmax(logits, axis=-1), "probs": probs,
          "predictive_entropy": measures.normalise(
              "predictive_entropy", uncertainty.entropy(probs), probs.shape[-1])}


def members_output(probs: jax.Array, weights: jax.Array | None = None) -> Output:
  """S members: probs [S,B,H,W,C], weights [S,B,1,1] or [S,B,H,W] or None -> argmax p̄, p̄,
  and every "members" measure."""
  return moments_output(uncertainty.moments(probs, weights))


def moments_output(moments: uncertainty.Moments) -> Output:
  """Members summarised as running sums -> argmax p̄, p̄, every "members" measure."""
  return {"prediction": uncertainty.prediction_of(moments),
          "probs": uncertainty.mean_probs(moments), **measures.members_maps(moments)}


def single(model: nnx.Module, images: jax.Array, key: jax.Array) -> dict[str, Output]:
  """A DeepLabV3Plus: {"model": Output}."""
  del key
  logits, _ = model(images)
  return {"model": single_output(logits)}


def stacked(members: nnx.Module, images: jax.Array, key: jax.Array) -> dict[str, Output]:
  """Stacked models, each on its own: {"0": Output, "1": ..., ...}."""
  del key
  logits, _ = members(images)
  return {str(k): single_output(logits[k]) for k in range(logits.shape[0])}


def deep_ensemble(members: nnx.Module, images: jax.Array, key: jax.Array,
                  calibration: Calibration | None = None) -> dict[str, Output]:
  """Stacked deep-ensemble members, uniform: {"deep_ensemble": Output}."""
  del key, calibration  # its temperatures apply to the outputs (with_temperatures)
  logits, _ = members(images)
  return {"deep_ensemble": members_output(uncertainty.probabilities(logits))}


def mixture(moe: nnx.Module, images: jax.Array, key: jax.Array, *,
            members: str = "weighted", experts: bool = True) -> dict[str, Output]:
  """The MoE and what its forward also gives: {"moe", "ensemble", "expert_0", ...}.

  "moe" predicts argmax of the fused logits (its probs are their softmax); its "members"
  measures come from the `members` sample set (see MOE_MEMBERS) and its "routing" ones
  from the router (per image, or the weights each pixel's prediction used). `key` goes to
  the router. experts=False leaves out "ensemble" and "expert_<k>" (another MoE around the
  same experts already gave them).
  """
  return mixture_outputs(moe(images, key), members=members, experts=experts)


def mixture_outputs(out: dict, *, members: str = "weighted", ev_at: str = "sample",
                    experts: bool = True) -> dict[str, Output]:
  """`mixture` from the MoE's forward output ({"logits", "expert_logits", "routing"}, see
  `MixtureOfExperts`), however it was computed. `ev_at`: see EV_AT."""
  expert_probs = uncertainty.probabilities(out["expert_logits"])  # [K,B,H,W,C]
  fused = single_output(out["logits"])
  uniform = uncertainty.moments(expert_probs)
  ensemble = moments_output(uniform)  # the experts, uniform
  used = routers.at_prediction(out["routing"], fused["prediction"])
  if members == "weighted":
    moments = uncertainty.moments(expert_probs, routers.member_weights(used))
  elif members == "uniform":
    moments = uniform
  elif members == "stacked":
    moments = uncertainty.moments(jnp.concatenate([fused["probs"][None], expert_probs]))
  else:
    raise ConfigError(f"config key eval.moe_members={members!r}; use one of "
                      f"{', '.join(MOE_MEMBERS)}.")
  num_classes, num_experts = fused["probs"].shape[-1], expert_probs.shape[0]
  sample = measures.members_maps(moments)
  if ev_at == "fused":
    sample["expert_variance"] = measures.normalise(
        "expert_variance", uncertainty.expert_variance_of(moments, fused["prediction"]),
        num_classes)
  outputs = {"moe": {**fused, **{name: sample[name] for name in measures.of_source("members")},
                     **measures.routing_maps(measures.Routed(
                         out["routing"], fused["prediction"], expert_probs)),
                     "routing": used}}
  if not experts:
    return outputs
  outputs["ensemble"] = ensemble
  for k in range(num_experts):
    outputs[f"expert_{k}"] = single_output(out["expert_logits"][k])
  return outputs


def mixtures(moes: tuple[nnx.Module, ...], images: jax.Array, key: jax.Array,
             calibration: Calibration | None = None, *, members: str = "weighted",
             ev_at: str = "sample", variants: tuple[bool, ...] | None = None
             ) -> dict[str, Output]:
  """Several MoEs around the same frozen experts (one per gate type and router) in one
  call, the experts run once.

  Returns {"moe_<i>" (`mixture`'s "moe" for moes[i]), "ensemble", "expert_0", ...} (the
  experts' outputs are moes[i]'s shared experts') and, per MoE with variants[i] (None:
  every MoE):
    "moe_<i>_hard": top-1 routing, each unit (image, class or pixel; each
      routing sample) uses only its argmax expert (`routers.hard`). Its "routing" and
      routing measures are the router's own (soft) weights, which are the router's
      uncertainty even when one expert is used; the members measures are the soft
      sample set's at the hard prediction.
    with a `calibration`: "moe_<i>_mocae" and "moe_<i>_mocae_hard", the same with expert
      k's logits divided by calibration.expert_temperatures[k] before the fusion (the
      experts tempered, then mixed), and "<key>_ts" for each key of
      calibration.aggregate (added by `with_temperatures` in evaluation, as for every
      output function).
  """
  expert_logits, aspp = jax.lax.stop_gradient(moes[0].experts(images))
  expert_sets = {"": expert_logits}
  if calibration is not None:  # T_k divides expert k's logits
    expert_sets["_mocae"] = temperature_scaling.apply(
        expert_logits, calibration.expert_temperatures).astype(expert_logits.dtype)
  outputs = {}
  for i, moe in enumerate(moes):
    routing = moe.route(expert_logits, aspp, key=key)  # one routing for every variant
    varied = variants is None or variants[i]
    modes = {"": routing, "_hard": routers.hard(routing)} if varied else {"": routing}
    for experts_suffix, logits in (expert_sets if varied else {"": expert_logits}).items():
      for mode, used in modes.items():
        out = mixture_outputs(
            {"logits": moe.fuse(logits, used)["logits"], "expert_logits": logits,
             "routing": routing}, members=members, ev_at=ev_at,
            experts=not (i or experts_suffix or mode))
        outputs[f"moe_{i}{experts_suffix}{mode}"] = out.pop("moe")
        outputs.update(out)
  return outputs


@functools.cache
def mixtures_with(members: str, ev_at: str = "sample",
                  variants: tuple[bool, ...] | None = None):
  """`mixtures` with fixed options, as one reusable (hashable) output function: the same
  object for the same options, so jit compiles it once."""
  return functools.partial(mixtures, members=members, ev_at=ev_at, variants=variants)


def mc_dropout_logits(model: nnx.Module, images: jax.Array, key: jax.Array,
                      passes: int, shared_encoder: bool = True) -> jax.Array:
  """T = `passes` stochastic passes of a DeepLabV3Plus in eval mode: logits [T,B,H,W,C].

  Only the dropout layers are stochastic (BatchNorm keeps its running statistics).
  shared_encoder: run the backbone once and only the dropout-carrying head T times under
  vmap over keys (the head is all that changes); False runs T full passes (for comparison).
  """
  keys = jax.random.split(key, passes)
  size = images.shape[1:3]
  graphdef, state = nnx.split(model)

  def head(low, features, k):
    return nnx.merge(graphdef, state).head(low, features, size, dropout_key=k)[0]

  if shared_encoder:
    low, features = model.encode(images)
    return jax.vmap(head, in_axes=(None, None, 0))(low, features, keys)

  def full(x, k):
    low, features = nnx.merge(graphdef, state).encode(x)
    return head(low, features, k)
  # Each pass gets its own copy of the images: vmap would otherwise see that the encoder
  # does not depend on the key and run it once, which is the shared-encoder form.
  return jax.vmap(full)(jnp.broadcast_to(images, (passes, *images.shape)), keys)


def mc_dropout(model: nnx.Module, images: jax.Array, key: jax.Array, *,
               passes: int, shared_encoder: bool = True) -> dict[str, Output]:
  """MC dropout on the baseline: {"mc_dropout_<T>": Output} (uniform over the T passes).

  The head's T passes are scanned, so memory holds about two passes' probabilities
  whatever T (at 912x912 x 38 classes, one pass of a batch of 4 is 0.5 GB).
  `mc_dropout_logits` gives the same passes at once, under vmap.

  shared_encoder: the backbone runs once, only the dropout-carrying head T times; False
  reruns the backbone in every pass (the naive form, for comparison: same numbers).
  """
  keys = jax.random.split(key, passes)
  size = images.shape[1:3]
  graphdef, state = nnx.split(model)
  if shared_encoder:
    encoded = model.encode(images)

  def member(s):
    module = nnx.merge(graphdef, state)
    if shared_encoder:
      low, features = encoded
    else:  # the barrier ties the pass's input to s, so XLA cannot hoist the backbone
      low, features = module.encode(jax.lax.optimization_barrier((images, s))[0])
    logits, _ = module.head(low, features, size, dropout_key=keys[s])
    return uncertainty.probabilities(logits)

  return {f"mc_dropout_{passes}": moments_output(uncertainty.scan_members(member, passes))}


def single_and_mc_dropout(model: nnx.Module, images: jax.Array, key: jax.Array,
                          calibration: Calibration | None = None, *,
                          passes: tuple[int, ...]) -> dict[str, Output]:
  """The baseline as a deterministic model ("model") and as MC dropout with each T in
  `passes` ("mc_dropout_<T>"), in one compiled call: XLA runs their common backbone pass
  once (it is the same computation on the same images)."""
  del calibration  # its temperatures apply to the outputs (with_temperatures)
  outputs = single(model, images, key)
  for t in passes:
    outputs.update(mc_dropout(model, images, key, passes=t))
  return outputs


@functools.cache
def single_and_mc_dropout_with(passes: tuple[int, ...]):
  """`single_and_mc_dropout` with fixed T's, as one reusable (hashable) output function."""
  return functools.partial(single_and_mc_dropout, passes=tuple(passes))


def disagreement(outputs: dict[str, Output], experts: tuple[str, ...], moe: str) -> jax.Array:
  """The routing-weighted disagreement Σ_k r_k ‖p_k − p̄‖²₂ (`uncertainty.
  weighted_disagreement`) of the MoE outputs[moe] with the experts outputs[experts[k]],
  r the weights each pixel's prediction used: [B, H, W]."""
  weights = routers.member_weights(outputs[moe]["routing"])
  return uncertainty.weighted_disagreement(
      jnp.stack([outputs[name]["probs"] for name in experts]), outputs[moe]["probs"], weights)


def hard_subset(outputs: dict[str, Output], experts: tuple[str, ...], moe: str,
                threshold: jax.Array) -> jax.Array:
  """Wong et al.'s hard pixels: where the experts' argmax classes disagree, or where the
  MoE's routing-weighted disagreement (`disagreement`) exceeds `threshold` (the
  calibrate stage's top decile on the val split; inf: the first rule alone). bool [B,H,W]."""
  predictions = [outputs[name]["prediction"] for name in experts]
  split = functools.reduce(jnp.logical_or, [p != predictions[0] for p in predictions[1:]],
                           jnp.zeros(predictions[0].shape, bool))
  return split | (disagreement(outputs, experts, moe) > threshold)
