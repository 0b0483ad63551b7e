"""Every model of a run, built from the config alone (training, evaluation and restore).

Random initialisation is seeded per model from `config.seed`, so each stage's model starts
the same way in every run of the same config. Every key is made here with the "rbg" PRNG
(`key`), whatever JAX's process-wide default: it initialises the paper's ResNet-101
experts ~4x faster than threefry on CPU (docs/measured_facts.md), and a model built by the
library, the CLI or a restore holds the same kind of keys, so any of them restores any
checkpoint.
"""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from moe_jax.models import bayesian_routers
from moe_jax.models.deeplab import DeepLabV3Plus
from moe_jax.models.moe import MixtureOfExperts, StackedExperts, make_expert

# Offsets of config.seed per model, so the experts, the baseline, the deep ensemble and
# the gate never share initial weights or dropout streams.
SEED_OFFSETS = {"experts": 0, "baseline": 1000, "deep_ensemble": 2000, "gate": 3000}
PRNG_IMPL = "rbg"


def key(seed: int) -> jax.Array:
  """A typed PRNG key of the library's implementation (PRNG_IMPL)."""
  return jax.random.key(seed, impl=PRNG_IMPL)


def rngs(config: ml_collections.ConfigDict, model: str) -> nnx.Rngs:
  """The initialisation and dropout streams of `model` (a key of SEED_OFFSETS)."""
  return nnx.Rngs(key(config.seed + SEED_OFFSETS[model]))


def experts(config: ml_collections.ConfigDict, num: int) -> StackedExperts:
  """K DeepLabv3+ experts with stacked parameters ([K, ...] leading axis)."""
  return StackedExperts(make_expert(config.model, config.data.num_classes), num,
                        execution=config.model.expert_execution,
                        rngs=rngs(config, "experts"))


def baseline(config: ml_collections.ConfigDict) -> DeepLabV3Plus:
  """One DeepLabv3+ trained on all data: the MC-dropout baseline."""
  make = make_expert(config.model, config.data.num_classes)
  return make(rngs(config, "baseline"))


def deep_ensemble(config: ml_collections.ConfigDict) -> StackedExperts:
  """M DeepLabv3+ models trained on all data with different seeds, stacked like experts."""
  return StackedExperts(make_expert(config.model, config.data.num_classes),
                        config.model.deep_ensemble_members,
                        execution=config.model.expert_execution,
                        rngs=rngs(config, "deep_ensemble"))


def mixture(config: ml_collections.ConfigDict, stacked_experts: StackedExperts,
            gate: str, router: str = "deterministic") -> MixtureOfExperts:
  """The MoE: the given experts + a fresh router (gate type `gate`, a name in
  `routers.ROUTERS`, inside Bayesian router `router`, a name in
  `bayesian_routers.BAYESIAN_ROUTERS`, with config.model.routing's settings) and fusion
  conv from `config.model`."""
  return MixtureOfExperts(stacked_experts, num_classes=config.data.num_classes,
                          image_size=tuple(config.data.image_size), gate=gate,
                          router=router,
                          routing=bayesian_routers.RoutingSettings.from_config(config),
                          fusion_conv=config.model.fusion_conv,
                          gate_hidden=config.model.gate_hidden,
                          rngs=rngs(config, "gate"))
