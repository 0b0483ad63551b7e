"""Evaluation pieces that the end-to-end CLI test does not pin down by value."""

import importlib.util
from pathlib import Path

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import evaluate, methods, metrics
from moe_jax.models import routers

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def smoke_config():
  spec = importlib.util.spec_from_file_location("a2d2", CONFIGS / "a2d2.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def test_gate_statistics_of_a_simple_gate_count_labelled_images():
  gates = jnp.array([[0.0, 1.0], [0.52, 0.48], [0.3, 0.7]])  # [B=3, K=2]
  valid = np.ones((3, 2, 2), bool)
  valid[2] = False  # an all-padding image is not counted
  stats = evaluate._gate_statistics(routers.Routing(gates[None], gates[None], unit="image"),
                                    jnp.asarray(valid))
  expected = np.zeros((2, 20), int)
  expected[0, [0, 10]] = 1  # 0.0 -> bin 0, 0.52 -> bin 10
  expected[1, [19, 9]] = 1  # 1.0 -> the last (closed) bin, 0.48 -> bin 9
  np.testing.assert_array_equal(stats["gate_histogram"], expected)
  np.testing.assert_allclose(stats["gate_sum"], [0.52, 1.48], rtol=1e-6)


def test_gate_statistics_of_a_pixel_routing_count_labelled_pixels():
  gates = jnp.array([[[[0.1, 0.9], [0.96, 0.04]]]])  # [B=1, H=1, W=2, K=2]
  valid = jnp.array([[[True, False]]])
  stats = evaluate._gate_statistics(routers.Routing(gates[None], gates[None], unit="pixel"),
                                    valid)
  assert stats["gate_histogram"].sum() == 2  # one pixel, one count per expert
  assert stats["gate_histogram"][0, 2] == 1 and stats["gate_histogram"][1, 18] == 1
  np.testing.assert_allclose(stats["gate_sum"], [0.1, 0.9], rtol=1e-6)


def test_corrupted_splits_are_named_by_corruption_and_severity():
  config = smoke_config()
  assert list(evaluate.corrupted_splits(config)) == [
      "all_test:clean:0", "all_test:gaussian_noise:1", "all_test:gaussian_noise:5",
      "all_test:fog:1", "all_test:fog:5"]
  assert evaluate.corrupted_splits(config)["all_test:fog:5"] == ("fog", 5)
  config.eval.corruption_frames_per_part = 0  # every frame: no separate clean subset
  assert "all_test:clean:0" not in evaluate.corrupted_splits(config)
  config.eval.corruptions = ()
  assert evaluate.corrupted_splits(config) == {}


@pytest.mark.parametrize("key, value, message", [
    ("corruptions", ("rain",), r"eval.corruptions names unknown corruptions \['rain'\]"),
    ("severities", (0, 6), r"eval.severities=\(0, 6\) must be values in 1..5"),
    ("corruption_split", "all_val", "eval.corruption_split='all_val' must be one of"),
])
def test_bad_corruption_config(key, value, message):
  config = smoke_config()
  config.eval[key] = value
  with pytest.raises(ValueError, match=message):
    evaluate.corrupted_splits(config)


def test_mean_or_none():
  assert evaluate.mean_or_none([0.25, 0.75]) == 0.5
  assert evaluate.mean_or_none([0.25, None]) is None


class _FixedMoE(nnx.Module):
  """A stand-in MoE whose forward is fixed logits (K=2 experts, C=3 classes)."""

  def __init__(self, expert_logits, gates):
    self.expert_logits = nnx.Variable(expert_logits)
    self.gates = nnx.Variable(gates)


def _fixed_moe_outputs(model, images, key):
  del images, key
  z, g = model.expert_logits.value, model.gates.value
  return methods.mixture_outputs({"logits": jnp.einsum("kbhwc,bk->bhwc", z, g),
                                  "expert_logits": z,
                                  "routing": routers.Routing(g[None], g[None], unit="image")})


def test_evaluation_compiles_its_step_once_never_per_batch():
  rng = np.random.default_rng(0)
  model = _FixedMoE(jnp.asarray(rng.normal(size=(2, 2, 4, 5, 3)), jnp.float32),
                    jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)))
  batches = [{"image": rng.integers(0, 255, (2, 4, 5, 3), np.uint8),
              "label": rng.integers(0, 3, (2, 4, 5), np.uint8)} for _ in range(4)]
  compiled = evaluate._chunk_statistics._cache_size
  before = compiled()
  # The fixed model's outputs are a whole batch's: one micro-batch of 2 per batch.
  totals = evaluate.accumulate(_fixed_moe_outputs, model, batches, 3, uncertainty=True,
                               micro_batch=2)
  assert compiled() - before == 1
  assert int(totals["moe"]["confusion"].sum()) == 4 * 2 * 4 * 5


def _numbers(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [tree]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("logits", [[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]],   # p exactly 0/1
                                    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])    # all uniform
def test_one_pixel_extreme_logits_and_an_absent_class_give_finite_numbers_in_range(
    dtype, logits):
  """A batch of one pixel, experts at ±1e4 (probabilities of exactly 0 and 1) or uniform,
  in float32 and bfloat16, with class 2 absent from the labels: every statistic and every
  number of the summary is finite (or null where undefined) and the ratios are in [0, 1]."""
  expert_logits = jnp.asarray(logits, dtype)[:, None, None, None, :]  # [K=2,B=1,1,1,C=3]
  model = _FixedMoE(expert_logits, jnp.asarray([[0.5, 0.5]], dtype))
  batch = {"image": np.zeros((1, 1, 1, 3), np.uint8), "label": np.zeros((1, 1, 1), np.uint8)}
  stats, _ = evaluate.host_sums(evaluate.batch_statistics(
      _fixed_moe_outputs, model, batch, jax.random.key(0), 3, True, 0, 1))
  for method, values in stats.items():
    for name, value in values.items():
      assert np.all(np.isfinite(np.asarray(value, np.float64))), (method, name)
  for method, values in stats.items():
    entry = evaluate.summary(jax.device_get(values), metrics.REFERENCE_THRESHOLDS)
    numbers = [x for x in _numbers(entry) if x is not None]
    assert numbers and all(np.isfinite(x) for x in numbers), method
    assert entry["iou_per_class"][2] is None  # absent everywhere: undefined, not 0
    for measure, values in entry.get("uncertainty", {}).items():
      for key in ("p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu",
                  "ece", "mce", "adaptive_ece"):
        curve = [x for x in np.atleast_1d(values[key]) if x is not None]
        assert all(0.0 <= x <= 1.0 for x in curve), (method, measure, key)


@pytest.mark.parametrize("max_vmapped_pixels", [None, 144 * 3])
def test_batch_statistics_of_every_method_equal_each_computed_alone(max_vmapped_pixels,
                                                                     monkeypatch):
  """The statistics are computed for all methods (and all maps) at once, stacked (in
  chunks of 3 maps when the pixels exceed MAX_VMAPPED_PIXELS): each must equal the metric
  functions on that method's own output, the hard subset's on its pixels."""
  if max_vmapped_pixels:
    monkeypatch.setattr(evaluate, "MAX_VMAPPED_PIXELS", max_vmapped_pixels)
  rng = np.random.default_rng(3)
  model = _FixedMoE(jnp.asarray(rng.normal(size=(2, 3, 8, 6, 3)) * 2, jnp.float32),
                    jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)))
  labels = rng.integers(0, 3, (3, 8, 6)).astype(np.uint8)
  labels[0, :2] = 255
  subset = jnp.asarray(rng.random((3, 8, 6)) < 0.4)

  def outputs(model, images, key):
    return {**_fixed_moe_outputs(model, images, key), evaluate.HARD_SUBSET: subset}

  out = _fixed_moe_outputs(model, None, None)
  if max_vmapped_pixels:  # traced afresh (batch_statistics' cache would skip the patch)
    stats = jax.jit(lambda: evaluate._statistics(out, jnp.asarray(labels, jnp.int32), 3,
                                                 True, 2, subset))()
  else:
    batch = {"image": rng.integers(0, 255, (3, 8, 6, 3), np.uint8), "label": labels}
    stats, _ = evaluate.host_sums(evaluate.batch_statistics(
        outputs, model, batch, jax.random.key(0), 3, True, 0, 2, None, None,
        3))  # the whole batch at once
  assert set(stats) == set(out)
  y = jnp.asarray(labels, jnp.int32)
  valid = y < 3
  for method, output in out.items():
    correct = output["prediction"] == y
    expected = {"confusion": metrics.confusion_matrix(y, output["prediction"], 3),
                "hard/correct": jnp.sum(correct & valid & subset)}
    for prefix, mask in (("", valid), ("hard/", valid & subset)):
      expected[prefix + "calibration/max_softmax"] = metrics.calibration_histogram(
          jnp.max(output["probs"], -1), correct, mask, metrics.FINE_CALIBRATION_BINS)
      label_prob = jnp.take_along_axis(output["probs"], jnp.where(valid, y, 0)[..., None],
                                       -1)[..., 0]
      expected[prefix + "sums"] = [np.sum(mask), None, -np.sum(np.log(label_prob)[mask])]
    for measure in output:
      if measure not in evaluate.measures.MEASURES:
        continue
      u = output[measure]
      expected[f"histogram/{measure}"] = metrics.uncertainty_histogram(u, correct, valid)
      expected[f"detection/{measure}"] = metrics.detection_histogram(u, correct, valid)
      expected[f"per_image/{measure}"] = metrics.per_image_sums(u, correct, valid)
      expected[f"patch_histogram/{measure}"] = metrics.patch_uncertainty_histogram(
          u, correct, valid, 2)
      expected[f"calibration/{measure}"] = metrics.calibration_histogram(
          1.0 - u, correct, valid, metrics.FINE_CALIBRATION_BINS)
    for name, value in expected.items():
      if name.endswith("sums"):
        np.testing.assert_allclose(stats[method][name][0], value[0], err_msg=method + name)
        np.testing.assert_allclose(stats[method][name][2], value[2], rtol=1e-5,
                                   err_msg=method + name)
      else:
        np.testing.assert_allclose(stats[method][name], value, rtol=1e-6, atol=1e-6,
                                   err_msg=method + name)
