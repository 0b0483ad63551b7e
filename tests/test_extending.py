"""docs/architecture.md's worked examples: a new router, a new measure and a new dataset,
each added in one place (here, from outside the package) and picked up by everything that
reads the tables."""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import registry
from moe_jax import evaluate, input_pipeline, measures, methods, metrics, uncertainty


def least_confidence(moments: uncertainty.Moments) -> jax.Array:
  """1 − max_c p̄_c, a "members" measure in [0, 1 − 1/C]."""
  return 1.0 - jnp.max(uncertainty.mean_probs(moments), axis=-1)


@pytest.fixture
def with_least_confidence(monkeypatch):
  monkeypatch.setitem(measures.MEASURES, "least_confidence", measures.Measure(
      "LC", "least confidence", "members", least_confidence, lambda c, k: 1.0 - 1.0 / c))


def _outputs(model, images, key):
  """The uniform ensemble of two fixed members (images and key unused)."""
  del images, key
  return {"ensemble": methods.members_output(model.probs[...])}


def test_a_new_measure_reaches_the_maps_the_statistics_and_the_summary(with_least_confidence):
  from flax import nnx

  class Fixed(nnx.Module):
    def __init__(self, probs):
      self.probs = nnx.Variable(probs)

  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 2, 3, 4, 5)) * 3, jnp.float32))
  out = methods.members_output(probs)
  mean = np.asarray(probs).mean(0)
  np.testing.assert_allclose(out["least_confidence"], (1 - mean.max(-1)) / (1 - 1 / 5),
                             atol=1e-6)
  batch = {"image": np.zeros((2, 3, 4, 3), np.uint8),
           "label": rng.integers(0, 5, (2, 3, 4), np.uint8)}
  totals = evaluate.accumulate(_outputs, Fixed(probs), [batch], 5, uncertainty=True,
                               micro_batch=2)  # the fixed members' whole batch
  stats = totals["ensemble"]
  assert stats["histogram/least_confidence"].sum() == 2 * 3 * 4
  entry = evaluate.summary(stats, metrics.REFERENCE_THRESHOLDS)
  assert set(entry["uncertainty"]) == {"predictive_entropy", "mutual_information",
                                       "expert_variance", "least_confidence"}
  assert 0 <= entry["uncertainty"]["least_confidence"]["auroc_misclassification"] <= 1


def _toy_dataset(frames: int = 6, size=(32, 48)):
  """A dataset entry of the registry protocol: checkerboards with their own labels."""
  def arrays(split):
    rng = np.random.default_rng(len(split))
    labels = rng.integers(0, 2, (frames, *size)).astype(np.uint8)
    return np.repeat(labels[..., None] * 255, 3, -1).astype(np.uint8), labels

  def dataset(data, split, *, batch_size, train, seed, start=0):
    import tensorflow as tf
    images, labels = arrays(split)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    ds = ds.repeat().skip(start) if train else ds
    return ds.batch(batch_size, drop_remainder=train)

  return types.SimpleNamespace(
      prepare=lambda data: {s: frames for s in ("left_train", "right_train", "val", "test")},
      num_examples=lambda data, split: frames,
      dataset=dataset,
      class_names=lambda data: ("dark", "bright"),
      expert_names=lambda data: ["left", "right"],
      expert_split=lambda data, name, part: f"{name}_{part}" if part == "train" else "val",
      split_parts=lambda data, split: [split])


def test_a_new_dataset_is_read_through_the_input_pipeline(monkeypatch):
  monkeypatch.setitem(registry._DATASETS, "toy", _toy_dataset())
  data = ml_collections.ConfigDict(dict(name="toy", image_size=(32, 48), data_dir="/toy"))
  assert input_pipeline.prepare(data)["test"] == 6
  assert input_pipeline.class_names(data) == ("dark", "bright")
  assert input_pipeline.expert_names(data) == ["left", "right"]
  train = next(input_pipeline.train_batches(data, ["left_train", "right_train"], batch_size=4,
                                            seeds=[0, 1]))
  assert train["image"].shape == (2, 4, 32, 48, 3) and train["label"].shape == (2, 4, 32, 48)
  batches = list(input_pipeline.eval_batches(data, "test", batch_size=4))
  assert [b["image"].shape[0] for b in batches] == [4, 4]
  assert (batches[-1]["label"][2:] == 255).all()  # the padded frames are ignored


@pytest.fixture(scope="module")
def experts_workdir(tmp_path_factory):
  """A smoke workdir as the CLI leaves it after the experts and baseline stages, the models
  at their initial weights (their training is not what the router example is about)."""
  import runpy
  from pathlib import Path
  from flax import nnx
  from moe_jax import checkpoint
  from moe_jax.models import build
  config = runpy.run_path(str(Path(__file__).parents[1] / "configs" / "a2d2.py"))[
      "get_config"]("smoke")
  config.eval.corruptions = ()
  workdir = tmp_path_factory.mktemp("router") / "run"
  input_pipeline.resolve_paths(config.data, workdir)
  input_pipeline.prepare(config.data)
  for name, model in (("experts", build.experts(config, 2)), ("baseline", build.baseline(config))):
    with checkpoint.StageCheckpoints(workdir, name, save_every=1) as ckpt:
      ckpt.save(0, {"model": nnx.state(model)}, val_miou=0.0, finished=True)
  return config, workdir


@pytest.mark.slow
@pytest.mark.long
def test_a_router_registered_outside_the_package_trains_evaluates_and_predicts(
    experts_workdir):
  """A router written and registered in user code (here) goes through the gate stage,
  evaluate and predict with no change to the package."""
  from flax import nnx
  import moe_jax
  from moe_jax import train
  from moe_jax.models import routers

  @routers.register("mean_pool")
  class MeanPoolRouter(routers.Router):
    """Per-image weights from the features' spatial mean, with a load-balancing loss."""
    unit = "image"

    def __init__(self, args: routers.RouterArgs, *, rngs: nnx.Rngs):
      self.out = nnx.Linear(args.in_ch, args.num_experts, rngs=rngs)

    def logits(self, features, *, output_size):
      return self.out(features.mean(axis=(1, 2)))

    def __call__(self, features, *, output_size, key=None):
      routing = routers.deterministic(self.logits(features, output_size=output_size),
                                      self.unit)
      load = routing.weights.mean(axis=(0, 1))  # [K]
      return routing.replace(aux_losses={"balance": 0.1 * jnp.sum((load - 1 / load.size) ** 2)})

  from moe_jax import checkpoint
  config, workdir = experts_workdir
  config.model.gates = ("mean_pool",)
  checkpoint.save_config(workdir, config.to_json_best_effort())  # what restore reads
  try:
    trained = train.run(config, workdir, "gate")
    assert list(trained) == ["gate_mean_pool"]
    assert train.finished(workdir, "gate_mean_pool") is not None
    results = evaluate.run(config, workdir)
    assert results["routing_units"] == {"moe_mean_pool": "image"}
    entry = results["splits"]["ambiguous_test"]["moe_mean_pool"]
    assert set(entry["uncertainty"]) == set(measures.MEASURES)
    predictor = moe_jax.restore(workdir, stage="gate")
    assert predictor.method == "moe_mean_pool"
    out = predictor.predict(np.zeros((40, 50, 3), np.uint8))
    assert out["gate_weights"].shape == (1, 2) and out["gate_entropy"].shape == (1, 40, 50)
  finally:
    del routers.ROUTERS["mean_pool"]
