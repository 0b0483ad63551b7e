"""Loss, optimiser and the compiled train step."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax import losses, stages, train
from moe_jax.models import moe

SMALL = ml_collections.ConfigDict(dict(backbone="resnet10", width=0.25, aspp_channels=16,
                                       aspp_dropout=0.1, decoder_dropout=0.0))
OPT = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, momentum=0.9,
                                     weight_decay=0.0, schedule="constant"))


def test_cross_entropy_ignores_255_against_a_hand_computed_value():
  logits = jnp.array([[[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]]])  # [1, 1, 3, 2]
  labels = jnp.array([[[0, 1, 255]]], jnp.uint8)
  expected = (np.log(1 + np.exp(-2.0)) + np.log(2.0)) / 2
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)
  assert losses.cross_entropy(logits, jnp.full((1, 1, 3), 255, jnp.uint8)) == 0.0


def test_sgd_applies_weight_decay_like_torch():
  config = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.0,
                                          weight_decay=0.5, schedule="constant"))
  tx = train.make_optimizer(config, 10)
  params = jnp.array([2.0])
  updates, _ = tx.update(jnp.array([1.0]), tx.init(params), params)
  np.testing.assert_allclose(params + updates, 2.0 - 0.1 * (1.0 + 0.5 * 2.0))


@pytest.mark.parametrize("key, value", [("name", "lion"), ("schedule", "cyclic")])
def test_unknown_optimizer_settings_name_the_key(key, value):
  config = OPT.copy_and_resolve_references()
  config[key] = value
  with pytest.raises(ValueError, match=f"train.optimizer.{key}={value!r}"):
    train.make_optimizer(config, 10)


# One optax transformation for every run below: each make_optimizer call makes new
# closures, and a new one in the optimiser's static graph would recompile the step.
_EXPERT_TX = train.make_optimizer(OPT, 4)


def run_expert_steps(seed, steps=4):
  experts = moe.StackedExperts(moe.make_expert(SMALL, 3), 2, execution="unroll",
                               rngs=nnx.Rngs(seed))
  experts.train()
  optimizer = nnx.Optimizer(experts, _EXPERT_TX, wrt=nnx.Param)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (2, 2, 16, 16)).astype(np.uint8)
  # Learnable: the image encodes the label in its red channel.
  images = np.zeros((2, 2, 16, 16, 3), np.uint8)
  images[..., 0] = labels * 100
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  return [float(train.train_step((losses.expert_loss,), (experts,), (optimizer,), batch)[0][0])
          for _ in range(steps)]


def test_expert_steps_reduce_the_loss_and_are_deterministic():
  first = run_expert_steps(seed=0)
  assert first[-1] < first[0]
  assert run_expert_steps(seed=0) == first


def as_numpy(tree):
  """Every leaf as a numpy array (typed PRNG keys as their key data)."""
  def leaf(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.array(a)
  return jax.tree.map(leaf, tree)


def tiny_moe(seed=0):
  experts = moe.StackedExperts(moe.make_expert(SMALL, 3), 2, execution="unroll",
                               rngs=nnx.Rngs(seed))
  return moe.MixtureOfExperts(experts, num_classes=3, image_size=(32, 32), gate="simple",
                              fusion_conv=True, gate_hidden=8, rngs=nnx.Rngs(seed + 1))


def test_gate_stage_leaves_the_frozen_experts_untouched():
  model = tiny_moe()
  model.eval()  # as the gate stage does: BatchNorm statistics frozen, dropout off
  experts_before = as_numpy(nnx.state(model.experts))
  gate_before = as_numpy(nnx.state(model.gate, nnx.Param))
  optimizer = nnx.Optimizer(model, train.make_optimizer(OPT, 3), wrt=stages.GATE_PARAMS)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 255, (2, 32, 32, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 3, (2, 32, 32)), jnp.uint8)}
  for _ in range(3):
    train.train_step((losses.mixture_loss,), (model,), (optimizer,), batch)
  experts_after = as_numpy(nnx.state(model.experts))
  jax.tree.map(np.testing.assert_array_equal, experts_before, experts_after)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), gate_before,
                       as_numpy(nnx.state(model.gate, nnx.Param)))
  assert all(jax.tree.leaves(moved)), "every gate parameter should have trained"
  trained = {path[0] for path, _ in nnx.to_flat_state(
      nnx.state(model, stages.GATE_PARAMS))}
  assert trained == {"gate", "fusion_conv"}


def _gate_batch():
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.integers(0, 255, (2, 32, 32, 3)), jnp.uint8),
          "label": jnp.asarray(rng.integers(0, 3, (2, 32, 32)), jnp.uint8)}


def _moes(gates):
  """One MoE per gate type around one shared experts module, in eval mode."""
  experts = moe.StackedExperts(moe.make_expert(SMALL, 3), 2, execution="unroll",
                               rngs=nnx.Rngs(0))
  moes = tuple(moe.MixtureOfExperts(experts, num_classes=3, image_size=(32, 32), gate=gate,
                                    fusion_conv=True, gate_hidden=8, rngs=nnx.Rngs(1))
               for gate in gates)
  for model in moes:
    model.eval()
  return moes


_GATE_TX = train.make_optimizer(OPT, 3)


def test_gates_stepped_together_around_shared_experts_equal_each_gate_stepped_alone():
  gates, batch = ("simple", "classwise"), _gate_batch()
  alone = []
  for gate in gates:
    (model,) = _moes((gate,))
    optimizer = nnx.Optimizer(model, _GATE_TX, wrt=stages.GATE_PARAMS)
    for _ in range(3):
      train.train_step((losses.mixture_loss,), (model,), (optimizer,), batch)
    alone.append(as_numpy(nnx.state(model, stages.GATE_PARAMS)))
  models = _moes(gates)
  experts_before = as_numpy(nnx.state(models[0].experts))
  optimizers = tuple(nnx.Optimizer(m, _GATE_TX, wrt=stages.GATE_PARAMS) for m in models)
  for _ in range(3):
    each, finite = train.train_step((losses.mixture_loss,) * 2, models, optimizers, batch,
                                    False, losses.with_expert_outputs)
  assert each.shape == (2,) and bool(np.all(finite))
  assert models[0].experts is models[1].experts
  for model, expected in zip(models, alone):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 as_numpy(nnx.state(model, stages.GATE_PARAMS)), expected)
  jax.tree.map(np.testing.assert_array_equal, experts_before,
               as_numpy(nnx.state(models[0].experts)))


def test_a_joint_gate_step_runs_the_shared_experts_once(monkeypatch):
  calls = []
  call = moe.StackedExperts.__call__
  monkeypatch.setattr(moe.StackedExperts, "__call__",
                      lambda self, *a, **k: calls.append(1) or call(self, *a, **k))
  models = _moes(("simple", "classwise", "simple"))
  optimizers = tuple(nnx.Optimizer(m, _GATE_TX, wrt=stages.GATE_PARAMS) for m in models)
  # Fresh loss objects: this step is traced here, whatever compiled before.
  fresh = tuple(functools.partial(losses.mixture_loss) for _ in models)
  train.train_step(fresh, models, optimizers, _gate_batch(), False, losses.with_expert_outputs)
  assert len(calls) == 1
  calls.clear()
  fresh = tuple(functools.partial(losses.mixture_loss) for _ in models)
  train.train_step(fresh, models, optimizers, _gate_batch())  # nothing shared: once per MoE
  assert len(calls) == 3


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 3, rngs=rngs)
    self.norm = nnx.BatchNorm(3, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.norm(self.linear(x)))


_NET_TX = train.make_optimizer(OPT, 6)


def _net_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


class _Interrupted(Exception):
  pass


def _fit_net(workdir, total_steps=6, interrupt_at=None, loss_fn=_net_loss, committed=False):
  """fit() on a tiny net; batch t is a function of t only, like the resumable streams.
  committed: its linear layer's arrays committed to the device (as restored arrays are),
  the rest not (as fresh ones)."""
  model = _Net(nnx.Rngs(0))
  if committed:
    nnx.update(model.linear, jax.device_put(nnx.state(model.linear), jax.devices()[0]))
  optimizer = nnx.Optimizer(model, train.make_optimizer(OPT, total_steps), wrt=nnx.Param)

  def batches(first):
    for step in range(first + 1, total_steps + 1):
      if step == interrupt_at:
        raise _Interrupted
      rng = np.random.default_rng(step)
      yield {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}

  validations = []

  def validate(m):
    validations.append(m.norm.use_running_average)
    return float(jnp.tanh(jnp.abs(m.linear.kernel.value).sum()) / 2)

  best = train.fit([train.Trainee("net", model, optimizer, loss_fn)], batches=batches,
                   total_steps=total_steps, eval_every=2,
                   validate=lambda models: [validate(m) for m in models], workdir=workdir,
                   keep=2, log_every=1, images_per_step=8)
  return model, best["net"], validations


def test_fit_resumes_an_interrupted_stage_from_its_saved_step(tmp_path, capsys):
  reference, _, validations = _fit_net(tmp_path / "straight")
  assert validations == [True, True, True]  # validation runs in eval mode, every 2 steps
  with pytest.raises(_Interrupted):
    _fit_net(tmp_path / "resumed", interrupt_at=5)  # checkpoints at 2 and 4 exist
  capsys.readouterr()
  resumed, best, _ = _fit_net(tmp_path / "resumed")
  assert "resuming from the checkpoint at step 4 of 6" in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, as_numpy(nnx.state(reference)),
               as_numpy(nnx.state(resumed)))
  assert best["step"] in (2, 4, 6) and 0 <= best["val_miou"] <= 0.5
  # A finished stage is skipped on the next run and leaves the model as initialised.
  again, _, validations = _fit_net(tmp_path / "resumed")
  assert "already finished" in capsys.readouterr().out and validations == []


def _counted_loss(model, batch):
  """`_net_loss` as a function of its own, so that train_step's compilations with it can be
  counted apart from the other tests'."""
  return _net_loss(model, batch)


def test_a_stage_compiles_its_train_step_once_never_per_batch(tmp_path):
  compiled = train.train_step.jitted_fn._cache_size
  before = compiled()
  # 6 steps with a loss readout after each, 3 validations and 3 checkpoints between them,
  # on a model partly committed to the device (the gate stage's restored experts around a
  # fresh router).
  _fit_net(tmp_path / "run", loss_fn=_counted_loss, committed=True)
  assert compiled() - before == 1
  # (A resumed stage is a new process: it compiles once there. In one process, each fresh
  # optax transformation is a new static argument and compiles again.)


def _guarded_loss(model, batch):
  """`_net_loss` plus a term of value 0 whose gradient is nan where batch["s"] is 0 (the
  derivative of sqrt at 0 times 0) and exactly 0 where it is 1."""
  return _net_loss(model, batch) + 0.0 * jnp.sum(
      jnp.sqrt(batch["s"] * model.linear.kernel.value ** 2))


def _batch(step, s=1.0, x_scale=1.0):
  rng = np.random.default_rng(step)
  return {"x": jnp.asarray(rng.normal(size=(8, 4)) * x_scale, jnp.float32),
          "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
          "s": jnp.full((4, 3), s, jnp.float32)}


def _fit_batches(workdir, stream, *, nonfinite="stop", log_every=1):
  model = _Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, train.make_optimizer(OPT, len(stream)), wrt=nnx.Param)
  train.fit([train.Trainee("net", model, optimizer, _guarded_loss)],
            batches=lambda first: iter(stream[first:]), total_steps=len(stream),
            eval_every=2, validate=lambda models: [0.1], workdir=workdir, keep=5,
            log_every=log_every, images_per_step=8, nonfinite=nonfinite)
  return model


@pytest.mark.parametrize("bad, message", [
    (_batch(3, x_scale=np.inf), "net: loss is nan at step 3; stopped, the last good "
     "checkpoint (step 2) is kept in "),
    (_batch(3, s=0.0), "net: gradients are not finite (loss "),
])
def test_fit_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(
    tmp_path, bad, message):
  stream = [_batch(1), _batch(2), bad, _batch(4), _batch(5), _batch(6)]
  # The losses are read every 4 steps: the step is still named exactly, and nothing after
  # it is saved (the readout comes before step 4's checkpoint).
  with pytest.raises(FloatingPointError) as error:
    _fit_batches(tmp_path, stream, log_every=4)
  assert str(error.value).startswith(message), error.value
  assert "at step 3" in str(error.value) and "--config.train.nonfinite=skip" in str(error.value)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints" / "net").iterdir())
  assert steps == [2]


def test_fit_skips_non_finite_steps_as_if_those_batches_were_not_there(tmp_path, capsys):
  clean = [_batch(t) for t in (1, 2, 4, 5)]
  bad_loss, bad_grads = _batch(3, x_scale=np.inf), _batch(6, s=0.0)
  expected = _fit_batches(tmp_path / "clean", clean)
  skipped = _fit_batches(tmp_path / "skip", [clean[0], clean[1], bad_loss, clean[2],
                                             bad_grads, clean[3]], nonfinite="skip")
  out = capsys.readouterr().out
  assert "net: step 3 skipped: loss nan or its gradients not finite (1 skipped so far)" in out
  assert "net: step 5 skipped" in out and "2 non-finite step(s) skipped" in out
  # Parameters, BatchNorm statistics, the dropout RNG and the optimiser all ignored them.
  jax.tree.map(np.testing.assert_array_equal, as_numpy(nnx.state(expected)),
               as_numpy(nnx.state(skipped)))


def test_a_non_finite_step_of_one_trainee_leaves_it_alone_and_steps_the_others():
  nets = tuple(_Net(nnx.Rngs(0)) for _ in range(2))
  optimizers = tuple(nnx.Optimizer(n, _NET_TX, wrt=nnx.Param) for n in nets)
  reference = _Net(nnx.Rngs(0))
  reference_optimizer = nnx.Optimizer(reference, _NET_TX, wrt=nnx.Param)
  untouched = as_numpy(nnx.state(nets[1]))
  bad = _batch(1, s=0.0)  # _guarded_loss's gradients are nan on it, _net_loss's are not
  each, finite = train.train_step((_net_loss, _guarded_loss), nets, optimizers, bad, True)
  train.train_step((_net_loss,), (reference,), (reference_optimizer,), bad, True)
  assert finite.tolist() == [True, False] and np.isfinite(each).all()
  jax.tree.map(np.testing.assert_array_equal, as_numpy(nnx.state(nets[0])),
               as_numpy(nnx.state(reference)))
  jax.tree.map(np.testing.assert_array_equal, as_numpy(nnx.state(nets[1])), untouched)


def test_fit_refuses_trainees_that_resume_from_different_steps(tmp_path):
  with pytest.raises(_Interrupted):
    _fit_net(tmp_path, interrupt_at=3)  # "net" has its checkpoint at step 2
  trainees = [train.Trainee(name, net, nnx.Optimizer(net, _NET_TX, wrt=nnx.Param), _net_loss)
              for name, net in (("net", _Net(nnx.Rngs(0))), ("other", _Net(nnx.Rngs(1))))]
  with pytest.raises(ValueError, match=r"net, other resume from different steps \[0, 2\]"):
    train.fit(trainees, batches=lambda first: iter([]), total_steps=6, eval_every=2,
              validate=lambda models: [0.1] * len(models), workdir=tmp_path, keep=2,
              log_every=1, images_per_step=8)


def test_deep_ensemble_stage_is_skipped_when_no_members_are_asked_for(capsys):
  config = ml_collections.ConfigDict(dict(model=dict(deep_ensemble_members=0)))
  assert train.run(config, "/nonexistent", "deep_ensemble") == {}
  assert "deep_ensemble: skipped (config key model.deep_ensemble_members=0)" in \
      capsys.readouterr().out


def test_swag_collection_holds_the_learning_rate_from_its_start():
  config = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1e-2, momentum=0.0,
                                          weight_decay=0.0, schedule="cosine"))
  held = train.learning_rate(config, 100, hold_from=0.5)
  cosine = train.learning_rate(config, 100)
  for step in (0, 10, 49, 50):
    np.testing.assert_allclose(held(step), cosine(step), rtol=1e-6)
  assert float(cosine(99)) < float(cosine(50))  # the cosine keeps decaying
  for step in (51, 75, 99, 100):  # the collection phase: constant at its value at step 50
    np.testing.assert_allclose(held(step), cosine(50), rtol=1e-6)
  constant = ml_collections.ConfigDict({**config.to_dict(), "schedule": "constant"})
  assert train.learning_rate(constant, 100, hold_from=0.5) == 1e-2


def test_start_from_copies_weights_into_every_member_and_keeps_their_own_dropout_keys():
  """train.experts.init_from="baseline": each stacked expert starts as a copy of the single
  model (parameters and BatchNorm statistics); the members' RNG state stays theirs."""
  source = moe.make_expert(SMALL, 3)(nnx.Rngs(7))
  # Statistics unlike a fresh model's, so that copying them is seen.
  nnx.update(source, jax.tree.map(lambda a: a + 0.25, nnx.state(source, nnx.BatchStat)))
  experts = moe.StackedExperts(moe.make_expert(SMALL, 3), 3, execution="unroll",
                               rngs=nnx.Rngs(0))
  keys_before = jax.tree.map(lambda k: jax.random.key_data(k),
                             nnx.state(experts, nnx.RngKey))
  train.start_from(source, experts.members)
  weights = nnx.Any(nnx.Param, nnx.BatchStat)
  for ours, theirs in zip(jax.tree.leaves(nnx.state(experts.members, weights)),
                          jax.tree.leaves(nnx.state(source, weights)), strict=True):
    assert ours.shape == (3, *theirs.shape)
    for k in range(3):
      np.testing.assert_array_equal(ours[k], theirs)
  keys_after = jax.tree.map(lambda k: jax.random.key_data(k), nnx.state(experts, nnx.RngKey))
  for before, after in zip(jax.tree.leaves(keys_before), jax.tree.leaves(keys_after)):
    np.testing.assert_array_equal(before, after)
  assert len({tuple(np.ravel(k)) for leaf in jax.tree.leaves(keys_after) for k in leaf}) > 1
  # The copies then compute what the source computes.
  source.eval()
  experts.eval()
  x = jax.random.uniform(jax.random.key(0), (1, 32, 32, 3))
  for k in range(3):
    np.testing.assert_allclose(experts(x)[0][k], source(x)[0], rtol=1e-5, atol=1e-5)
