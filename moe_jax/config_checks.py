"""The config, checked once before any work (`validate`), and which keys may change
between runs of one workdir.

Every key a later stage reads is checked here, so that a bad value stops the run in its
first second, not after hours of training. A bad value raises `ConfigError`, one line
naming the key and the fix; `python -m moe_jax.main` prints it as `error: ...` (it
catches the type, not the message). Values that depend on the data (a batch larger than a
split) are checked when the data is read.
"""

from __future__ import annotations

import ml_collections

# Keys that may change between runs in one workdir: they do not change what was trained.
MUTABLE_CONFIG_KEYS = ("eval.", "calibrate.", "train.log_every", "train.keep_checkpoints",
                       "train.nonfinite", "model.deep_ensemble_members",
                       "train.deep_ensemble.", "mesh.")
# Keys added after workdirs existed, with the value that means "as before": a workdir whose
# config.json lacks one of them matches a config holding that value.
# The Bayesian routers' settings (config model.routing; see
# moe_jax.models.bayesian_routers.RoutingSettings for what each means).
ROUTING_DEFAULTS = dict(
    prior_std=1.0,            # σ0 of the prior N(l_det, σ0² I) (mfvr, fcvr; vtsr's log T)
    kl_weight=1e-2,           # β in CE + β·KL (mfvr, fcvr, vtsr)
    dropout=0.1,              # mcdr's rate on the router's input
    swag_rank=10,             # swagr's deviation matrix rank
    swag_start=0.5,           # swagr collects after this fraction of the gate's steps,
    swag_every=1,             # every this many steps
    ensemble=4,               # der's M routers
    temperature=1.0,          # temp_sampling's T
    hard=False,               # temp_sampling, vtsr: one-hot selection (straight-through)
    max_log_temperature=3.0,  # vtsr's clip of log T
    warmup_steps=10)          # vtsr's ramp from T = 1
# The robust gate objectives' settings (config train.robust; see
# moe_jax.losses.RobustSettings for what each means).
ROBUST_DEFAULTS = dict(
    eta=2.0,                  # η of softmax(η ℓ) over the batch's images (the paper's)
    pixel_eta=0.2,            # η when unit="pixel"
    unit="image",             # "image" (an image's mean pixel NLL) or "pixel"
    warmup=0.4,               # fraction of the gate's steps trained by ERM first (20/50)
    detach=False,             # True: no gradient through the weights (true DRO/TERM)
    tau_r=1e-6,               # Robust Filtered: regret threshold
    tau_d=0.01)               # Robust Filtered: disagreement threshold
# The device mesh's axis sizes (config mesh; see moe_jax/sharding.py): -1 = every device
# the other axis leaves.
MESH_DEFAULTS = dict(data=-1, expert=1)
ADDED_CONFIG_KEYS = {"model.backbone_weights": "", "model.routers": ["deterministic"],
                     "model.bayesian_gates": [],
                     **{f"model.routing.{key}": value for key, value in ROUTING_DEFAULTS.items()},
                     "train.gate_objectives": ["erm"], "train.objective_gates": [],
                     "train.experts.init_from": "", "eval.micro_batch": 1,
                     **{f"mesh.{key}": value for key, value in MESH_DEFAULTS.items()},
                     **{f"train.robust.{key}": value for key, value in ROBUST_DEFAULTS.items()}}

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
NONFINITE = ("stop", "skip")
EXPERTS_INIT_FROM = ("", "baseline")


class ConfigError(ValueError):
  """A config value no stage accepts. The message is one line naming the key and the fix."""


def positive_int(value, key: str, *, allow_zero: bool = False) -> int:
  """`value` if it is an int > 0 (or >= 0 with allow_zero), else ConfigError naming `key`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
    raise ConfigError(f"config key {key}={value!r} must be a "
                      f"{'non-negative' if allow_zero else 'positive'} integer.")
  return value


def one_of(value, choices, key: str):
  """`value` if it is one of `choices`, else ConfigError naming `key` and the choices."""
  if value not in choices:
    *rest, last = map(repr, choices)
    raise ConfigError(f"config key {key}={value!r}; use {', '.join(rest)}"
                      f"{' or ' if rest else ''}{last}.")
  return value


def image_size(size) -> tuple[int, int]:
  """data.image_size as (H, W) if both are positive multiples of 16, else ConfigError."""
  size = tuple(size)
  if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
    raise ConfigError(f"config key data.image_size={size!r} must be two positive ints "
                      "(height, width), e.g. --config.data.image_size='(96,160)'.")
  if size[0] % 16 or size[1] % 16:
    raise ConfigError(f"config key data.image_size={size!r} must be multiples of 16 (the "
                      "backbone's output stride), e.g. --config.data.image_size='(96,160)'.")
  return size


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every key the stages read (see the module docstring).

  Raises:
    ConfigError: the first bad value. data_pipelines.DataError: an unknown data.name.
  """
  from data_pipelines import registry
  from moe_jax import evaluate, methods, stages
  from moe_jax.models import backbone, bayesian_routers, moe, routers

  registry.get(config.data.name)
  image_size(config.data.image_size)
  one_of(config.model.backbone, tuple(backbone.DEPTHS), "model.backbone")
  one_of(config.model.expert_execution, moe.EXECUTIONS, "model.expert_execution")
  gates = tuple(config.model.gates)
  if not gates or len(set(gates)) != len(gates) or not set(gates) <= set(routers.ROUTERS):
    raise ConfigError(f"config key model.gates={gates!r} must name distinct gate types "
                      f"from the routers {tuple(routers.ROUTERS)}, e.g. "
                      "--config.model.gates='(\"simple\",)'.")
  _check_routing(config, gates, bayesian_routers)
  variant_routers = tuple(config.eval.variant_routers)
  if not set(variant_routers) <= set(bayesian_routers.BAYESIAN_ROUTERS):
    raise ConfigError(f"config key eval.variant_routers={variant_routers!r} must name routers "
                      f"of {tuple(bayesian_routers.BAYESIAN_ROUTERS)} (() = every router).")
  positive_int(config.model.deep_ensemble_members, "model.deep_ensemble_members",
               allow_zero=True)
  one_of(config.train.nonfinite, NONFINITE, "train.nonfinite")
  one_of(config.train.experts.get("init_from", ""), EXPERTS_INIT_FROM, "train.experts.init_from")
  positive_int(config.train.keep_checkpoints, "train.keep_checkpoints")
  mesh = config.get("mesh", {})
  for axis in mesh:
    if axis not in MESH_DEFAULTS:
      raise ConfigError(f"config key mesh.{axis} is unknown; the mesh axes are "
                        f"{', '.join(MESH_DEFAULTS)}.")
    if isinstance(mesh[axis], bool) or not isinstance(mesh[axis], int):
      raise ConfigError(f"config key mesh.{axis}={mesh[axis]!r} must be an integer.")
  positive_int(config.train.log_every, "train.log_every")
  for name, stage in stages.STAGES.items():
    if not stage.checkpoints(config):
      continue
    section = config.train[name]
    for key in ("batch_size", "epochs", "eval_every_epochs"):
      positive_int(section[key], f"train.{name}.{key}")
    one_of(section.optimizer.name, OPTIMIZERS, f"train.{name}.optimizer.name")
    one_of(section.optimizer.schedule, SCHEDULES, f"train.{name}.optimizer.schedule")
  positive_int(config.eval.batch_size, "eval.batch_size")
  positive_int(config.eval.micro_batch, "eval.micro_batch")
  passes = tuple(config.eval.mc_dropout_passes)
  for t in passes:
    positive_int(t, "eval.mc_dropout_passes")
  one_of(config.eval.moe_members, methods.MOE_MEMBERS, "eval.moe_members")
  one_of(config.eval.ev_at, methods.EV_AT, "eval.ev_at")
  ood = tuple(config.eval.ood_splits)
  if ood and (len(ood) != 2 or not set(ood) <= set(config.data.test_splits)):
    raise ConfigError(f"config key eval.ood_splits={ood} must be two of "
                      f"data.test_splits={tuple(config.data.test_splits)} (ID, OOD), or ().")
  positive_int(config.eval.panel_images, "eval.panel_images", allow_zero=True)
  positive_int(config.eval.stability_images, "eval.stability_images", allow_zero=True)
  positive_int(config.eval.stability_top_k, "eval.stability_top_k")
  for sigma in config.eval.stability_noise:
    _positive_float(sigma, "eval.stability_noise")
  positive_int(config.eval.patch_size, "eval.patch_size", allow_zero=True)
  evaluate.corrupted_splits(config)
  _check_objectives(config)
  positive_int(config.calibrate.max_pixels, "calibrate.max_pixels")
  positive_int(config.calibrate.iterations, "calibrate.iterations")
  one_of(config.calibrate.expert_region, ("domain", "all"), "calibrate.expert_region")
  bounds = tuple(config.calibrate.bounds)
  if len(bounds) != 2 or not 0 < _positive_float(bounds[0], "calibrate.bounds") <= 1 \
      or _positive_float(bounds[1], "calibrate.bounds") < 1:
    raise ConfigError(f"config key calibrate.bounds={bounds!r} must be (lowest, highest) "
                      "temperatures with 0 < lowest <= 1 <= highest, e.g. (0.1, 10.0).")


def _check_objectives(config: ml_collections.ConfigDict) -> None:
  from moe_jax import losses
  objectives = tuple(config.train.gate_objectives)
  if not objectives or len(set(objectives)) != len(objectives) \
      or not set(objectives) <= set(losses.GATE_OBJECTIVES):
    raise ConfigError(f"config key train.gate_objectives={objectives!r} must name distinct "
                      f"objectives from {losses.GATE_OBJECTIVES}, e.g. "
                      "--config.train.gate_objectives='(\"erm\", \"robust\")'.")
  objective_gates = tuple(config.train.objective_gates)
  if not set(objective_gates) <= set(config.model.gates):
    raise ConfigError(f"config key train.objective_gates={objective_gates!r} must name gates "
                      f"of model.gates={tuple(config.model.gates)} (() = every gate).")
  robust = config.train.robust
  _positive_float(robust.eta, "train.robust.eta")
  _positive_float(robust.pixel_eta, "train.robust.pixel_eta")
  one_of(robust.unit, ("image", "pixel"), "train.robust.unit")
  if not isinstance(robust.warmup, (int, float)) or not 0 <= robust.warmup < 1:
    raise ConfigError(f"config key train.robust.warmup={robust.warmup!r} must be a fraction "
                      "of the gate's steps in [0, 1).")
  for key in ("tau_r", "tau_d"):
    if not isinstance(robust[key], (int, float)) or robust[key] < 0:
      raise ConfigError(f"config key train.robust.{key}={robust[key]!r} must be >= 0.")


def _positive_float(value, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
      or value == float("inf"):
    raise ConfigError(f"config key {key}={value!r} must be a positive finite number.")
  return float(value)


def _check_routing(config: ml_collections.ConfigDict, gates: tuple, bayesian_routers) -> None:
  """model.routers, model.bayesian_gates, model.routing and eval.routing_samples."""
  names = tuple(config.model.routers)
  if not names or len(set(names)) != len(names) or not set(names) <= set(
      bayesian_routers.BAYESIAN_ROUTERS):
    raise ConfigError(f"config key model.routers={names!r} must name distinct routers from "
                      f"{tuple(bayesian_routers.BAYESIAN_ROUTERS)}, e.g. "
                      "--config.model.routers='(\"deterministic\",\"mfvr\")'.")
  chosen = tuple(config.model.bayesian_gates)
  if not set(chosen) <= set(gates):
    raise ConfigError(f"config key model.bayesian_gates={chosen!r} must be gate types of "
                      f"model.gates={gates!r} (or () for all of them).")
  routing = config.model.routing
  for key in ("prior_std", "kl_weight", "temperature", "max_log_temperature"):
    _positive_float(routing[key], f"model.routing.{key}")
  if not 0.0 <= routing.dropout < 1.0:
    raise ConfigError(f"config key model.routing.dropout={routing.dropout!r} must be in "
                      "[0, 1).")
  if not 0.0 <= routing.swag_start < 1.0:
    raise ConfigError(f"config key model.routing.swag_start={routing.swag_start!r} must be "
                      "in [0, 1) (the fraction of the gate's steps before SWAG collects).")
  for key in ("swag_rank", "swag_every", "ensemble"):
    positive_int(routing[key], f"model.routing.{key}")
  positive_int(routing.warmup_steps, "model.routing.warmup_steps", allow_zero=True)
  positive_int(config.eval.routing_samples, "eval.routing_samples")
