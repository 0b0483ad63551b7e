"""The uncertainty measures, one table (`MEASURES`) read by methods, evaluate, plots, report
and predict.

Each measure has a name (its key in outputs, results.json and histograms.npz), a short
label and a title for tables and plots, where it comes from, how its raw value is
computed (nats, or probability units for EV), and the largest raw value, which maps it to
[0, 1]:

  name                        short  source   raw                               maximum
  predictive_entropy          PE     members  H(p̄)                              log C
  mutual_information          MI     members  H(p̄) − Σ_s w_s H(p_s)             log C
  expert_variance             EV     members  std_s of p_s at argmax p̄          0.5
  gate_entropy                GE     routing  H(ḡ) of the weights a pixel used  log K (1 if K=1)
  routing_mutual_information  RMI    routing  H(ḡ) − mean_r H(g^(r))            log K (1 if K=1)
  routing_epistemic           RE     routing  H(p̄) − mean_r H(q_r)              log C
  expert_disagreement         ED     routing  mean_r H(q_r) − Σ_k ḡ_k H(p_k)    log C
  aleatoric                   AL     routing  Σ_k ḡ_k H(p_k)                    log C

"members" measures are computed from the sample set's running sums (`uncertainty.Moments`:
experts, MC-dropout passes, ensemble members), "routing" ones from an MoE's R routing
samples g^(r) (ḡ their mean; R = 1 for a deterministic router), its experts' p_k and its
prediction (`Routed`). With q_r = Σ_k g^(r)_k p_k and p̄ = Σ_k ḡ_k p_k, RE + ED + AL =
H(p̄), which is the MoE's PE with eval.moe_members="weighted" (`uncertainty.
routing_decomposition`). A new measure is one entry here (and its raw function, pure, in
`moe_jax.uncertainty` or `moe_jax.models.routers`); every table, plot and statistic picks
it up.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax import uncertainty
from moe_jax.models import routers


@dataclasses.dataclass
class Routed:
  """What a "routing" measure reads: the MoE's routing (any unit, R samples), its
  prediction int [B, H, W] and its experts' probabilities [K, B, H, W, C]."""
  routing: routers.Routing
  prediction: jax.Array
  expert_probs: jax.Array
  _decomposition: dict | None = None

  def decomposition(self) -> dict[str, jax.Array]:
    """`uncertainty.routing_decomposition` with the weights each pixel was routed with
    (computed once for the three measures that read it)."""
    if self._decomposition is None:
      used = routers.at_prediction(self.routing, self.prediction)
      self._decomposition = uncertainty.routing_decomposition(
          self.expert_probs, routers.sample_member_weights(used))
    return self._decomposition


@dataclasses.dataclass(frozen=True)
class Measure:
  """One uncertainty measure (see the module docstring).

  Attributes:
    short: label in tables and panels ("PE").
    title: title of plots ("predictive entropy").
    source: "members" (raw(moments: uncertainty.Moments) -> [...]) or "routing"
      (raw(routed: Routed) -> [B,H,W]).
    raw: the raw value, as above.
    maximum: (num_classes, num_experts) -> the largest raw value (a float32 scalar).
  """
  short: str
  title: str
  source: str
  raw: Callable[..., jax.Array]
  maximum: Callable[[int, int], jax.Array | float]


MEASURES: dict[str, Measure] = {
    "predictive_entropy": Measure("PE", "predictive entropy", "members",
                                  uncertainty.predictive_entropy_of,
                                  lambda c, k: jnp.log(c)),
    "mutual_information": Measure("MI", "mutual information", "members",
                                  uncertainty.mutual_information_of,
                                  lambda c, k: jnp.log(c)),
    "expert_variance": Measure("EV", "expert variance", "members",
                               uncertainty.expert_variance_of,
                               lambda c, k: uncertainty.EV_MAX),
    "gate_entropy": Measure("GE", "gate entropy", "routing",
                            lambda r: routers.gate_entropy_map(r.routing, r.prediction),
                            lambda c, k: jnp.log(k) if k > 1 else 1.0),
    "routing_mutual_information": Measure(
        "RMI", "routing mutual information", "routing",
        lambda r: routers.routing_mutual_information_map(r.routing, r.prediction),
        lambda c, k: jnp.log(k) if k > 1 else 1.0),
    "routing_epistemic": Measure("RE", "routing-epistemic entropy", "routing",
                                 lambda r: r.decomposition()["routing_epistemic"],
                                 lambda c, k: jnp.log(c)),
    "expert_disagreement": Measure("ED", "expert disagreement", "routing",
                                   lambda r: r.decomposition()["expert_disagreement"],
                                   lambda c, k: jnp.log(c)),
    "aleatoric": Measure("AL", "aleatoric entropy", "routing",
                         lambda r: r.decomposition()["aleatoric"], lambda c, k: jnp.log(c)),
}


def of_source(source: str) -> tuple[str, ...]:
  """The names of the measures computed from `source` ("members" or "routing")."""
  return tuple(name for name, m in MEASURES.items() if m.source == source)


def normalise(name: str, raw: jax.Array, num_classes: int, num_experts: int = 1) -> jax.Array:
  """Raw measure `name` -> [0, 1]: ÷ its maximum, clipped (rounding only)."""
  return jnp.clip(raw / MEASURES[name].maximum(num_classes, num_experts), 0.0, 1.0)


def members_maps(moments: uncertainty.Moments) -> dict[str, jax.Array]:
  """Normalised maps [...] of every "members" measure of a sample set."""
  return normalised({name: MEASURES[name].raw(moments) for name in of_source("members")},
                    moments.reference.shape[-1])


def routing_maps(routed: Routed) -> dict[str, jax.Array]:
  """Normalised maps [B, H, W] of the "routing" measures of an MoE."""
  num_experts, num_classes = routed.expert_probs.shape[0], routed.expert_probs.shape[-1]
  return normalised({name: MEASURES[name].raw(routed) for name in of_source("routing")},
                    num_classes, num_experts)


def normalised(raw: dict[str, jax.Array], num_classes: int,
               num_experts: int = 1) -> dict[str, jax.Array]:
  """Every measure of a dict of raw maps -> [0, 1]; other keys pass through."""
  return {key: normalise(key, value, num_classes, num_experts) if key in MEASURES else value
          for key, value in raw.items()}
