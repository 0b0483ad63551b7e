"""Confusion matrix and IoU against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import metrics


def test_confusion_matrix_counts_pairs_and_ignores_255():
  labels = jnp.array([[0, 0, 1, 2], [2, 255, 1, 7]])
  preds = jnp.array([[0, 1, 1, 2], [0, 2, 2, 1]])
  expected = np.array([[1, 1, 0],   # true 0: predicted 0 once, 1 once
                       [0, 1, 1],   # true 1: 1 once, 2 once
                       [1, 0, 1]])  # true 2: 0 once, 2 once; 255 and 7 are ignored
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 3), expected)


def test_confusion_matrix_matches_a_numpy_count_on_random_data():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, (3, 17, 19))
  labels[rng.random(labels.shape) < 0.2] = 255
  preds = rng.integers(0, 5, labels.shape)
  expected = np.zeros((5, 5), np.int64)
  for t, p in zip(labels.ravel(), preds.ravel()):
    if t < 5:
      expected[t, p] += 1
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, 5), expected)


def test_iou_and_miou_by_hand():
  confusion = np.array([[3, 1, 0],
                        [2, 4, 0],
                        [0, 0, 0]])  # class 2 neither present nor predicted
  iou = metrics.iou_per_class(confusion)
  np.testing.assert_allclose(iou[:2], [3 / (4 + 5 - 3), 4 / (6 + 5 - 4)])
  assert np.isnan(iou[2])
  assert metrics.mean_iou(confusion) == pytest.approx((3 / 6 + 4 / 7) / 2)
  assert metrics.pixel_accuracy(confusion) == pytest.approx(7 / 10)


def test_a_class_predicted_but_absent_counts_as_zero():
  confusion = np.array([[2, 2], [0, 0]])  # class 1 never true, predicted twice
  np.testing.assert_allclose(metrics.iou_per_class(confusion), [0.5, 0.0])
  assert metrics.mean_iou(confusion) == pytest.approx(0.25)


def test_empty_confusion_gives_nan_not_an_error():
  assert np.isnan(metrics.mean_iou(np.zeros((3, 3))))
  assert np.isnan(metrics.pixel_accuracy(np.zeros((3, 3))))


def test_confusions_merge_by_addition():
  rng = np.random.default_rng(1)
  labels, preds = rng.integers(0, 4, (2, 50)), rng.integers(0, 4, (2, 50))
  whole = metrics.confusion_matrix(labels, preds, 4)
  parts = sum(metrics.confusion_matrix(l, p, 4) for l, p in zip(labels, preds))
  np.testing.assert_array_equal(whole, parts)
