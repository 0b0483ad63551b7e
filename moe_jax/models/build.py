"""Every model of a run, built from the config alone (training, evaluation and restore).

Random initialisation is seeded per model from `config.seed`, so each stage's model starts
the same way in every run of the same config.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from moe_jax.models.deeplab import DeepLabV3Plus
from moe_jax.models.moe import MixtureOfExperts, StackedExperts, make_expert

# Offsets of config.seed per model, so the experts, the baseline, the deep ensemble and
# the gate never share initial weights or dropout streams.
SEED_OFFSETS = {"experts": 0, "baseline": 1000, "deep_ensemble": 2000, "gate": 3000}
GATES = ("simple", "classwise")


def experts(config: ml_collections.ConfigDict, num: int) -> StackedExperts:
  """K DeepLabv3+ experts with stacked parameters ([K, ...] leading axis)."""
  return StackedExperts(make_expert(config.model, config.data.num_classes), num,
                        execution=config.model.expert_execution,
                        rngs=nnx.Rngs(config.seed + SEED_OFFSETS["experts"]))


def baseline(config: ml_collections.ConfigDict) -> DeepLabV3Plus:
  """One DeepLabv3+ trained on all data: the MC-dropout baseline."""
  make = make_expert(config.model, config.data.num_classes)
  return make(nnx.Rngs(config.seed + SEED_OFFSETS["baseline"]))


def deep_ensemble(config: ml_collections.ConfigDict) -> StackedExperts:
  """M DeepLabv3+ models trained on all data with different seeds, stacked like experts."""
  return StackedExperts(make_expert(config.model, config.data.num_classes),
                        config.model.deep_ensemble_members,
                        execution=config.model.expert_execution,
                        rngs=nnx.Rngs(config.seed + SEED_OFFSETS["deep_ensemble"]))


def gate_types(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The config's gate types (model.gates), validated: one MoE is trained per type."""
  gates = tuple(config.model.gates)
  if not gates or len(set(gates)) != len(gates) or not set(gates) <= set(GATES):
    raise ValueError(f"config key model.gates={gates!r} must name distinct gate types "
                     f"from {GATES}, e.g. --config.model.gates='(\"simple\",)'.")
  return gates


def gate_stage(gate: str) -> str:
  """The checkpoint name of the MoE with `gate`: "gate_simple", "gate_classwise"."""
  return f"gate_{gate}"


def mixture(config: ml_collections.ConfigDict, stacked_experts: StackedExperts,
            gate: str) -> MixtureOfExperts:
  """The MoE: the given experts + a fresh `gate` (and fusion conv) from `config.model`."""
  return MixtureOfExperts(stacked_experts, num_classes=config.data.num_classes,
                          image_size=tuple(config.data.image_size), gate=gate,
                          fusion_conv=config.model.fusion_conv,
                          gate_hidden=config.model.gate_hidden,
                          rngs=nnx.Rngs(config.seed + SEED_OFFSETS["gate"]))
