"""Loss, optimiser and the compiled train step."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from moe_jax import train
from moe_jax.models import moe

SMALL = ml_collections.ConfigDict(dict(backbone="resnet18", width=0.25, aspp_channels=16,
                                       aspp_dropout=0.1, decoder_dropout=0.0))
OPT = ml_collections.ConfigDict(dict(name="adamw", learning_rate=3e-3, momentum=0.9,
                                     weight_decay=0.0, schedule="constant"))


def test_cross_entropy_ignores_255_against_a_hand_computed_value():
  logits = jnp.array([[[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]]])  # [1, 1, 3, 2]
  labels = jnp.array([[[0, 1, 255]]], jnp.uint8)
  expected = (np.log(1 + np.exp(-2.0)) + np.log(2.0)) / 2
  np.testing.assert_allclose(train.cross_entropy(logits, labels), expected, rtol=1e-6)
  assert train.cross_entropy(logits, jnp.full((1, 1, 3), 255, jnp.uint8)) == 0.0


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


def run_expert_steps(seed, steps=4):
  experts = moe.StackedExperts(moe.make_expert(SMALL, 3), 2, execution="unroll",
                               rngs=nnx.Rngs(seed))
  experts.train()
  optimizer = nnx.Optimizer(experts, train.make_optimizer(OPT, steps), wrt=nnx.Param)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (2, 2, 16, 16)).astype(np.uint8)
  # Learnable: the image encodes the label in its red channel.
  images = np.zeros((2, 2, 16, 16, 3), np.uint8)
  images[..., 0] = labels * 100
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  return [float(train.train_step(train.expert_loss, experts, optimizer, batch))
          for _ in range(steps)]


def test_expert_steps_reduce_the_loss_and_are_deterministic():
  first = run_expert_steps(seed=0)
  assert first[-1] < first[0]
  assert run_expert_steps(seed=0) == first
