"""Training: optimisers, the one compiled train step, the loop, and running a stage.

Every stage of `moe_jax.stages.STAGES` (experts, baseline, deep_ensemble, gate) is the same
loop (`fit`) around the same compiled step (`train_step`) with the model, loss, batches
and optimiser filter its entry names (`run`). Stacked models (the K experts, a deep
ensemble) take member k's batch from its own stream, stacked to [K, B, ...], so all K
cost one compiled step; the gate stage trains the router of an MoE whose experts are
frozen (eval-mode BatchNorm, no dropout, no gradients).

Each stage validates (mIoU) and checkpoints every `eval_every_epochs`, keeps the best,
skips itself when already finished and resumes from its last checkpoint otherwise.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from clu import metric_writers
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from moe_jax import checkpoint, evaluate, input_pipeline, methods, metrics, stages
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


@nnx.jit(static_argnums=(0, 4), donate_argnums=(1, 2))
def train_step(loss_fn: Callable, model: nnx.Module, optimizer: nnx.Optimizer,
               batch: dict[str, jax.Array], skip_nonfinite: bool = False
               ) -> tuple[jax.Array, jax.Array]:
  """One optimiser step on `loss_fn(model, batch)`.

  The optimiser's `wrt` filter decides what trains (e.g. only the gate).

  Returns:
    (loss, finite): the loss (float32 scalar) and whether it and every gradient are finite
    (bool scalar). With `skip_nonfinite`, a step that is not finite changes nothing: the
    model (BatchNorm statistics and dropout RNG included) and the optimiser keep their
    state from before it.
  """
  if skip_nonfinite:
    # A snapshot of the arrays (nnx.state refers to the live Variables).
    before = jax.tree.map(lambda x: x, nnx.state((model, optimizer)))
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(
      model, batch)
  finite = jnp.isfinite(loss) & jnp.all(
      jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  optimizer.update(model, grads)
  if skip_nonfinite:
    after = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.lax.cond(finite, lambda: after, lambda: before))
  return loss, finite


def fit(stage: str, *, model: nnx.Module, optimizer: nnx.Optimizer, loss_fn: Callable,
        batches: Callable[[int], Iterator[dict]], total_steps: int, eval_every: int,
        validate: Callable[[nnx.Module], float], workdir: str | Path, keep: int,
        log_every: int, images_per_step: int, train_mode: bool = True,
        section: str | None = None, nonfinite: str = "stop",
        after_step: Callable[[nnx.Module, int, int], None] | None = None) -> dict:
  """Trains `model` for `total_steps`, validating and checkpointing every `eval_every`.

  A finished stage is skipped; an interrupted one resumes from its latest checkpoint
  (model, optimiser and data position), so the result equals an uninterrupted run's.

  Args:
    stage: checkpoint/TensorBoard name ("experts", "baseline", "gate", ...).
    model, optimizer: what trains; `optimizer.wrt` decides which parameters move.
    loss_fn: `loss_fn(model, batch) -> scalar` (static for jit: a module-level function);
      each batch also holds "step" (this step, 1-based) and "total_steps" (int32).
    batches: `batches(first_step)` -> iterator of batches for steps first_step+1, ...
    total_steps, eval_every: in optimiser steps.
    validate: model (in eval mode) -> validation mIoU.
    workdir: the run's directory (checkpoints/<stage>, tensorboard/<stage>).
    keep: checkpoints kept besides the best.
    log_every: steps between loss readouts (each readout waits for the device).
    images_per_step: for the images/s readout.
    train_mode: False keeps the whole model in eval mode (the gate stage: the frozen
      experts' BatchNorm must not drift and their dropout stays off).
    section: the stage's config section `train.<section>` (default: `stage`), named in
      error messages.
    nonfinite: what a step whose loss or gradients are not finite does: "stop" raises
      FloatingPointError naming the step (no checkpoint is written after it); "skip" leaves
      the model and optimiser as they were before it and goes on (each skip is printed).
    after_step: (model, step, total_steps) -> None after each step (e.g. SWAG's collection).

  Returns:
    The meta dict of the best checkpoint ({"step", "val_miou", "finished"}).
  """
  with checkpoint.StageCheckpoints(workdir, stage, save_every=eval_every, keep=keep) as ckpt:
    if ckpt.is_finished():
      return _skipped(stage, ckpt.read_meta(ckpt.best_step()), ckpt.directory)
    start = 0
    if ckpt.latest_step() is not None:
      restored, meta = ckpt.restore(None, _train_state(model, optimizer))
      nnx.update(model, restored["model"])
      nnx.update(optimizer, restored["optimizer"])
      start = meta["step"]
      print(f"{stage}: resuming from the checkpoint at step {start} of {total_steps}")
    writer = metric_writers.create_default_writer(
        str(Path(workdir) / "tensorboard" / stage), just_logging=jax.process_index() > 0)
    _set_mode(model, train_mode)
    stream = batches(start)
    began = time.perf_counter()
    with tqdm(total=total_steps * images_per_step, initial=start * images_per_step,
              unit="img", desc=stage, mininterval=1.0, dynamic_ncols=True) as bar:
      pending = []  # (step, loss, finite) on the device, read at the next readout
      skipped = 0
      for step in range(start + 1, total_steps + 1):
        batch = {**next(stream), "step": np.int32(step), "total_steps": np.int32(total_steps)}
        pending.append((step, *train_step(loss_fn, model, optimizer, batch,
                                          nonfinite == "skip")))
        if after_step is not None:
          after_step(model, step, total_steps)
        bar.update(images_per_step)
        evaluating = step % eval_every == 0 or step == total_steps
        # Read the losses (a device sync) every log_every steps and before every
        # checkpoint, so non-finite weights are never saved.
        if step % log_every == 0 or evaluating:
          readout = [(s, float(loss), bool(finite))
                     for s, loss, finite in jax.device_get(pending)]
          pending = []
          for bad_step, loss, _ in (r for r in readout if not r[2]):
            if nonfinite != "skip":
              raise FloatingPointError(_nonfinite_message(stage, bad_step, loss, ckpt,
                                                          section or stage))
            skipped += 1
            bar.write(f"{stage}: step {bad_step} skipped: loss {loss} or its gradients "
                      f"not finite ({skipped} skipped so far)")
          loss = readout[-1][1]
          bar.set_postfix(step=step, loss=f"{loss:.4f}")
          writer.write_scalars(step, {"loss": loss, "skipped_steps": skipped})
        if evaluating:
          _set_mode(model, False)
          val_miou = validate(model)
          _set_mode(model, train_mode)
          writer.write_scalars(step, {"val_miou": val_miou})
          bar.write(f"{stage}: step {step}/{total_steps}  val mIoU {_percent(val_miou)}")
          ckpt.save(step, _train_state(model, optimizer), val_miou=val_miou,
                    finished=step == total_steps, force=True)
    writer.close()
    best = ckpt.read_meta(ckpt.best_step())
    note = f"; {skipped} non-finite step(s) skipped" if skipped else ""
    print(f"{stage}: done in {time.perf_counter() - began:.0f} s; best val mIoU "
          f"{_percent(best['val_miou'])} at step {best['step']}{note}")
    return best


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


def stacked_validation(config, val_splits: Sequence[str]) -> Callable[[nnx.Module], float]:
  """Mean over members of member k's mIoU on val_splits[k] (one pass per distinct split)."""
  def validate(members: nnx.Module) -> float:
    scores = [math.nan] * len(val_splits)
    for split in dict.fromkeys(val_splits):
      cms = evaluate.confusions(methods.stacked, members,
                                input_pipeline.eval_batches(config.data, split,
                                                            batch_size=config.eval.batch_size),
                                config.data.num_classes)
      for k, own in enumerate(val_splits):
        if own == split:
          scores[k] = metrics.mean_iou(cms[str(k)])
    return float(np.mean(scores))
  return validate


def validation(config, outputs: Callable, method: str) -> Callable[[nnx.Module], float]:
  """mIoU of `method` (a key of the output function's result) on the config's val split."""
  def validate(model: nnx.Module) -> float:
    cms = evaluate.confusions(outputs, model,
                              input_pipeline.eval_batches(config.data, config.data.val_split,
                                                          batch_size=config.eval.batch_size),
                              config.data.num_classes)
    return metrics.mean_iou(cms[method])
  return validate


def _first_member(stream: Iterator[dict]) -> Iterator[dict]:
  return ({key: value[0] for key, value in batch.items()} for batch in stream)


def finished(workdir: str | Path, stage: str) -> dict | None:
  """The best checkpoint's meta if `stage` has finished in `workdir`, else None."""
  if not checkpoint.stage_dir(workdir, stage).is_dir():
    return None
  with checkpoint.StageCheckpoints(workdir, stage, save_every=1) as ckpt:
    return ckpt.read_meta(ckpt.best_step()) if ckpt.is_finished() else None


def run(config: ml_collections.ConfigDict, workdir: str | Path, name: str) -> dict[str, dict]:
  """Trains stage `name` of `stages.STAGES`: each of its checkpoints in turn, from its
  config section `train.<name>` (the gate stage: one MoE per router in model.gates, each
  around the same frozen experts).

  Returns:
    {checkpoint name: best checkpoint meta}; {} when the config turns the stage off.
  """
  stage = stages.STAGES[name]
  names = stage.checkpoints(config)
  if not names:
    print(f"{name}: skipped ({stage.off_reason})")
  return {checkpoint_name: _train(config, workdir, name, checkpoint_name, stage)
          for checkpoint_name in names}


def _train(config, workdir, name: str, checkpoint_name: str, stage: stages.Stage) -> dict:
  """Runs `fit` for one checkpoint of a stage from its config section `train.<name>`.

  A finished one is reported and skipped before anything is built or read. A stacked
  model's member k takes batches of its own train split, all stacked to [K, B, ...];
  otherwise the model takes plain batches [B, ...] of the one split. With
  model.backbone_weights and a stage that takes them, the fresh model's backbone (every
  member's) starts from that torchvision ResNet checkpoint (a resumed run then restores
  its own checkpoint over it).
  """
  done = finished(workdir, checkpoint_name)
  if done is not None:
    return _skipped(checkpoint_name, done, checkpoint.stage_dir(workdir, checkpoint_name))
  section, data = config.train[name], config.data
  train_splits = stage.train_splits(config)
  sizes = [input_pipeline.num_examples(data, split) for split in train_splits]
  total, eval_every = _schedule(section, name, sizes)
  seeds = [config.seed + build.SEED_OFFSETS[name] + k for k in range(len(train_splits))]

  def batches(first: int) -> Iterator[dict]:
    stream = input_pipeline.train_batches(data, train_splits, batch_size=section.batch_size,
                                          seeds=seeds, start_step=first)
    return stream if stage.stacked else _first_member(stream)

  if stage.training_model is not None:
    model = stage.training_model(config, Path(workdir), checkpoint_name)
  else:
    model = stage.model(config, checkpoint_name)
  weights = config.model.backbone_weights if stage.pretrained_backbone else ""
  if weights:
    pretrained.load_backbone((model.members if stage.stacked else model).backbone, weights)
    print(f"{checkpoint_name}: backbone from {weights}")
  optimizer = nnx.Optimizer(
      model, make_optimizer(section.optimizer, total, key=f"train.{name}.optimizer",
                            hold_from=stage.hold_learning_rate(config, checkpoint_name)
                            if stage.hold_learning_rate else None),
      wrt=stage.trains)
  return fit(checkpoint_name, model=model, optimizer=optimizer,
             loss_fn=stage.loss(config, checkpoint_name),
             batches=batches, total_steps=total, eval_every=eval_every,
             validate=stage.validation(config, checkpoint_name), workdir=workdir,
             keep=config.train.keep_checkpoints, log_every=config.train.log_every,
             images_per_step=section.batch_size * len(train_splits),
             train_mode=stage.train_mode, section=name, nonfinite=config.train.nonfinite,
             after_step=stage.after_step)
