"""Metrics against hand-computed values and plain numpy loops, and property tests that the
streaming accumulators merge by addition."""

import functools
import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import special

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


def test_nothing_with_u_1_is_certain_at_t_1_and_the_histograms_refuse_t_1():
  """Certain ⇔ u < t on both paths: the array path at t = 1 leaves u = 1 uncertain; the
  histogram's last bin holds u = 1 with [0.999, 1), so it refuses t = 1 rather than count
  u = 1 as certain, and agrees with the array path at every edge below 1."""
  u = np.array([0.0, 0.5, 0.9995, 1.0, 1.0], np.float32)
  correct = np.array([True, False, True, False, True])
  at_one = metrics.conditional_correctness(u, correct, np.array([1.0]))
  assert (at_one["n_ac"][0], at_one["n_ic"][0], at_one["n_au"][0], at_one["n_iu"][0]) == (
      2, 1, 1, 1)
  hist = np.asarray(metrics.uncertainty_histogram(jnp.asarray(u), jnp.asarray(correct),
                                                  jnp.ones(5, bool)))
  edges = np.array([0.0, 0.5, 0.501, 0.999])
  from_hist = metrics.conditional_correctness_from_histogram(hist, edges)
  exact = metrics.conditional_correctness(u, correct, edges)
  for key in exact:
    np.testing.assert_array_equal(from_hist[key], exact[key], err_msg=key)
  for thresholds in (np.array([1.0]), np.array([0.5, 1.0])):
    with pytest.raises(ValueError, match="bin edges"):
      metrics.conditional_correctness_from_histogram(hist, thresholds)
    with pytest.raises(ValueError, match="bin edges"):
      metrics.per_image_sums(jnp.asarray(u[None, None]), jnp.asarray(correct[None, None]),
                             jnp.ones((1, 1, 5), bool), thresholds)


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


def test_fine_histogram_regroups_exactly_into_the_15_bins():
  rng = np.random.default_rng(5)
  edges = np.concatenate([np.arange(16) / 15, np.arange(0, 1501, 7) / 1500])
  confidence = np.concatenate([rng.random(3000), edges]).astype(np.float32)
  correct = rng.random(len(confidence)) < confidence
  valid = rng.random(len(confidence)) < 0.9
  args = jnp.asarray(confidence), jnp.asarray(correct), jnp.asarray(valid)
  fine = np.asarray(metrics.calibration_histogram(*args, metrics.FINE_CALIBRATION_BINS))
  coarse = np.asarray(metrics.calibration_histogram(*args))
  np.testing.assert_array_equal(fine[0].reshape(15, 100).sum(1), coarse[0])
  np.testing.assert_allclose(fine.reshape(3, 15, 100).sum(2), coarse, rtol=1e-6)
  from_fine, direct = metrics.calibration_errors(fine, 15), metrics.calibration_errors(coarse)
  assert from_fine["ece"] == pytest.approx(direct["ece"], abs=1e-6)  # float32 sums
  assert from_fine["mce"] == pytest.approx(direct["mce"], abs=1e-6)
  with pytest.raises(ValueError, match="regroup"):
    metrics.calibration_errors(fine, 14)


def numpy_calibration_errors(confidence, correct, num_bins):
  """ECE/MCE of (lo, hi] bins against the float32 edges, summed in float64 by numpy."""
  conf = np.asarray(confidence, np.float64).reshape(-1)
  edges = metrics.bin_edges(num_bins).astype(np.float64)
  bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  gap = np.abs(np.bincount(bins, np.ravel(correct), num_bins) - np.bincount(bins, conf, num_bins))
  filled = count > 0
  return gap[filled].sum() / count.sum(), (gap[filled] / count[filled]).max()


PAPER_BATCH = (4, 912, 912)  # the paper preset's eval batch: one calibration_histogram call


@pytest.mark.parametrize("num_bins", [15, metrics.FINE_CALIBRATION_BINS])
def test_calibration_sums_are_accurate_at_paper_scale(num_bins):
  """A per-image-constant confidence (the simple gate's 1 - GE) over 4 x 912 x 912 pixels in
  one call: ECE within 1e-5 of numpy's float64 (a plain float32 scatter-add was 0.017 off);
  and 3.3 M distinct confidences in one fine bin sum to within 1e-7 relative."""
  rng = np.random.default_rng(12)
  per_image = np.array([0.97, 0.5 + 1e-4, 0.8, 1.0], np.float32)
  confidence = np.broadcast_to(per_image[:, None, None], PAPER_BATCH)
  correct = rng.random(PAPER_BATCH) < per_image[:, None, None] - 3e-4
  valid = np.ones(PAPER_BATCH, bool)
  histogram = jax.jit(metrics.calibration_histogram, static_argnums=3)
  out = metrics.calibration_errors(histogram(confidence, correct, valid, num_bins))
  ece, mce = numpy_calibration_errors(confidence, correct, num_bins)
  assert ece < 1e-3 and out["ece"] == pytest.approx(ece, abs=1e-5)
  assert out["mce"] == pytest.approx(mce, abs=1e-5)
  lo = np.float32(0.9)  # a fine edge: the values fill the fine bin (0.9, 0.9 + 1/1500]
  distinct = np.nextafter(lo + rng.random(PAPER_BATCH, np.float32) * np.float32(1 / 1600),
                          np.float32(1))
  sums = np.asarray(histogram(distinct, correct, valid, num_bins), np.float64)
  assert sums[0].sum() == distinct.size and sums[2].sum() == correct.sum()
  exact = distinct.astype(np.float64).sum()
  assert sums[1].sum() == pytest.approx(exact, rel=1e-7)


def loop_adaptive_ece(confidence, correct, num_bins=15):
  """Sort, then walk equal-count groups (the first n % num_bins one element larger)."""
  order = sorted(range(len(confidence)), key=lambda i: confidence[i])
  size, extra = divmod(len(order), num_bins)
  ece, gaps, start = 0.0, [], 0
  for b in range(num_bins):
    members = order[start:start + size + (b < extra)]
    start += len(members)
    if members:
      gap = abs(np.mean([correct[i] for i in members]) - np.mean([confidence[i] for i in members]))
      ece += len(members) / len(order) * gap
      gaps.append(gap)
  return ece, max(gaps)


def test_adaptive_ece_by_hand_and_against_a_plain_loop():
  # Two groups of two: {0.1 wrong, 0.2 right} gap 0.35, {0.3, 0.4 right} gap 0.65.
  confidence, correct = np.array([0.3, 0.1, 0.4, 0.2]), np.array([True, False, True, True])
  exact = metrics.adaptive_expected_calibration_error(confidence, correct, num_bins=2)
  assert exact["ece"] == pytest.approx(0.5) and exact["mce"] == pytest.approx(0.65)
  fine = metrics.calibration_histogram(jnp.asarray(confidence), jnp.asarray(correct),
                                       jnp.ones(4, bool), metrics.FINE_CALIBRATION_BINS)
  streamed = metrics.adaptive_calibration_errors(fine, num_bins=2)
  assert streamed["ece"] == pytest.approx(0.5) and streamed["mce"] == pytest.approx(0.65)
  rng = np.random.default_rng(6)
  for n in (7, 15, 301):
    confidence = rng.random(n)
    correct = rng.random(n) < confidence ** 2
    out = metrics.adaptive_expected_calibration_error(confidence, correct)
    ece, mce = loop_adaptive_ece(confidence, correct)
    assert out["ece"] == pytest.approx(ece) and out["mce"] == pytest.approx(mce), n


def test_streaming_adaptive_ece_is_close_to_the_exact_one():
  rng = np.random.default_rng(7)
  n = 100_000
  confidence = rng.beta(5, 2, n)  # miscalibration that changes sign along the confidence
  correct = rng.random(n) < np.clip(confidence + 0.1 * np.sin(12 * confidence), 0, 1)
  fine = np.asarray(metrics.calibration_histogram(
      jnp.asarray(confidence, jnp.float32), jnp.asarray(correct), jnp.ones(n, bool),
      metrics.FINE_CALIBRATION_BINS))
  streamed = metrics.adaptive_calibration_errors(fine)
  exact = metrics.adaptive_expected_calibration_error(confidence, correct)
  assert abs(streamed["ece"] - exact["ece"]) < min(5e-4, 2 * 14 * fine[0].max() / n)
  assert abs(streamed["mce"] - exact["mce"]) < 3e-3
  assert np.isnan(metrics.adaptive_calibration_errors(np.zeros((3, 1500)))["ece"])


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
  # Risk of the first k = 1..6 pixels: 0, 0; bin 1 in either order: (1/3 + 0) / 2, 1/4; 2/5, 3/6.
  assert out["aurc"] == pytest.approx((0 + 0 + 1 / 6 + 1 / 4 + 2 / 5 + 3 / 6) / 6)


def sorted_aurc(scores, wrong):
  """Exact per-pixel AURC: the mean over k of the error rate of the k lowest scores, each
  group of tied scores in every order with equal probability (its expected errors grow
  linearly through the group)."""
  scores, wrong = np.asarray(scores, np.float64).ravel(), np.asarray(wrong, bool).ravel()
  order = np.argsort(scores, kind="stable")
  _, start, size = np.unique(scores[order], return_index=True, return_counts=True)
  errors_by = np.concatenate([[0], np.cumsum(wrong[order])])[np.append(start, len(scores))]
  k = np.arange(1, len(scores) + 1)
  group = np.searchsorted(start, k - 1, side="right") - 1
  expected = errors_by[group] + (k - start[group]) * np.diff(errors_by)[group] / size[group]
  return float(np.mean(expected / k))


def test_sorted_aurc_reference_averages_over_every_order_of_ties():
  scores = np.array([0.2, 0.1, 0.2, 0.2, 0.7, 0.1, 0.7])
  wrong = np.array([True, False, False, True, True, True, False])
  orders = list(itertools.permutations(range(len(scores))))
  mean = np.mean([np.mean(np.cumsum(wrong[np.lexsort((perm, scores))]) / np.arange(1, 8))
                  for perm in orders])
  assert sorted_aurc(scores, wrong) == pytest.approx(mean, rel=1e-12)
  distinct = np.random.default_rng(13).random(50)
  assert sorted_aurc(distinct, distinct > 0.6) == pytest.approx(
      np.mean(np.cumsum(np.sort(distinct) > 0.6) / np.arange(1, 51)), rel=1e-12)


@pytest.mark.parametrize("where", ["first bin", "last bin", "middle", "tied groups",
                                   "random"])
def test_aurc_equals_the_exact_sorted_aurc(where):
  """Heavy ties and a score constant over all pixels (AURC = the error rate, not 0 or nan)
  in both histogram layouts; distinct scores within 1e-3 in the detection layout."""
  rng = np.random.default_rng(14)
  n = 20_000
  wrong = rng.random(n) < 0.3
  scores = {"first bin": np.zeros(n), "last bin": np.ones(n), "middle": np.full(n, 0.4567),
            "tied groups": np.round(rng.random(n), 1) / np.where(wrong, 1.0, 2.0),
            "random": rng.random(n) ** 3 * np.where(wrong, 1.0, 0.2)}[where].astype(np.float32)
  exact = sorted_aurc(scores, wrong)
  if where in ("first bin", "last bin", "middle"):
    assert exact == pytest.approx(wrong.mean(), rel=1e-12)
  args = jnp.asarray(scores), jnp.asarray(~wrong), jnp.ones(n, bool)
  detection = metrics.risk_coverage_from_histogram(metrics.detection_histogram(*args))["aurc"]
  assert detection == pytest.approx(exact, abs=1e-3 if where == "random" else 1e-12)
  if where != "random":  # every distinct value in its own 1000-layout bin too
    assert metrics.risk_coverage_from_histogram(metrics.uncertainty_histogram(*args))[
        "aurc"] == pytest.approx(exact, rel=1e-12)
  assert np.isnan(metrics.risk_coverage_from_histogram(np.zeros((2, 5)))["aurc"])


def detection_lower_edges():
  """float64 lower edges of the detection bins, from their definition: 0 (u = 0), the
  smallest normal float32 (XLA flushes subnormals to 0), 2^e (1 + j / 256) for e = -100..-6,
  k / 16384 for k = 512..16384 (the last bin is u = 1)."""
  log = [2.0 ** e * (1 + j / 256) for e in range(-100, -5) for j in range(256)]
  return np.array([0.0, 2.0 ** -126] + log + [k / 16384 for k in range(512, 16385)])


def test_detection_bins_against_float64_edges():
  edges = detection_lower_edges()
  assert len(edges) == metrics.DETECTION_BINS
  rng = np.random.default_rng(15)
  u = np.concatenate([edges, np.exp(rng.uniform(np.log(1e-38), 0, 50_000)), rng.random(5000)])
  u = u.astype(np.float32)
  u = np.concatenate([u, np.nextafter(u, np.float32(0)), np.nextafter(u, np.float32(2))])
  u = np.clip(u, 0, 1)
  u = u[(u == 0) | (u >= 2.0 ** -126)]
  correct = rng.random(u.shape) < 0.5
  valid = rng.random(u.shape) < 0.9
  histogram = np.asarray(jax.jit(metrics.detection_histogram)(u, correct, valid))
  bins = np.searchsorted(edges, u.astype(np.float64), side="right") - 1
  for row, ok in enumerate((False, True)):
    np.testing.assert_array_equal(
        histogram[row], np.bincount(bins[valid & (correct == ok)], minlength=len(edges)))
  odd = np.array([-0.5, 2.0, np.nan, np.inf, -np.inf], np.float32)  # clipped, NaN counts as 1
  np.testing.assert_array_equal(np.nonzero(metrics.detection_histogram(
      jnp.asarray(odd), jnp.ones(5, bool), jnp.ones(5, bool))[1])[0], [0, len(edges) - 1])


def exact_detection(scores, positive):
  """Per-pixel AUROC, average precision and FPR at 95% TPR (scikit-learn; higher = positive)
  and the sorted AURC (positive = incorrect)."""
  from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
  scores = np.asarray(scores, np.float64)
  out = {"auroc": np.nan, "aupr": np.nan, "fpr95": np.nan,
         "aurc": sorted_aurc(scores, positive)}
  if positive.all() or not positive.any():
    return out
  fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
  return {**out, "auroc": roc_auc_score(positive, scores), "fpr95": fpr[tpr >= 0.95].min(),
          "aupr": average_precision_score(positive, scores)}


def binned_detection(histogram):
  """The same four from a [2, bins] histogram (row 0 incorrect = positive, as evaluate)."""
  negatives, positives = histogram[1], histogram[0]
  return {"auroc": metrics.auroc_from_histograms(negatives, positives),
          "aupr": metrics.average_precision_from_histograms(negatives, positives),
          "fpr95": metrics.fpr_at_tpr_from_histograms(negatives, positives),
          "aurc": metrics.risk_coverage_from_histogram(histogram)["aurc"]}


def error_bounds(histogram):
  """docs/metrics.md's bounds on |binned − per-pixel|: all from the histogram alone."""
  positives, negatives = np.asarray(histogram, np.float64)
  n = positives + negatives
  above = np.cumsum(n[::-1])[::-1]  # scores >= each bin's lower edge
  total_pos, total_neg = positives.sum(), negatives.sum()
  pos_above = np.cumsum(positives[::-1])[::-1]
  crossing = np.nonzero(pos_above >= 0.95 * total_pos)[0].max()
  before = above[0] - above  # scores below the bin
  filled = n > 0
  harmonic = special.digamma(before + n + 1) - special.digamma(before + 1)
  return {"auroc": 0.5 * np.sum(positives * negatives) / (total_pos * total_neg),
          "aupr": np.sum(positives[filled] / total_pos * (n[filled] - 1) / above[filled]),
          "fpr95": negatives[crossing] / total_neg,
          "aurc": np.sum((positives * negatives / np.maximum(n, 1) * harmonic)[filled]) / n.sum()}


def detection_case(name, rng, n=100_000):
  """(scores, incorrect) adversarial for binning: mostly near 0, exact 0 and 1, ties."""
  z = rng.normal(size=n)
  if name == "near zero":  # 88% below 1e-3, down to 1e-30
    u = np.exp(-18 + 6 * z)
    return u, rng.random(n) < 1 / (1 + np.exp(-(np.log(u) + 9) / 2))
  if name in ("one decade", "too narrow"):  # std of ln u 1 (0.05: all within a few bins)
    wrong = rng.random(n) < 0.4
    width = 1.0 if name == "one decade" else 0.05
    return np.exp(-9 + width * (z + 0.5 * wrong)), wrong
  if name == "zeros and ones":
    u = np.where(rng.random(n) < 0.3, 0.0, np.exp(-15 + 5 * z))
    u = np.where(rng.random(n) < 0.05, 1.0, u)
    return u, rng.random(n) < np.where(u == 0, 0.02, 0.1 + 0.5 * (u > 1e-6))
  if name == "per-image constant":  # 400 images, the simple gate's GE
    image = rng.integers(0, 400, n)
    u = np.exp(rng.normal(-20, 8, 400)).clip(0, 1)[image]
    return u, rng.random(n) < 0.05 + 0.5 * rng.random(400)[image]
  if name == "uniform":
    u = rng.random(n)
    return u, rng.random(n) < u
  if name == "ties":  # 41 values, one per bin
    values = np.concatenate([[0.0, 1.0], 10.0 ** -np.arange(1, 31, 1.0), np.arange(1, 10) / 10])
    pick = rng.integers(0, len(values), n)
    return values[pick], rng.random(n) < 0.2 + 0.6 * (pick % 7) / 7
  raise ValueError(name)


@pytest.mark.parametrize("name", ["near zero", "one decade", "too narrow", "zeros and ones",
                                  "per-image constant", "uniform", "ties"])
def test_detection_metrics_match_scikit_learn_per_pixel(name):
  """AUROC, AUPR, FPR@95 and AURC from the detection histogram within 1e-3 of the per-pixel
  values and within the documented bounds; exactly equal when each bin holds one value.
  Scores packed into a few bins ("too narrow") are only within the bounds."""
  scores, wrong = detection_case(name, np.random.default_rng(16))
  scores = scores.astype(np.float32)
  histogram = np.asarray(metrics.detection_histogram(
      jnp.asarray(scores), jnp.asarray(~wrong), jnp.ones(len(scores), bool)))
  exact, binned = exact_detection(scores, wrong), binned_detection(histogram)
  bounds = error_bounds(histogram)
  for key, value in exact.items():
    error = abs(binned[key] - value)
    assert error <= {"ties": 1e-12, "too narrow": 1}.get(name, 1e-3), (key, binned[key], value)
    assert error <= bounds[key] + 1e-12, (key, error, bounds[key])
  assert binned["fpr95"] >= exact["fpr95"] - 1e-12  # edges never under-report it
  if name == "near zero":  # the 1000 equal-width bins make most of these pixels ties
    coarse = np.asarray(metrics.uncertainty_histogram(
        jnp.asarray(scores), jnp.asarray(~wrong), jnp.ones(len(scores), bool)))
    assert abs(binned_detection(coarse)["auroc"] - exact["auroc"]) > 0.01


def test_detection_metrics_with_one_class_empty():
  scores = jnp.asarray(np.random.default_rng(17).random(100), jnp.float32)
  for correct, aurc, aupr in ((True, 0.0, np.nan), (False, 1.0, 1.0)):
    out = binned_detection(np.asarray(metrics.detection_histogram(
        scores, jnp.full(100, correct), jnp.ones(100, bool))))
    assert np.isnan(out["auroc"]) and np.isnan(out["fpr95"])
    assert out["aurc"] == aurc and out["aupr"] == pytest.approx(aupr, nan_ok=True)
  empty = binned_detection(np.zeros((2, metrics.DETECTION_BINS), np.int64))
  assert all(np.isnan(value) for value in empty.values())


# ------------------------------------------------------------ patches and per-image means

def loop_patches(u, correct, valid, patch):
  """(mean uncertainty, accurate) of every patch with a valid pixel, by plain loops."""
  means, accurate = [], []
  b, h, w = u.shape
  for n in range(b):
    for i in range(0, h - patch + 1, patch):
      for j in range(0, w - patch + 1, patch):
        cells = [(n, y, x) for y in range(i, i + patch) for x in range(j, j + patch)
                 if valid[n, y, x]]
        if cells:
          means.append(np.mean([u[c] for c in cells], dtype=np.float64))
          accurate.append(np.mean([correct[c] for c in cells]) >= 0.5)
  return np.array(means), np.array(accurate)


def test_patch_metrics_against_a_loop_over_patches():
  rng = np.random.default_rng(8)
  u = rng.random((2, 10, 13)).astype(np.float32)  # cropped to 8 x 12
  correct = rng.random(u.shape) < 1 - u
  valid = rng.random(u.shape) < 0.8
  valid[0, :4, :4] = False                                # a patch with no valid pixel
  valid[0, 4:8, :4], correct[0, 4:8, :4] = True, np.arange(16).reshape(4, 4) % 2 == 0  # 50%
  means, accurate = loop_patches(u, correct, valid, 4)
  assert len(means) == 2 * 2 * 3 - 1 and accurate[2]
  hist = np.asarray(metrics.patch_uncertainty_histogram(
      jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid), patch=4))
  assert hist.sum() == len(means) and hist[1].sum() == accurate.sum()
  from_hist = metrics.conditional_correctness_from_histogram(hist)
  direct = metrics.patch_conditional_correctness(u, correct, patch=4, valid=valid)
  for i, t in enumerate(metrics.REFERENCE_THRESHOLDS):
    for key, value in loop_conditional_correctness(means, accurate, t).items():
      assert from_hist[key][i] == pytest.approx(value, nan_ok=True), (key, t)
      assert direct[key][i] == pytest.approx(value, nan_ok=True), (key, t)


def test_patch_of_one_pixel_is_the_pixel_metric():
  rng = np.random.default_rng(9)
  u = rng.random((2, 7, 9)).astype(np.float32)
  correct, valid = rng.random(u.shape) < 0.6, rng.random(u.shape) < 0.8
  args = jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid)
  np.testing.assert_array_equal(metrics.patch_uncertainty_histogram(*args, patch=1),
                                metrics.uncertainty_histogram(*args))
  patched = metrics.patch_conditional_correctness(u, correct, patch=1, valid=valid)
  pixels = metrics.conditional_correctness(u[valid], correct[valid])
  for key in pixels:
    np.testing.assert_array_equal(patched[key], pixels[key], err_msg=key)


def per_image_data(rng):
  """Images with undefined ratios: all correct (no inaccurate pixel), all certain only above
  t = 0.5, no valid pixel; nobody is certain at t = 0.01. Half the values on bin edges."""
  u = (0.01 + 0.99 * rng.random((5, 9, 11))).astype(np.float32)
  u = np.where(rng.random(u.shape) < 0.5, np.round(u * 1000) / 1000, u).astype(np.float32)
  correct, valid = rng.random(u.shape) < 1 - u, rng.random(u.shape) < 0.9
  correct[1] = True
  u[2], correct[2] = 0.5 + u[2] / 2, True
  valid[3] = False
  return u, correct, valid


def loop_per_image(u, correct, valid, undefined_as_zero):
  """conditional_correctness image by image, then a mean (undefined as 0) or a nanmean."""
  rows = [metrics.conditional_correctness(u[i][valid[i]], correct[i][valid[i]])
          for i in range(len(u)) if valid[i].any()]
  out = {}
  for key in metrics.PER_IMAGE_METRICS:
    values = np.array([row[key] for row in rows])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-nan column
      out[key] = np.nan_to_num(values).mean(0) if undefined_as_zero else np.nanmean(values, 0)
  return out


def test_per_image_means_against_a_per_image_loop():
  u, correct, valid = per_image_data(np.random.default_rng(10))
  sums = np.asarray(metrics.per_image_sums(jnp.asarray(u), jnp.asarray(correct),
                                           jnp.asarray(valid)))
  assert sums.shape == (2, 4, 50)
  np.testing.assert_array_equal(sums[1, 2], 4)  # PAvPU: every image with a valid pixel
  for zero in (True, False):
    out = metrics.per_image_conditional_correctness(sums, undefined_as_zero=zero)
    expected = loop_per_image(u, correct, valid, zero)
    for key in metrics.PER_IMAGE_METRICS:
      np.testing.assert_allclose(out[key], expected[key], rtol=1e-6, err_msg=f"{key} {zero}")
  nanmean = metrics.per_image_conditional_correctness(sums, undefined_as_zero=False)
  assert np.isnan(nanmean["p_accurate_given_certain"][0])  # no image is certain at t = 0.01
  empty = metrics.per_image_conditional_correctness(np.zeros((2, 4, 50)))
  assert all(np.isnan(v).all() for v in empty.values())


def test_per_image_sums_jit_and_refuse_thresholds_off_the_edges():
  u, correct, valid = per_image_data(np.random.default_rng(11))
  thresholds = np.array([0.0, 0.25, 0.5, 0.999])
  jitted = jax.jit(functools.partial(metrics.per_image_sums, thresholds=thresholds))
  np.testing.assert_array_equal(jitted(u, correct, valid), metrics.per_image_sums(
      jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid), thresholds))
  with pytest.raises(ValueError, match="bin edges"):
    metrics.per_image_sums(jnp.asarray(u), jnp.asarray(correct), jnp.asarray(valid),
                           np.array([0.0105]))


_patch_histogram = jax.jit(metrics.patch_uncertainty_histogram, static_argnames="patch")
_fine_histogram = jax.jit(lambda u, correct, valid: metrics.calibration_histogram(
    1 - u, correct, valid, metrics.FINE_CALIBRATION_BINS))
_per_image_sums = jax.jit(metrics.per_image_sums)  # default thresholds
_detection_histogram = jax.jit(metrics.detection_histogram)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_new_accumulators_merge_by_addition(seed, decimals, split, patch):
  """Summing the accumulators of two parts of a batch gives that of the whole (fixed shapes,
  so each jitted accumulator compiles once per part size)."""
  rng = np.random.default_rng(seed)
  u = np.round(rng.random((4, 8, 9)), decimals).astype(np.float32)  # ties and bin edges
  correct, valid = rng.random(u.shape) < 1 - u, rng.random(u.shape) < 0.8

  def both(fn):
    parts = [fn(u[s], correct[s], valid[s]) for s in (slice(0, split), slice(split, None))]
    return np.asarray(fn(u, correct, valid), np.float64), sum(np.asarray(p, np.float64)
                                                              for p in parts)

  for fn in (functools.partial(_patch_histogram, patch=patch), _detection_histogram):
    np.testing.assert_array_equal(*both(fn))
  for fn, counts in ((_fine_histogram, 0), (_per_image_sums, 1)):  # counts exact, sums close
    whole, halves = both(fn)
    np.testing.assert_array_equal(whole[counts], halves[counts])
    np.testing.assert_allclose(whole, halves, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_bins", [7, 15, 1000, 1500])
@pytest.mark.parametrize("side", ["left", "right"])
def test_edge_bins_equal_a_search_of_the_float32_edges(num_bins, side):
  edges = metrics.bin_edges(num_bins)
  values = np.concatenate([np.random.default_rng(num_bins).random(20000, np.float32), edges,
                           np.nextafter(edges, np.float32(2)),
                           np.nextafter(edges, np.float32(-1))])
  values = np.clip(values, 0, 1).astype(np.float32)  # the edges and their float neighbours
  # XLA on CPU flushes subnormals to zero: the smallest normal float stands for them.
  tiny = np.finfo(np.float32).tiny
  values = np.where((values > 0) & (values < tiny), tiny, values)
  np.testing.assert_array_equal(metrics.edge_bins(jnp.asarray(values), num_bins, side),
                                np.searchsorted(edges, values, side=side))
