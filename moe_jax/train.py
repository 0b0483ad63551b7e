"""Training: optimisers, the one compiled train step, the loop, and running a stage.

Every stage of `moe_jax.stages.STAGES` (experts, baseline, deep_ensemble, gate) is the same
loop (`fit`) around the same compiled step (`train_step`) with the models, losses, batches
and optimiser filter its entry names (`run`). Stacked models (the K experts, a deep
ensemble) take member k's batch from its own stream, stacked to [K, B, ...], so all K
cost one compiled step. The gate stage trains the routers of its MoEs (one per gate type,
router and objective) whose experts are frozen (eval-mode BatchNorm, no dropout, no
gradients), all of them in one loop: each step runs the shared experts once and steps
every router on its own loss.

Each stage validates (mIoU) and checkpoints every `eval_every_epochs`, keeps the best,
skips itself when already finished and resumes from its last checkpoint otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from moe_jax import checkpoint, evaluate, input_pipeline, methods, metrics, sharding, stages
from moe_jax.config_checks import ConfigError
from moe_jax.models import build, pretrained

def learning_rate(config: ml_collections.ConfigDict, total_steps: int, *,
                  hold_from: float | None = None, key: str = "train.optimizer"):
  """The learning rate (a float or an optax schedule) of an optimiser config section.

  hold_from: a fraction of total_steps after which the rate stays at the value it has
  there (SWAG's collection phase: SWA-style constant steps, so the collected iterates
  spread around the optimum instead of converging); None: the schedule as configured.
  """
  if config.schedule == "constant":
    return config.learning_rate
  if config.schedule != "cosine":
    raise ConfigError(f"config key {key}.schedule={config.schedule!r}; use "
                      "'constant' or 'cosine'.")
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))
  if hold_from is None:
    return schedule
  boundary = int(hold_from * total_steps)
  return optax.join_schedules([schedule, optax.constant_schedule(schedule(boundary))],
                              [boundary])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, *,
                   key: str = "train.optimizer", hold_from: float | None = None):
  """optax optimiser from an optimiser config section (`key` names it in errors).

  Keys: name ("sgd" | "adamw"), learning_rate, momentum (sgd), weight_decay,
  schedule ("constant" | "cosine"); hold_from: see `learning_rate`. SGD's weight decay is
  added to the gradient before momentum, as torch.optim.SGD does (the reference's
  optimiser).
  """
  lr = learning_rate(config, total_steps, hold_from=hold_from, key=key)
  if config.name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(lr, momentum=config.momentum or None))
  if config.name == "adamw":
    return optax.adamw(lr, weight_decay=config.weight_decay)
  raise ConfigError(f"config key {key}.name={config.name!r}; use 'sgd' or 'adamw'.")


@nnx.jit(static_argnums=(0, 4, 5, 6), donate_argnums=(1, 2))
def train_step(loss_fns: tuple[Callable, ...], models: tuple[nnx.Module, ...],
               optimizers: tuple[nnx.Optimizer, ...], batch: dict[str, jax.Array],
               skip_nonfinite: bool = False, shared: Callable | None = None,
               shardings: tuple[jax.sharding.Sharding, ...] | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """One optimiser step of each model on its own loss, all in one compiled call.

  Model i steps on `loss_fns[i](models[i], batch)`; `optimizers[i].wrt` decides what
  trains (e.g. only the gate), the same filter for every model. The models may share
  modules that do not train (the gate stage's MoEs share the frozen experts):
  `shared(models, batch)` -> the batch plus what every loss reads, computed once per step
  outside the gradients (the experts' outputs, `losses.with_expert_outputs`); None: the
  losses read the batch alone.

  Returns:
    (losses, finite): float32 [N], each model's loss, and bool [N], whether it and each of
    its gradients are finite. With `skip_nonfinite`, a model whose step is not finite
    keeps its state from before it (BatchNorm statistics and dropout RNG included), as
    does its optimiser; the other models step.

  `shardings`: those of the leaves of nnx.state((models, optimizers)) on the mesh, which
  the updated state keeps (`sharding.state_shardings`); without them XLA may choose other
  shardings for some outputs (a router's last layer split like the experts it weighs), and
  every step would move them back.
  """
  if shared is not None:
    batch = shared(models, batch)
  if skip_nonfinite:
    # Snapshots of the arrays (nnx.state refers to the live Variables).
    before = [jax.tree.map(lambda x: x, nnx.state(pair)) for pair in zip(models, optimizers)]

  def total(models, batch):  # model i's parameters reach only loss i
    each = jnp.stack([loss_fn(model, batch) for loss_fn, model in zip(loss_fns, models)])
    return jnp.sum(each), each

  (_, each), grads = nnx.value_and_grad(
      total, argnums=nnx.DiffState(0, optimizers[0].wrt), has_aux=True)(models, batch)
  finite = jnp.isfinite(each) & jnp.stack([
      jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad)]))
      for grad in grads])
  for model, optimizer, grad in zip(models, optimizers, grads):
    optimizer.update(model, grad)
  if skip_nonfinite:
    for i, pair in enumerate(zip(models, optimizers)):
      after = nnx.state(pair)
      nnx.update(pair, jax.lax.cond(finite[i], lambda: after, lambda: before[i]))
  if shardings is not None:
    nnx.update((models, optimizers), sharding.constrain(nnx.state((models, optimizers)),
                                                        shardings))
  return each, finite


@dataclasses.dataclass(frozen=True)
class Trainee:
  """One checkpoint `fit` trains.

  Attributes:
    name: its checkpoint and TensorBoard name ("experts", "gate_simple", ...).
    model, optimizer: what trains; `optimizer.wrt` decides which parameters move.
    loss_fn: `loss_fn(model, batch) -> scalar` (static for jit: a module-level function or
      a cached object); each batch also holds "step" (this step, 1-based) and
      "total_steps" (int32).
  """
  name: str
  model: nnx.Module
  optimizer: nnx.Optimizer
  loss_fn: Callable


def fit(trainees: Sequence[Trainee], *, batches: Callable[[int], Iterator[dict]],
        total_steps: int, eval_every: int,
        validate: Callable[[tuple[nnx.Module, ...]], Sequence[float]], workdir: str | Path,
        keep: int, log_every: int, images_per_step: int, train_mode: bool = True,
        section: str | None = None, nonfinite: str = "stop",
        after_step: Callable[[nnx.Module, int, int], None] | None = None,
        shared: Callable | None = None, mesh: jax.sharding.Mesh | None = None
        ) -> dict[str, dict]:
  """Trains the trainees together for `total_steps` on one stream of batches (one
  compiled step for all of them), validating and checkpointing each every `eval_every`.

  A finished trainee is skipped; the others resume from their latest checkpoints (model,
  optimiser and data position), which must be at the same step (`run` groups them), so
  the result equals an uninterrupted run's.

  Args:
    trainees: the checkpoints to train (one, or the gate stage's MoEs).
    batches: `batches(first_step)` -> iterator of batches for steps first_step+1, ...
    total_steps, eval_every: in optimiser steps.
    validate: the trainees' models (in eval mode) -> each one's validation mIoU.
    workdir: the run's directory (checkpoints/<name>, tensorboard/<name>).
    keep: checkpoints kept besides the best.
    log_every: steps between loss readouts (each readout waits for the device).
    images_per_step: for the images/s readout.
    train_mode: False keeps the whole model in eval mode (the gate stage: the frozen
      experts' BatchNorm must not drift and their dropout stays off).
    section: the stage's config section `train.<section>` (default: the first trainee's
      name), named in error messages.
    nonfinite: what a trainee's step whose loss or gradients are not finite does: "stop"
      raises FloatingPointError naming it and the step (no checkpoint is written after
      it); "skip" leaves that model and optimiser as they were before it and goes on
      (each skip is printed).
    after_step: (model, step, total_steps) -> None after each step, per trainee (e.g.
      SWAG's collection).
    shared: what every trainee's loss reads, computed once per step (`train_step`).
    mesh: the device mesh the models, optimisers and batches live on (`moe_jax.sharding`;
      `batches` yields arrays placed on it); None: this process's first device.

  Returns:
    {name: the meta dict of its best checkpoint ({"step", "val_miou", "finished"})}.
  """
  with contextlib.ExitStack() as stack:
    ckpts = [stack.enter_context(checkpoint.StageCheckpoints(
        workdir, trainee.name, save_every=eval_every, keep=keep)) for trainee in trainees]
    best = {t.name: _skipped(t.name, c.read_meta(c.best_step()), c.directory)
            for t, c in zip(trainees, ckpts) if c.is_finished()}
    active = [(t, c) for t, c in zip(trainees, ckpts) if t.name not in best]
    if not active:
      return {t.name: best[t.name] for t in trainees}
    starts = {c.latest_step() or 0 for _, c in active}
    if len(starts) > 1:
      raise ValueError(f"fit: {', '.join(t.name for t, _ in active)} resume from different "
                       f"steps {sorted(starts)}; train them apart (train.run groups them).")
    start = starts.pop()
    for trainee, ckpt in active:
      if start:
        restored, _ = ckpt.restore(None, _train_state(trainee.model, trainee.optimizer))
        nnx.update(trainee.model, restored["model"])
        nnx.update(trainee.optimizer, restored["optimizer"])
        print(f"{trainee.name}: resuming from the checkpoint at step {start} of {total_steps}")
    names = [t.name for t, _ in active]
    models = tuple(t.model for t, _ in active)
    optimizers = tuple(t.optimizer for t, _ in active)
    loss_fns = tuple(t.loss_fn for t, _ in active)
    from clu import metric_writers  # TensorFlow (~3 s): a command line error stays quick
    writers = [metric_writers.create_default_writer(
        str(Path(workdir) / "tensorboard" / name), just_logging=jax.process_index() > 0)
        for name in names]
    for model in models:
      _set_mode(model, train_mode)
    # Every array on the mesh, as the step's outputs are: a restored array is committed
    # and a fresh one is not, and that mix would compile the step a second time at step 2
    # (the gate stage's restored experts around fresh routers: ~11 s a gate).
    mesh = mesh or sharding.one_device_mesh()
    nnx.update((models, optimizers), sharding.place_state(nnx.state((models, optimizers)),
                                                          mesh))
    shardings = sharding.state_shardings(nnx.state((models, optimizers)))
    stream = batches(start)
    began = time.perf_counter()
    desc = names[0] if len(names) == 1 else f"{len(names)} checkpoints ({', '.join(names)})"
    with tqdm(total=total_steps * images_per_step, initial=start * images_per_step,
              unit="img", desc=desc if len(desc) < 60 else desc[:57] + "...",
              mininterval=1.0, dynamic_ncols=True) as bar:
      pending = []  # (step, losses, finite) on the device, read at the next readout
      skipped = [0] * len(names)
      for step in range(start + 1, total_steps + 1):
        batch = {**next(stream), "step": np.int32(step), "total_steps": np.int32(total_steps)}
        pending.append((step, *train_step(loss_fns, models, optimizers, batch,
                                          nonfinite == "skip", shared, shardings)))
        if after_step is not None:
          for model in models:
            after_step(model, step, total_steps)
        bar.update(images_per_step)
        evaluating = step % eval_every == 0 or step == total_steps
        # Read the losses (a device sync) every log_every steps and before every
        # checkpoint, so non-finite weights are never saved.
        if step % log_every == 0 or evaluating:
          readout = jax.device_get(pending)
          pending = []
          for bad_step, losses_, finite in readout:
            for i in np.flatnonzero(~np.asarray(finite)):
              loss = float(losses_[i])
              if nonfinite != "skip":
                raise FloatingPointError(_nonfinite_message(
                    names[i], bad_step, loss, active[i][1], section or names[0]))
              skipped[i] += 1
              bar.write(f"{names[i]}: step {bad_step} skipped: loss {loss} or its gradients "
                        f"not finite ({skipped[i]} skipped so far)")
          last = np.asarray(readout[-1][1], np.float64)
          bar.set_postfix(step=step, loss="/".join(f"{v:.4f}" for v in last))
          for writer, loss, count in zip(writers, last, skipped):
            writer.write_scalars(step, {"loss": float(loss), "skipped_steps": count})
        if evaluating:
          for model in models:
            _set_mode(model, False)
          scores = validate(models)
          for model in models:
            _set_mode(model, train_mode)
          for (trainee, ckpt), writer, val_miou in zip(active, writers, scores):
            writer.write_scalars(step, {"val_miou": val_miou})
            bar.write(f"{trainee.name}: step {step}/{total_steps}  val mIoU "
                      f"{_percent(val_miou)}")
            ckpt.save(step, _train_state(trainee.model, trainee.optimizer),
                      val_miou=val_miou, finished=step == total_steps, force=True)
    for writer in writers:
      writer.close()
    seconds = time.perf_counter() - began
    for (trainee, ckpt), count in zip(active, skipped):
      best[trainee.name] = ckpt.read_meta(ckpt.best_step())
      note = f"; {count} non-finite step(s) skipped" if count else ""
      together = f" (with {len(active) - 1} more)" if len(active) > 1 else ""
      print(f"{trainee.name}: done in {seconds:.0f} s{together}; best val mIoU "
            f"{_percent(best[trainee.name]['val_miou'])} at step "
            f"{best[trainee.name]['step']}{note}")
    return {t.name: best[t.name] for t in trainees}


def _nonfinite_message(stage: str, step: int, loss: float,
                       ckpt: checkpoint.StageCheckpoints, section: str) -> str:
  what = f"loss is {loss}" if not math.isfinite(loss) else \
      f"gradients are not finite (loss {loss:.4f})"
  kept = ckpt.latest_step()
  resume = (f"the last good checkpoint (step {kept}) is kept in {ckpt.directory}"
            if kept is not None else f"no checkpoint was written yet ({ckpt.directory})")
  return (f"{stage}: {what} at step {step}; stopped, {resume}. Rerun the same command with "
          "--config.train.nonfinite=skip to skip such steps, or use a fresh --workdir with a "
          f"lower config key train.{section}.optimizer.learning_rate")


def _skipped(stage: str, best: dict, directory: Path) -> dict:
  print(f"{stage}: already finished (best val mIoU {_percent(best['val_miou'])} at step "
        f"{best['step']}); skipped. Delete {directory} to train it again.")
  return best


def _train_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def _set_mode(model: nnx.Module, train: bool) -> None:
  model.train() if train else model.eval()


def _percent(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------ stages

def _schedule(section: ml_collections.ConfigDict, name: str, split_sizes: Sequence[int]):
  """(total steps, eval every) for a stage; an epoch = the largest split (the section's
  integers are checked by config_checks.validate)."""
  steps_per_epoch = max(split_sizes) // section.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"config key train.{name}.batch_size={section.batch_size} is larger "
                      f"than the training split ({max(split_sizes)} frames); lower it.")
  total = section.epochs * steps_per_epoch
  eval_every = max(1, section.eval_every_epochs * steps_per_epoch)
  return total, min(eval_every, total)


def stacked_validation(config, val_splits: Sequence[str]
                       ) -> Callable[[tuple[nnx.Module, ...]], list[float]]:
  """(stacked model,) -> [mean over members of member k's mIoU on val_splits[k]] (one pass
  per distinct split)."""
  def validate(models: tuple[nnx.Module, ...]) -> list[float]:
    (members,) = models
    scores = [math.nan] * len(val_splits)
    for split in dict.fromkeys(val_splits):
      cms = evaluate.confusions(methods.stacked, members,
                                input_pipeline.eval_batches(
                                    config.data, split, batch_size=config.eval.batch_size,
                                    process=sharding.process_rows()),
                                config.data.num_classes, config.eval.micro_batch)
      for k, own in enumerate(val_splits):
        if own == split:
          scores[k] = metrics.mean_iou(cms[str(k)])
    return [float(np.mean(scores))]
  return validate


def validation(config, outputs: Callable, keys: Sequence[str]
               ) -> Callable[[tuple[nnx.Module, ...]], list[float]]:
  """The models -> the mIoU of each of `keys` (of the output function's result, which
  takes the tuple of models) on the config's val split, all in one pass."""
  def validate(models: tuple[nnx.Module, ...]) -> list[float]:
    cms = evaluate.confusions(outputs, models,
                              input_pipeline.eval_batches(
                                  config.data, config.data.val_split,
                                  batch_size=config.eval.batch_size,
                                  process=sharding.process_rows()),
                              config.data.num_classes, config.eval.micro_batch)
    return [metrics.mean_iou(cms[key]) for key in keys]
  return validate


def _first_member(stream: Iterator[dict]) -> Iterator[dict]:
  return ({key: value[0] for key, value in batch.items()} for batch in stream)


def finished(workdir: str | Path, stage: str) -> dict | None:
  """The best checkpoint's meta if `stage` has finished in `workdir`, else None."""
  if not checkpoint.stage_dir(workdir, stage).is_dir():
    return None
  with checkpoint.StageCheckpoints(workdir, stage, save_every=1) as ckpt:
    return ckpt.read_meta(ckpt.best_step()) if ckpt.is_finished() else None


def _latest_step(workdir: str | Path, name: str) -> int:
  """The step of the latest checkpoint of `name` (0: none yet)."""
  if not checkpoint.stage_dir(workdir, name).is_dir():
    return 0
  with checkpoint.StageCheckpoints(workdir, name, save_every=1) as ckpt:
    return ckpt.latest_step() or 0


def run(config: ml_collections.ConfigDict, workdir: str | Path, name: str) -> dict[str, dict]:
  """Trains stage `name` of `stages.STAGES` from its config section `train.<name>`: all
  its checkpoints together, in one loop over one batch stream with one compiled step (the
  gate stage: one MoE per gate type, router and objective, around the same frozen
  experts, whose forward runs once per step for all of them).

  Finished checkpoints are reported and skipped before anything is built or read; the
  others resume together from their latest checkpoint (those a crash left at different
  steps, in one loop per step).

  Returns:
    {checkpoint name: best checkpoint meta}, in the stage's order; {} when the config
    turns the stage off.
  """
  stage = stages.STAGES[name]
  names = stage.checkpoints(config)
  if not names:
    print(f"{name}: skipped ({stage.off_reason})")
  best = {}
  for checkpoint_name in names:
    done = finished(workdir, checkpoint_name)
    if done is not None:
      best[checkpoint_name] = _skipped(checkpoint_name, done,
                                       checkpoint.stage_dir(workdir, checkpoint_name))
  starts = {}
  for checkpoint_name in names:
    if checkpoint_name not in best:
      starts.setdefault(_latest_step(workdir, checkpoint_name), []).append(checkpoint_name)
  for group in starts.values():
    best.update(_train(config, workdir, name, tuple(group), stage))
  return {checkpoint_name: best[checkpoint_name] for checkpoint_name in names}


def start_from(source: nnx.Module, target: nnx.Module) -> None:
  """Copies `source`'s parameters and BatchNorm statistics into `target`: the same module,
  or stacked members of it (every leaf with a leading member axis, each member a copy).
  Random-number state stays the target's own, so stacked members keep distinct dropout."""
  weights = nnx.Any(nnx.Param, nnx.BatchStat)
  state, shapes = nnx.state(source, weights), nnx.state(target, weights)
  nnx.update(target, jax.tree.map(lambda a, like: jnp.broadcast_to(a, like.shape), state,
                                  shapes))


def _train(config, workdir, name: str, names: tuple[str, ...], stage: stages.Stage
           ) -> dict[str, dict]:
  """Runs `fit` for checkpoints `names` of a stage from its config section `train.<name>`.

  A stacked model's member k takes batches of its own train split, all stacked to
  [K, B, ...]; otherwise the models take plain batches [B, ...] of the one split. With
  model.backbone_weights and a stage that takes them, each fresh model's backbone (every
  member's) starts from that torchvision ResNet checkpoint (a resumed run then restores
  its own checkpoint over it).
  """
  section, data = config.train[name], config.data
  train_splits = stage.train_splits(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch(section.batch_size, mesh, f"train.{name}.batch_size")
  sharding.check_eval_batch(config.eval.batch_size, config.eval.micro_batch, mesh)
  if stage.stacked:
    sharding.check_members(len(train_splits), mesh, f"the {name} stage")
  sizes = [input_pipeline.num_examples(data, split) for split in train_splits]
  total, eval_every = _schedule(section, name, sizes)
  seeds = [config.seed + build.SEED_OFFSETS[name] + k for k in range(len(train_splits))]

  def batches(first: int) -> Iterator[dict]:
    stream = input_pipeline.train_batches(data, train_splits, batch_size=section.batch_size,
                                          seeds=seeds, start_step=first,
                                          process=sharding.process_rows())
    spec = sharding.STACKED if stage.stacked else sharding.TRAIN
    return (sharding.put_batch(mesh, batch, spec)
            for batch in (stream if stage.stacked else _first_member(stream)))

  models = (stage.training_models(config, Path(workdir), names)
            if stage.training_models is not None
            else tuple(stage.model(config, checkpoint_name) for checkpoint_name in names))
  source = stage.init_from(config) if stage.init_from else ""
  if source:
    start, meta = checkpoint.restore_model(
        workdir, source, lambda: stages.STAGES[source].model(config, source))
    for model in models:
      start_from(start, model.members if stage.stacked else model)
    print(f"{name}: every member starts from the {source}'s best checkpoint (step "
          f"{meta['step']})")
  weights = config.model.backbone_weights if stage.pretrained_backbone and not source else ""
  trainees = []
  for checkpoint_name, model in zip(names, models):
    if weights:
      pretrained.load_backbone((model.members if stage.stacked else model).backbone, weights)
      print(f"{checkpoint_name}: backbone from {weights}")
    sharding.place_model(model, mesh)  # before the optimiser: its state follows the model
    hold = (stage.hold_learning_rate(config, checkpoint_name)
            if stage.hold_learning_rate else None)
    optimizer = nnx.Optimizer(
        model, make_optimizer(section.optimizer, total, key=f"train.{name}.optimizer",
                              hold_from=hold), wrt=stage.trains)
    trainees.append(Trainee(checkpoint_name, model, optimizer,
                            stage.loss(config, checkpoint_name)))
  with jax.set_mesh(mesh):  # the stacked experts map their own members per device
    return fit(trainees, batches=batches, total_steps=total, eval_every=eval_every,
               validate=stage.validation(config, names), workdir=workdir,
               keep=config.train.keep_checkpoints, log_every=config.train.log_every,
               images_per_step=section.batch_size * len(train_splits),
               train_mode=stage.train_mode, section=name, nonfinite=config.train.nonfinite,
               after_step=stage.after_step, shared=stage.shared, mesh=mesh)
