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


# ------------------------------------------------------------ conditional correctness

def loop_conditional_correctness(u, correct, t):
  """A plain loop over pixels, as one would write it by hand."""
  n_ac = n_ic = n_au = n_iu = 0
  for value, ok in zip(np.ravel(u), np.ravel(correct)):
    certain = value < t
    n_ac += certain and ok
    n_ic += certain and not ok
    n_au += (not certain) and ok
    n_iu += (not certain) and not ok
  n = n_ac + n_ic + n_au + n_iu
  return {"p_accurate_given_certain": n_ac / (n_ac + n_ic) if n_ac + n_ic else np.nan,
          "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu) if n_ic + n_iu else np.nan,
          "pavpu": (n_ac + n_iu) / n}


def test_conditional_correctness_by_hand():
  u = np.array([0.1, 0.2, 0.6, 0.9])
  correct = np.array([True, False, True, False])
  out = metrics.conditional_correctness(u, correct, thresholds=np.array([0.5]))
  # certain: 0.1 (acc), 0.2 (inacc); uncertain: 0.6 (acc), 0.9 (inacc)
  assert out["p_accurate_given_certain"][0] == pytest.approx(0.5)
  assert out["p_uncertain_given_inaccurate"][0] == pytest.approx(0.5)
  assert out["pavpu"][0] == pytest.approx(0.5)
  assert out["pavpu_reference"][0] == pytest.approx(2 / 4)  # (1 + 1) / (2 + 2)


def test_certain_means_strictly_below_the_threshold():
  out = metrics.conditional_correctness(np.array([0.5]), np.array([True]), np.array([0.5]))
  assert out["n_ac"][0] == 0 and out["n_au"][0] == 1


def test_histogram_metrics_equal_exact_computation_at_bin_edges():
  rng = np.random.default_rng(0)
  u = rng.random((3, 20, 30)).astype(np.float32)
  u[0, 0, :5] = [0.0, 1.0, 0.03, 0.5, 0.99]  # exactly on edges
  u = np.round(u * 1000) / 1000 * (rng.random(u.shape) < 0.5) + u * (rng.random(u.shape) >= 0.5)
  u = u.astype(np.float32)
  correct = rng.random(u.shape) < 0.7
  valid = rng.random(u.shape) < 0.9
  hist = np.asarray(metrics.uncertainty_histogram(jnp.asarray(u), jnp.asarray(correct),
                                                  jnp.asarray(valid)))
  assert hist.sum() == valid.sum()
  from_hist = metrics.conditional_correctness_from_histogram(hist)
  exact = metrics.conditional_correctness(u[valid], correct[valid])
  for key in exact:
    np.testing.assert_allclose(from_hist[key], exact[key], rtol=1e-12, err_msg=key)
  for i, t in enumerate(metrics.REFERENCE_THRESHOLDS[::7]):
    loop = loop_conditional_correctness(u[valid], correct[valid], np.float32(t))
    for key, value in loop.items():
      assert from_hist[key][i * 7] == pytest.approx(value), (key, t)


def test_histograms_merge_by_addition():
  rng = np.random.default_rng(1)
  u, correct = rng.random((2, 500)), rng.random((2, 500)) < 0.5
  valid = np.ones_like(correct)
  whole = metrics.uncertainty_histogram(jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid))
  halves = sum(metrics.uncertainty_histogram(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c))
               for a, b, c in zip(u, correct, valid))
  np.testing.assert_array_equal(whole, halves)


def test_thresholds_off_the_bin_edges_are_refused():
  with pytest.raises(ValueError, match="bin edges"):
    metrics.conditional_correctness_from_histogram(np.zeros((2, 1000)), np.array([0.0105]))


def loop_ece(confidence, correct, num_bins=15):
  total, gaps = len(confidence), []
  ece = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (b == 0 and c == 0)]
    if members:
      acc = np.mean([correct[i] for i in members])
      conf = np.mean([confidence[i] for i in members])
      ece += len(members) / total * abs(acc - conf)
      gaps.append(abs(acc - conf))
  return ece, max(gaps)


def test_ece_and_mce_against_a_plain_loop():
  rng = np.random.default_rng(3)
  confidence = np.concatenate([rng.random(300), [0.0, 1.0, 1 / 15, 2 / 15]])
  correct = rng.random(len(confidence)) < confidence
  out = metrics.expected_calibration_error(confidence, correct)
  ece, mce = loop_ece(confidence, correct)
  assert out["ece"] == pytest.approx(ece) and out["mce"] == pytest.approx(mce)


def test_ece_by_hand():
  # Two bins used: (0.8, 0.867] holds 0.85 x2 (one correct), (0.933, 1] holds 1.0 (correct).
  out = metrics.expected_calibration_error(np.array([0.85, 0.85, 1.0]),
                                           np.array([True, False, True]))
  assert out["ece"] == pytest.approx(2 / 3 * 0.35)
  assert out["mce"] == pytest.approx(0.35)


# ------------------------------------------------------------ detection (vs scikit-learn)

def binned_scores(rng, n, num_bins=50):
  """Scores on bin centres, so binning loses nothing and sklearn sees the same ties."""
  bins = rng.integers(0, num_bins, n)
  return bins, (bins + 0.5) / num_bins


def test_auroc_average_precision_and_fpr_match_scikit_learn():
  from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
  rng = np.random.default_rng(4)
  bins, scores = binned_scores(rng, 2000)
  positive = rng.random(2000) < 0.2 + 0.6 * scores  # informative, with ties in every bin
  negatives = np.bincount(bins[~positive], minlength=50)
  positives = np.bincount(bins[positive], minlength=50)
  assert metrics.auroc_from_histograms(negatives, positives) == pytest.approx(
      roc_auc_score(positive, scores), abs=1e-12)
  assert metrics.average_precision_from_histograms(negatives, positives) == pytest.approx(
      average_precision_score(positive, scores), abs=1e-12)
  fpr, tpr, _ = roc_curve(positive, scores)
  assert metrics.fpr_at_tpr_from_histograms(negatives, positives) == pytest.approx(
      fpr[tpr >= 0.95].min(), abs=1e-12)


def test_perfect_and_useless_detectors():
  assert metrics.auroc_from_histograms(np.array([5, 0]), np.array([0, 7])) == 1.0
  assert metrics.auroc_from_histograms(np.array([3, 3]), np.array([2, 2])) == pytest.approx(0.5)
  assert np.isnan(metrics.auroc_from_histograms(np.array([3, 3]), np.array([0, 0])))


def test_risk_coverage_by_hand():
  # bins 0..3; correct: [2, 1, 0, 0], incorrect: [0, 1, 1, 1]
  histogram = np.array([[0, 1, 1, 1], [2, 1, 0, 0]])
  out = metrics.risk_coverage_from_histogram(histogram)
  np.testing.assert_allclose(out["coverage"], [0, 2 / 6, 4 / 6, 5 / 6, 1])
  np.testing.assert_allclose(out["risk"][1:], [0, 1 / 4, 2 / 5, 3 / 6])
  expected = np.trapezoid([0, 1 / 4, 2 / 5, 3 / 6], [2 / 6, 4 / 6, 5 / 6, 1])
  assert out["aurc"] == pytest.approx(expected)
