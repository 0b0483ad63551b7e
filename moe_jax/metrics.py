"""Segmentation metrics from confusion matrices (mergeable by summing).

A confusion matrix is computed per batch on the device (int32, jit-able) and summed on
the host in int64, so its memory does not depend on the number of images and two
partial results (devices, hosts, shards of a split) merge by addition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int) -> jax.Array:
  """Counts of (true class, predicted class) over pixels whose label is not 255.

  Args:
    labels: int [...] class ids, 255 = ignore (any other id >= num_classes is ignored too).
    predictions: int [...] predicted class ids, same shape.
    num_classes: C.

  Returns:
    int32 [C, C]; rows are true classes, columns predictions.
  """
  labels = labels.astype(jnp.int32).reshape(-1)
  predictions = predictions.astype(jnp.int32).reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
  counts = jnp.bincount(index, length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
  """IoU_c = TP / (GT_c + Pred_c - TP); nan for a class neither present nor predicted.

  Args:
    confusion: [C, C] counts (rows true, columns predicted).

  Returns:
    float64 [C].
  """
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, true_positive / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
  """Mean IoU over classes present in the labels or the predictions (as the reference's
  `np.nanmean`: a class predicted but absent from the labels counts as 0). nan if none."""
  iou = iou_per_class(confusion)
  return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
  """Fraction of labelled pixels predicted correctly (nan when there are none)."""
  confusion = np.asarray(confusion, np.float64)
  total = confusion.sum()
  return float(np.trace(confusion) / total) if total else float("nan")


# ------------------------------------------------------------ uncertainty vs. correctness

NUM_BINS = 1000
# The reference's threshold sweep, t = 0.01, 0.03, ..., 0.99: all on the bin edges.
REFERENCE_THRESHOLDS = np.arange(1, 100, 2) / 100


def bin_edges(num_bins: int = NUM_BINS) -> np.ndarray:
  """float32 [num_bins + 1] edges k / num_bins of the uncertainty histograms on [0, 1]."""
  return (np.arange(num_bins + 1) / num_bins).astype(np.float32)


def uncertainty_histogram(uncertainty: jax.Array, correct: jax.Array, valid: jax.Array,
                          num_bins: int = NUM_BINS) -> jax.Array:
  """Counts of valid pixels per uncertainty bin, split by correctness (jit-able).

  Bin b holds edges[b] <= u < edges[b + 1] (u = 1 in the last bin), computed against the
  same float32 edges the thresholds use, so "certain" (u < t) at any edge t is exact.

  Args:
    uncertainty: normalised uncertainty in [0, 1], any shape.
    correct: bool, same shape (prediction == label).
    valid: bool, same shape (label != 255).

  Returns:
    int32 [2, num_bins]: row 0 incorrect, row 1 correct.
  """
  edges = jnp.asarray(bin_edges(num_bins))
  u = jnp.clip(uncertainty.astype(jnp.float32).reshape(-1), 0.0, 1.0)
  bins = jnp.clip(jnp.searchsorted(edges, u, side="right") - 1, 0, num_bins - 1)
  index = jnp.where(valid.reshape(-1), correct.reshape(-1).astype(jnp.int32) * num_bins + bins,
                    2 * num_bins)
  return jnp.bincount(index, length=2 * num_bins + 1)[:-1].reshape(2, num_bins).astype(jnp.int32)


def conditional_correctness_from_histogram(histogram: np.ndarray,
                                           thresholds: np.ndarray = REFERENCE_THRESHOLDS
                                           ) -> dict[str, np.ndarray]:
  """p(accurate|certain), p(uncertain|inaccurate), PAvPU at thresholds on the bin edges.

  "Certain" ⇔ u < t for every method (compared in float32). PAvPU = (n_ac + n_iu) / N (Mukhoti & Gal);
  `pavpu_reference` = (n_ac + n_iu) / (n_c + n_i), the reference code's denominator, where
  n_c = certain and n_i = inaccurate pixels. A ratio with an empty denominator is nan.

  Args:
    histogram: [2, num_bins] counts (row 0 incorrect, row 1 correct), summed over images.
    thresholds: values k / num_bins in [0, 1].

  Returns:
    {name: float64 [T]} for p_accurate_given_certain, p_uncertain_given_inaccurate, pavpu,
    pavpu_reference, and the counts n_ac, n_ic, n_au, n_iu.
  """
  histogram = np.asarray(histogram, np.int64)
  num_bins = histogram.shape[1]
  k = np.rint(np.asarray(thresholds, np.float64) * num_bins).astype(int)
  if not np.allclose(k / num_bins, thresholds):
    raise ValueError(f"thresholds must lie on the {num_bins} histogram bin edges")
  below = np.concatenate([[[0], [0]], np.cumsum(histogram, axis=1)], axis=1)  # [2, bins+1]
  n_ic, n_ac = below[0, k], below[1, k]
  n_iu, n_au = histogram[0].sum() - n_ic, histogram[1].sum() - n_ac
  return _ratios(n_ac, n_ic, n_au, n_iu)


def conditional_correctness(uncertainty: np.ndarray, correct: np.ndarray,
                            thresholds: np.ndarray = REFERENCE_THRESHOLDS
                            ) -> dict[str, np.ndarray]:
  """The same metrics straight from arrays (any thresholds): u [...], correct bool [...].

  Like the histograms, compares in float32 (the maps' dtype): certain ⇔ u < float32(t).
  """
  u = np.asarray(uncertainty, np.float32).reshape(-1)
  ok = np.asarray(correct, bool).reshape(-1)
  certain = u[None, :] < np.asarray(thresholds, np.float32)[:, None]  # [T, N]
  n_ac = np.sum(certain & ok, 1)
  n_ic = np.sum(certain & ~ok, 1)
  return _ratios(n_ac, n_ic, ok.sum() - n_ac, (~ok).sum() - n_ic)


def _ratios(n_ac, n_ic, n_au, n_iu) -> dict[str, np.ndarray]:
  n_ac, n_ic, n_au, n_iu = (np.asarray(x, np.float64) for x in (n_ac, n_ic, n_au, n_iu))
  total = n_ac + n_ic + n_au + n_iu
  with np.errstate(invalid="ignore", divide="ignore"):
    return {
        "p_accurate_given_certain": n_ac / (n_ac + n_ic),
        "p_uncertain_given_inaccurate": n_iu / (n_ic + n_iu),
        "pavpu": (n_ac + n_iu) / total,
        "pavpu_reference": (n_ac + n_iu) / ((n_ac + n_ic) + (n_ic + n_iu)),
        "n_ac": n_ac, "n_ic": n_ic, "n_au": n_au, "n_iu": n_iu,
    }


def calibration_histogram(confidence: jax.Array, correct: jax.Array, valid: jax.Array,
                          num_bins: int = 15) -> jax.Array:
  """Per-bin (count, Σ confidence, Σ correct) for equal-width bins (lo, hi] (jit-able).

  A confidence of exactly 0 goes to the first bin. Sums are float32 per call; add the
  results of many calls in float64 on the host.

  Args:
    confidence: [...] in [0, 1]; correct, valid: bool [...].

  Returns:
    float32 [3, num_bins].
  """
  conf = jnp.clip(confidence.astype(jnp.float32).reshape(-1), 0.0, 1.0)
  ok = correct.reshape(-1).astype(jnp.float32)
  weight = valid.reshape(-1).astype(jnp.float32)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  sums = [jnp.zeros(num_bins, jnp.float32).at[bins].add(weight * x)
          for x in (jnp.ones_like(conf), conf, ok)]
  return jnp.stack(sums)


def calibration_errors(histogram: np.ndarray) -> dict[str, float]:
  """ECE = Σ_b (n_b / N) |acc_b − conf_b| and MCE = max over non-empty bins, from a
  `calibration_histogram` [3, bins]; nan when it is empty."""
  count, sum_conf, sum_ok = np.asarray(histogram, np.float64)
  filled = count > 0
  if not filled.any():
    return {"ece": float("nan"), "mce": float("nan")}
  gap = np.abs(sum_ok[filled] - sum_conf[filled]) / count[filled]
  return {"ece": float(np.sum(count[filled] * gap) / count.sum()), "mce": float(gap.max())}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               num_bins: int = 15) -> dict[str, float]:
  """ECE and MCE of arrays (confidence in [0, 1], correct bool), bins (lo, hi]."""
  confidence = jnp.asarray(confidence, jnp.float32)
  return calibration_errors(calibration_histogram(
      confidence, jnp.asarray(correct), jnp.ones(confidence.shape, bool), num_bins))


# ------------------------------------------------------------ detection from histograms

def _descending_counts(negatives: np.ndarray, positives: np.ndarray):
  """Cumulative counts of scores >= each bin's lower edge, from the top bin down."""
  neg = np.concatenate([[0], np.cumsum(np.asarray(negatives, np.float64)[::-1])])
  pos = np.concatenate([[0], np.cumsum(np.asarray(positives, np.float64)[::-1])])
  return neg, pos


def roc_curve_from_histograms(negatives: np.ndarray, positives: np.ndarray
                              ) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) [bins + 1] of "score >= threshold ⇒ positive" at every bin edge, high to low.

  negatives, positives: [bins] counts of each class per score bin (e.g. an uncertainty
  histogram's correct and incorrect rows for misclassification detection).
  """
  neg, pos = _descending_counts(negatives, positives)
  with np.errstate(invalid="ignore", divide="ignore"):
    return neg / neg[-1], pos / pos[-1]


def auroc_from_histograms(negatives: np.ndarray, positives: np.ndarray) -> float:
  """Area under the ROC curve; scores in one bin count as ties (half a pair each), which is
  the exact AUROC of the binned scores. nan when a class is empty."""
  fpr, tpr = roc_curve_from_histograms(negatives, positives)
  return float(np.trapezoid(tpr, fpr))


def average_precision_from_histograms(negatives: np.ndarray, positives: np.ndarray) -> float:
  """Average precision (area under the precision-recall curve, step-wise as scikit-learn's
  average_precision_score) of the binned scores; nan when there is no positive."""
  neg, pos = _descending_counts(negatives, positives)
  if pos[-1] == 0:
    return float("nan")
  recall = pos / pos[-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(pos + neg > 0, pos / (pos + neg), 1.0)
  return float(np.sum(np.diff(recall) * precision[1:]))


def fpr_at_tpr_from_histograms(negatives: np.ndarray, positives: np.ndarray,
                               tpr_level: float = 0.95) -> float:
  """The lowest false-positive rate at a bin edge whose true-positive rate is >= tpr_level."""
  fpr, tpr = roc_curve_from_histograms(negatives, positives)
  reached = tpr >= tpr_level
  return float(fpr[reached].min()) if reached.any() else float("nan")


def risk_coverage_from_histogram(histogram: np.ndarray) -> dict[str, np.ndarray | float]:
  """Selective prediction: keep the pixels with u below a threshold, at every bin edge.

  Args:
    histogram: [2, bins] (row 0 incorrect, row 1 correct).

  Returns:
    {"coverage": [bins + 1] fraction kept, "risk": [bins + 1] error rate of the kept
    pixels (nan where none is kept), "aurc": area under risk over coverage (trapezoid over
    the non-empty points; lower is better)}.
  """
  histogram = np.asarray(histogram, np.float64)
  below = np.concatenate([[[0], [0]], np.cumsum(histogram, axis=1)], axis=1)
  kept = below.sum(0)
  coverage = kept / kept[-1]
  with np.errstate(invalid="ignore", divide="ignore"):
    risk = np.where(kept > 0, below[0] / kept, np.nan)
  ok = kept > 0
  return {"coverage": coverage, "risk": risk,
          "aurc": float(np.trapezoid(risk[ok], coverage[ok])) if ok.sum() > 1 else float("nan")}
