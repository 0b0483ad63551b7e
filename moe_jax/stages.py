"""The trained stages, one table (`STAGES`) that train, evaluate, predict and main read.

Each entry describes a stage once: the checkpoints it writes (the gate stage writes one
per router in model.gates), the model each of them holds, the data it trains on, its loss,
which parameters train, how it is validated, how `evaluate` runs it and what `predict`
returns for it. The order of `STAGES` is the order the pipeline runs them in.

  stage          checkpoints            model                    trains on
  baseline       baseline               one DeepLabv3+           data.train_split
  experts        experts                K stacked experts        expert k: its domain
  deep_ensemble  deep_ensemble          M stacked models         data.train_split, M seeds
  gate           gate_<gate>[_<router>] the MoE, experts frozen  data.train_split

A new stage is one entry here plus its functions; `python -m moe_jax.main` runs it between
its neighbours, `evaluate` evaluates it when it has an `evaluation`, and
`moe_jax.restore(workdir, stage=...)` restores it when it has a `predictor`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable

from flax import nnx
import ml_collections

from moe_jax import checkpoint, input_pipeline, losses, methods
from moe_jax.models import build

Config = ml_collections.ConfigDict
# (model, images float32 [B,h,w,3], key) -> {"member_logits" [S,B,h,w,C], and for an MoE
# "logits" [B,h,w,C] and "routing"}: what `moe_jax.predict` needs of a restored model.
Members = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trained stage (see the module docstring).

  Attributes:
    checkpoints: config -> the checkpoint names it writes, in training order (() when the
      config turns the stage off).
    model: (config, checkpoint name) -> the model that checkpoint holds, freshly built
      (the restore target; training starts from it unless `training_model` is given).
    loss: (config, checkpoint name) -> (model, batch) -> scalar, the same object each
      time (static under jit). batch also holds "step" (1-based) and "total_steps".
    train_splits: config -> the split each member trains on (one for a plain model).
    stacked: the model has a leading member axis; member k takes batches of
      train_splits[k], stacked to [K, B, ...].
    validation: (config, checkpoint names) -> (their models -> each one's validation
      mIoU), all of them in one pass over the val data.
    training_models: (config, workdir, checkpoint names) -> the models training starts
      from (the gate: the trained experts, one module shared by every MoE, each around a
      fresh router); default `model` of each.
    trains: the nnx filter of the parameters that train.
    train_mode: False keeps the whole model in eval mode while training (frozen experts).
    pretrained_backbone: model.backbone_weights initialises its backbone(s).
    init_from: config -> the stage (trained before it) whose best checkpoint every member
      starts from, or "" (experts: train.experts.init_from = "baseline" fine-tunes each
      expert from the one model trained on all data); None: never.
    evaluation: config -> (output function taking the tuple of the models of all its
      checkpoints, in order, {output key: method name}); None: not evaluated on its own.
    predictor: (config, checkpoint name, MC-dropout passes) -> (method name, Members).
    off_reason: what turns the stage off (printed when `checkpoints` is empty).
    after_step: (model, step, total steps) -> None, called after each optimiser step
      (the gate stage: SWAG's collection); None: nothing.
    hold_learning_rate: (config, checkpoint name) -> the fraction of the steps after which
      the learning rate stays constant (`train.learning_rate`), or None; the gate stage:
      swagr's collection phase.
    shared: (models, batch) -> the batch plus what every checkpoint's loss reads, computed
      once per step for all of them (`train.train_step`; the gate stage: the frozen
      experts' outputs); None: nothing shared.
  """
  checkpoints: Callable[[Config], tuple[str, ...]]
  model: Callable[[Config, str], nnx.Module]
  loss: Callable
  train_splits: Callable[[Config], list[str]]
  stacked: bool
  validation: Callable[[Config, tuple[str, ...]], Callable[[tuple], list[float]]]
  training_models: Callable[[Config, Path, tuple[str, ...]], tuple] | None = None
  trains: object = nnx.Param
  train_mode: bool = True
  pretrained_backbone: bool = False
  init_from: Callable[[Config], str] | None = None
  evaluation: Callable[[Config], tuple[Callable, dict[str, str]]] | None = None
  predictor: Callable[[Config, str, int], tuple[str, Members]] | None = None
  off_reason: str = ""
  after_step: Callable[[nnx.Module, int, int], None] | None = None
  hold_learning_rate: Callable[[Config, str], float | None] | None = None
  shared: Callable[[tuple, dict], dict] | None = None


# ------------------------------------------------------------------------------ experts

def _expert_names(config: Config) -> list[str]:
  return input_pipeline.expert_names(config.data)


def expert_methods(config: Config) -> list[str]:
  """The experts' method names, in expert order: "expert_<name>"."""
  return [f"expert_{name}" for name in _expert_names(config)]


def _expert_splits(config: Config, part: str) -> list[str]:
  return [input_pipeline.expert_split(config.data, name, part)
          for name in _expert_names(config)]


def _experts_model(config: Config, name: str) -> nnx.Module:
  del name
  return build.experts(config, len(_expert_names(config)))


def _stacked_members(members, x, key):
  del key
  return {"member_logits": members(x)[0]}


# ----------------------------------------------------------------------------- baseline

@functools.cache
def _of_one(outputs: Callable) -> Callable:
  """The output function of one model as one taking the 1-tuple of a stage's models (the
  same object for the same function, so jit compiles it once)."""
  def of_tuple(models, images, key, calibration=None):
    (model,) = models
    return (outputs(model, images, key) if calibration is None
            else outputs(model, images, key, calibration))
  return of_tuple


def _baseline_evaluation(config: Config) -> tuple[Callable, dict[str, str]]:
  passes = tuple(config.eval.mc_dropout_passes)
  names = {"model": "baseline", **{f"mc_dropout_{t}": f"mc_dropout_{t}" for t in passes}}
  return (_of_one(methods.single_and_mc_dropout_with(passes)),
          {**names, **{f"{key}_ts": f"{name}_ts" for key, name in names.items()}})


@functools.cache
def _mc_dropout_members(passes: int) -> Members:
  def members(model, x, key):
    return {"member_logits": methods.mc_dropout_logits(model, x, key, passes)}
  return members


# -------------------------------------------------------------------------------- gates

@dataclasses.dataclass(frozen=True)
class GateSpec:
  """One MoE the gate stage trains: gate type (routers.ROUTERS), Bayesian router
  (bayesian_routers.BAYESIAN_ROUTERS) and training objective (losses.GATE_OBJECTIVES)."""
  gate: str
  router: str = "deterministic"
  objective: str = "erm"

  @property
  def suffix(self) -> str:
    """"simple", "simple_mcdr", "simple_robust": the defaults (the paper's
    deterministic gate trained by ERM) add nothing, so older runs keep their names."""
    return "_".join([self.gate] + [part for part, default in
                                   ((self.router, "deterministic"), (self.objective, "erm"))
                                   if part != default])

  @property
  def checkpoint(self) -> str:
    """Its checkpoint: "gate_simple", "gate_simple_mcdr", "gate_simple_robust", ..."""
    return f"gate_{self.suffix}"

  @property
  def method(self) -> str:
    """Its evaluated method: "moe_simple", "moe_simple_mcdr", "moe_simple_robust", ..."""
    return f"moe_{self.suffix}"


def gate_specs(config: Config) -> list[GateSpec]:
  """Every MoE the gate stage trains, in order: each gate of model.gates with the
  deterministic router (if in model.routers) trained by ERM and, around each gate of
  train.objective_gates (() = every gate), by each other objective of
  train.gate_objectives; then each other router of model.routers around each gate of
  model.bayesian_gates (() = every gate), trained by ERM (its loss holds its own KL)."""
  gates = tuple(config.model.gates)
  routers = tuple(config.model.get("routers", ("deterministic",)))
  bayesian_gates = tuple(config.model.get("bayesian_gates", ())) or gates
  objectives = tuple(config.train.get("gate_objectives", ("erm",)))
  objective_gates = tuple(config.train.get("objective_gates", ())) or gates
  specs = []
  for gate in gates:
    for router in routers:
      if router == "deterministic":
        specs += [GateSpec(gate, router, objective) for objective in objectives
                  if objective == "erm" or gate in objective_gates]
      elif gate in bayesian_gates:
        specs.append(GateSpec(gate, router))
  return specs


def _gate_spec(config: Config, name: str) -> GateSpec:
  for spec in gate_specs(config):
    if spec.checkpoint == name:
      return spec
  raise KeyError(name)


def _gate_model(config: Config, name: str) -> nnx.Module:
  spec = _gate_spec(config, name)
  return build.mixture(config, _experts_model(config, "experts"), spec.gate, spec.router)


def _gate_training_models(config: Config, workdir: Path, names: tuple[str, ...]
                          ) -> tuple[nnx.Module, ...]:
  """The MoEs of `names` around one module, the experts stage's best checkpoint (each
  router freshly initialised)."""
  experts, _ = checkpoint.restore_model(workdir, "experts",
                                        lambda: _experts_model(config, "experts"))
  return tuple(build.mixture(config, experts, spec.gate, spec.router)
               for spec in map(functools.partial(_gate_spec, config), names))


# The variants `methods.mixtures` evaluates of each MoE, as suffixes of its method name:
# top-1 routing, and with the calibrate stage's temperatures the aggregate temperature,
# MoCaE's tempered experts (soft and hard) and both.
MOE_VARIANTS = ("", "_hard", "_ts", "_mocae", "_mocae_hard", "_mocae_ts")


def moe_variants(config: Config, spec: GateSpec) -> tuple[str, ...]:
  """The MOE_VARIANTS evaluated of that MoE: all of them when its router is one of
  eval.variant_routers (() = every router), else only itself ("",)."""
  routers = tuple(config.eval.get("variant_routers", ()))
  return MOE_VARIANTS if not routers or spec.router in routers else ("",)


def _gates_evaluation(config: Config) -> tuple[Callable, dict[str, str]]:
  """Every MoE (gate type x router) in one call (the frozen experts run once and also give
  the experts and their uniform ensemble), each with its `moe_variants`."""
  specs = gate_specs(config)
  return (methods.mixtures_with(config.eval.moe_members, config.eval.ev_at,
                                tuple(len(moe_variants(config, spec)) > 1 for spec in specs)),
          {"ensemble": "ensemble",
           **{f"expert_{k}": name for k, name in enumerate(expert_methods(config))},
           **{f"moe_{i}{variant}": spec.method + variant
              for i, spec in enumerate(specs) for variant in moe_variants(config, spec)}})


def _moe_members(moe, x, key):
  out = moe(x, key)
  return {"member_logits": out["expert_logits"], "logits": out["logits"],
          "routing": out["routing"]}


# train and its validations read data through TensorFlow: imported when a stage trains, so
# that restoring and predicting never import it.

def _validation(outputs: Callable, key: str):
  def make(config: Config, names: tuple[str, ...]) -> Callable[[tuple], list[float]]:
    del names  # one checkpoint
    from moe_jax import train
    return train.validation(config, _of_one(outputs), [key])
  return make


def _stacked_validation(val_splits: Callable[[Config], list[str]]):
  def make(config: Config, names: tuple[str, ...]) -> Callable[[tuple], list[float]]:
    del names  # one checkpoint
    from moe_jax import train
    return train.stacked_validation(config, val_splits(config))
  return make


def _gates_validation(config: Config, names: tuple[str, ...]) -> Callable[[tuple], list[float]]:
  """Each MoE's mIoU, all around the experts run once per batch."""
  from moe_jax import train
  return train.validation(config, methods.mixtures_with("weighted",
                                                        variants=(False,) * len(names)),
                          [f"moe_{i}" for i in range(len(names))])


# Parameters the gate stage trains; everything else in the MoE (the experts) is frozen.
GATE_PARAMS = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("gate"),
                                         nnx.PathContains("fusion_conv")))


STAGES: dict[str, Stage] = {
    "baseline": Stage(
        checkpoints=lambda config: ("baseline",),
        model=lambda config, name: build.baseline(config),
        loss=lambda config, name: losses.single_loss,
        train_splits=lambda config: [config.data.train_split],
        stacked=False,
        validation=_validation(methods.single, "model"),
        pretrained_backbone=True,
        evaluation=_baseline_evaluation,
        predictor=lambda config, name, passes: (f"mc_dropout_{passes}",
                                                _mc_dropout_members(passes))),
    "experts": Stage(
        checkpoints=lambda config: ("experts",),
        model=_experts_model,
        loss=lambda config, name: losses.expert_loss,
        train_splits=lambda config: _expert_splits(config, "train"),
        stacked=True,
        validation=_stacked_validation(lambda config: _expert_splits(config, "val")),
        pretrained_backbone=True,
        init_from=lambda config: config.train.experts.get("init_from", ""),
        predictor=lambda config, name, passes: ("ensemble", _stacked_members)),
    "deep_ensemble": Stage(
        checkpoints=lambda config: ("deep_ensemble",) if config.model.deep_ensemble_members
        else (),
        model=lambda config, name: build.deep_ensemble(config),
        loss=lambda config, name: losses.expert_loss,
        train_splits=lambda config: ([config.data.train_split]
                                     * config.model.deep_ensemble_members),
        stacked=True,
        validation=_stacked_validation(
            lambda config: [config.data.val_split] * config.model.deep_ensemble_members),
        pretrained_backbone=True,
        evaluation=lambda config: (_of_one(methods.deep_ensemble),
                                   {"deep_ensemble": "deep_ensemble",
                                    "deep_ensemble_ts": "deep_ensemble_ts"}),
        predictor=lambda config, name, passes: ("deep_ensemble", _stacked_members),
        off_reason="config key model.deep_ensemble_members=0"),
    "gate": Stage(
        checkpoints=lambda config: tuple(spec.checkpoint for spec in gate_specs(config)),
        model=_gate_model,
        training_models=_gate_training_models,
        loss=lambda config, name: losses.gate_loss(
            _gate_spec(config, name).objective, losses.RobustSettings.from_config(config)),
        train_splits=lambda config: [config.data.train_split],
        stacked=False,
        validation=_gates_validation,
        trains=GATE_PARAMS,
        train_mode=False,
        evaluation=_gates_evaluation,
        predictor=lambda config, name, passes: (_gate_spec(config, name).method,
                                                _moe_members),
        after_step=lambda moe, step, total: moe.gate.after_train_step(step, total),
        hold_learning_rate=lambda config, name: (
            config.model.routing.swag_start
            if _gate_spec(config, name).router == "swagr" else None),
        shared=losses.with_expert_outputs),
}


def stage_of(config: Config, name: str) -> tuple[str, Stage]:
  """(stage name, Stage) of the checkpoint `name` in this config; KeyError if none."""
  for stage_name, stage in STAGES.items():
    if name in stage.checkpoints(config):
      return stage_name, stage
  raise KeyError(name)


def all_checkpoints(config: Config) -> list[str]:
  """Every checkpoint the config's stages write, in training order."""
  return [name for stage in STAGES.values() for name in stage.checkpoints(config)]
