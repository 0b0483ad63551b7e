"""Segmentation metrics from confusion matrices and histograms (mergeable by summing).

A confusion matrix or histogram is computed per batch on the device (jit-able) and summed
on the host in int64 / float64, so its memory does not depend on the number of images and
two partial results (devices, hosts, shards of a split) merge by addition. The
conventions and the exactness of each metric are in docs/metrics.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

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
  same float32 edges the thresholds use, so "certain" (u < t) at any edge t < 1 is exact.

  Args:
    uncertainty: normalised uncertainty in [0, 1], any shape.
    correct: bool, same shape (prediction == label).
    valid: bool, same shape (label != 255).

  Returns:
    int32 [2, num_bins]: row 0 incorrect, row 1 correct.
  """
  return _split_counts(_uncertainty_bins(uncertainty.reshape(-1), num_bins), correct, valid,
                       num_bins)


def _split_counts(bins: jax.Array, correct: jax.Array, valid: jax.Array,
                  num_bins: int) -> jax.Array:
  """int32 [2, num_bins] counts of the valid entries of int bins [N] (row 1 correct)."""
  index = jnp.where(valid.reshape(-1), correct.reshape(-1).astype(jnp.int32) * num_bins + bins,
                    2 * num_bins)
  return jnp.bincount(index, length=2 * num_bins + 1)[:-1].reshape(2, num_bins).astype(jnp.int32)


def _uncertainty_bins(uncertainty: jax.Array, num_bins: int) -> jax.Array:
  """int32 bin b of edges[b] <= u < edges[b + 1] (u clipped to [0, 1], u = 1 in the last)."""
  u = jnp.clip(uncertainty.astype(jnp.float32), 0.0, 1.0)
  return jnp.clip(edge_bins(u, num_bins, side="right") - 1, 0, num_bins - 1)


def edge_bins(values: jax.Array, num_bins: int, side: str) -> jax.Array:
  """`jnp.searchsorted(bin_edges(num_bins), values, side)` for float32 values in [0, 1],
  as int32, without a search: floor(v · num_bins) is within one of the answer (its
  rounding error is far below a bin), and one comparison with each neighbouring float32
  edge settles it. ~5x faster on XLA CPU than the search, whose loop runs ~log2(num_bins)
  gathers over every value.

  side "right": the number of edges <= v; "left": the number of edges < v. NaN counts as
  1 (the search puts it past the last edge: the same last bin once clipped).
  """
  values = jnp.nan_to_num(values, nan=1.0)
  edges = jnp.asarray(bin_edges(num_bins))
  guess = jnp.clip(jnp.floor(values * num_bins).astype(jnp.int32), 0, num_bins)  # edges[guess] ~ v
  below = edges[guess] <= values if side == "right" else edges[guess] < values
  after = jnp.minimum(guess + 1, num_bins)
  past = (edges[after] <= values if side == "right" else edges[after] < values) & (
      guess < num_bins)
  # guess + 1 edges are <= v when edges[guess] is, + 1 more when edges[guess + 1] is too.
  return (guess + below.astype(jnp.int32) + past.astype(jnp.int32)).astype(jnp.int32)


def _edge_indices(thresholds: np.ndarray, num_bins: int) -> np.ndarray:
  """Indices k of thresholds t = k / num_bins < 1; ValueError for one off the bin edges or
  for t = 1: the last bin holds u = 1 with the u just below it, so u < 1 is not countable
  (`conditional_correctness` takes t = 1)."""
  k = np.rint(np.asarray(thresholds, np.float64) * num_bins).astype(int)
  if not np.allclose(k / num_bins, thresholds) or np.any(k < 0) or np.any(k >= num_bins):
    raise ValueError(f"thresholds must lie on the {num_bins} histogram bin edges in [0, 1)")
  return k


def conditional_correctness_from_histogram(histogram: np.ndarray,
                                           thresholds: np.ndarray = REFERENCE_THRESHOLDS
                                           ) -> dict[str, np.ndarray]:
  """p(accurate|certain), p(uncertain|inaccurate), PAvPU at thresholds on the bin edges.

  "Certain" ⇔ u < t for every method (compared in float32), as in `conditional_correctness`;
  t = 1 is refused (see `_edge_indices`). PAvPU = (n_ac + n_iu) / N (Mukhoti & Gal);
  `pavpu_reference` = (n_ac + n_iu) / (n_c + n_i), the reference code's denominator, where
  n_c = certain and n_i = inaccurate pixels. A ratio with an empty denominator is nan.

  Args:
    histogram: [2, num_bins] counts (row 0 incorrect, row 1 correct), summed over images.
    thresholds: values k / num_bins in [0, 1).

  Returns:
    {name: float64 [T]} for p_accurate_given_certain, p_uncertain_given_inaccurate, pavpu,
    pavpu_reference, and the counts n_ac, n_ic, n_au, n_iu.
  """
  histogram = np.asarray(histogram, np.int64)
  k = _edge_indices(thresholds, histogram.shape[1])
  below = np.concatenate([[[0], [0]], np.cumsum(histogram, axis=1)], axis=1)  # [2, bins+1]
  n_ic, n_ac = below[0, k], below[1, k]
  n_iu, n_au = histogram[0].sum() - n_ic, histogram[1].sum() - n_ac
  return _ratios(n_ac, n_ic, n_au, n_iu)


def conditional_correctness(uncertainty: np.ndarray, correct: np.ndarray,
                            thresholds: np.ndarray = REFERENCE_THRESHOLDS
                            ) -> dict[str, np.ndarray]:
  """The same metrics straight from arrays (any thresholds): u [...], correct bool [...].

  Like the histograms, compares in float32 (the maps' dtype): certain ⇔ u < float32(t), so
  at t = 1 a pixel with u = 1 is uncertain.
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


def _patches(uncertainty: jax.Array, correct: jax.Array, valid: jax.Array, patch: int):
  """(mean uncertainty over valid pixels, accurate, has a valid pixel), each [B, H//p, W//p]."""
  b, h, w = uncertainty.shape
  h, w = h // patch * patch, w // patch * patch

  def block_sums(x):
    return x[:, :h, :w].reshape(b, h // patch, patch, w // patch, patch).sum((2, 4))

  valid = jnp.asarray(valid, bool)
  n_valid = block_sums(valid.astype(jnp.float32))
  n_correct = block_sums((valid & jnp.asarray(correct, bool)).astype(jnp.float32))
  sum_u = block_sums(jnp.where(valid, jnp.asarray(uncertainty, jnp.float32), 0.0))
  return sum_u / jnp.maximum(n_valid, 1.0), 2.0 * n_correct >= n_valid, n_valid > 0


def patch_uncertainty_histogram(uncertainty: jax.Array, correct: jax.Array, valid: jax.Array,
                                patch: int = 4, num_bins: int = NUM_BINS) -> jax.Array:
  """`uncertainty_histogram` of patches (Mukhoti & Gal's patch-based variant; jit-able).

  Non-overlapping patch × patch blocks; H and W are cropped down to multiples of `patch`
  (the last H % patch rows and W % patch columns are dropped). A patch is accurate if at
  least 50% of its valid pixels are correct, its uncertainty is the mean over its valid
  pixels, and a patch with no valid pixel is not counted. patch=1 is the pixel histogram.

  Args:
    uncertainty: [B, H, W] in [0, 1]; correct, valid: bool [B, H, W].
    patch: side of the square patches.

  Returns:
    int32 [2, num_bins] patch counts (row 0 inaccurate, row 1 accurate), the layout
    `conditional_correctness_from_histogram` reads.
  """
  return uncertainty_histogram(*_patches(uncertainty, correct, valid, patch), num_bins)


def patch_conditional_correctness(uncertainty: np.ndarray, correct: np.ndarray,
                                  thresholds: np.ndarray = REFERENCE_THRESHOLDS, patch: int = 4,
                                  valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """`conditional_correctness` of the patches of `patch_uncertainty_histogram` (any
  thresholds): uncertainty [B, H, W], correct and valid (default all) bool [B, H, W]."""
  valid = np.ones(np.shape(correct), bool) if valid is None else valid
  mean, accurate, counted = (np.asarray(x) for x in _patches(
      np.asarray(uncertainty), correct, valid, patch))
  return conditional_correctness(mean[counted], accurate[counted], thresholds)


PER_IMAGE_METRICS = ("p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu",
                     "pavpu_reference")


def per_image_sums(uncertainty: jax.Array, correct: jax.Array, valid: jax.Array,
                   thresholds: np.ndarray = REFERENCE_THRESHOLDS,
                   num_bins: int = NUM_BINS) -> jax.Array:
  """Sums over images of each image's conditional-correctness ratios (jit-able, mergeable).

  Each image's counts come from its own uncertainty histogram (one bincount [B, 2, bins]),
  so "certain" ⇔ u < t exactly as in `conditional_correctness_from_histogram`. A ratio
  with an empty denominator is left out of the sums and counts; an image with no valid
  pixel adds nothing. Reduce with `per_image_conditional_correctness`.

  Args:
    uncertainty: [B, H, W] in [0, 1]; correct, valid: bool [B, H, W].
    thresholds: [T] host values k / num_bins < 1 (static under jit).

  Returns:
    float32 [2, 4, T]: row 0 the sum over images of each of PER_IMAGE_METRICS where it is
    defined, row 1 the number of images where it is defined.
  """
  k = _edge_indices(thresholds, num_bins)
  b = uncertainty.shape[0]
  bins = _uncertainty_bins(uncertainty.reshape(b, -1), num_bins)
  row = jnp.arange(b)[:, None] * 2 + correct.reshape(b, -1).astype(jnp.int32)
  index = jnp.where(valid.reshape(b, -1), row * num_bins + bins, 2 * b * num_bins)
  histogram = jnp.bincount(index.reshape(-1), length=2 * b * num_bins + 1)[:-1]
  below = jnp.cumsum(histogram.reshape(b, 2, num_bins), axis=2)  # below[..., j]: bins <= j
  below = jnp.concatenate([jnp.zeros((b, 2, 1), below.dtype), below], axis=2)
  n_ic, n_ac = below[:, 0, k], below[:, 1, k]  # [B, T]
  n_i, n_a = (jnp.broadcast_to(below[:, r, -1:], n_ic.shape) for r in (0, 1))
  n_iu = n_i - n_ic
  numerator = jnp.stack([n_ac, n_iu, n_ac + n_iu, n_ac + n_iu], 1)  # [B, 4, T]
  denominator = jnp.stack([n_ac + n_ic, n_i, n_a + n_i, n_ac + 2 * n_ic + n_iu], 1)
  defined = denominator > 0
  ratio = jnp.where(defined, numerator / jnp.maximum(denominator, 1), 0.0)
  return jnp.stack([ratio.sum(0), defined.sum(0)]).astype(jnp.float32)


def per_image_conditional_correctness(sums: np.ndarray, undefined_as_zero: bool = True
                                      ) -> dict[str, np.ndarray]:
  """Mean over images of each image's ratios, from `per_image_sums` summed over batches.

  The reference (`calculate_metrics`) scores a ratio with an empty denominator (no certain
  pixel, no inaccurate pixel) as 0 and averages over all images: `undefined_as_zero=True`
  does the same over the images with a valid pixel. False averages each ratio over the
  images that define it (a nanmean). Unlike the reference, which takes every pixel, only
  valid pixels count and an image without one is skipped.

  Args:
    sums: [2, 4, T] (row 0 sums, row 1 counts of defining images).

  Returns:
    {name: float64 [T]} for PER_IMAGE_METRICS; nan where no image is averaged over.
  """
  total, defined = np.asarray(sums, np.float64)
  if undefined_as_zero:  # the M&G PAvPU is defined on every image with a valid pixel
    defined = np.broadcast_to(defined[PER_IMAGE_METRICS.index("pavpu")], total.shape)
  with np.errstate(invalid="ignore", divide="ignore"):
    return dict(zip(PER_IMAGE_METRICS, np.where(defined > 0, total / defined, np.nan)))


FINE_CALIBRATION_BINS = 1500  # 15 · 100: regroups exactly into 15 equal-width bins
CALIBRATION_BLOCK = 4096  # pixels per partial sum of the confidences (calibration_histogram)


def calibration_histogram(confidence: jax.Array, correct: jax.Array, valid: jax.Array,
                          num_bins: int = 15) -> jax.Array:
  """Per-bin (count, Σ confidence, Σ correct) for equal-width bins (lo, hi] (jit-able).

  Bin b holds edges[b] < conf <= edges[b + 1] against the float32 `bin_edges(num_bins)`;
  a confidence of exactly 0 goes to the first bin. The edges of num_bins are edges of any
  multiple of it, so a FINE_CALIBRATION_BINS histogram regroups exactly into 15 bins (see
  `calibration_errors`) and also serves `adaptive_calibration_errors`.

  The counts are integers (exact in float32 up to 2^24 per bin and call). Σ confidence is
  n_b · edges[b] + Σ (conf − edges[b]): each offset is exact (conf <= 2 edges[b] for b > 0)
  and below the bin width, and the offsets are summed per CALIBRATION_BLOCK pixels before
  the blocks' sums are added, so a sum over N pixels is off by at most about
  2^-24 (CALIBRATION_BLOCK + N / CALIBRATION_BLOCK) · N / num_bins (docs/metrics.md). Add
  the results of many calls in float64 on the host.

  Args:
    confidence: [...] in [0, 1]; correct, valid: bool [...].

  Returns:
    float32 [3, num_bins].
  """
  conf = jnp.clip(confidence.astype(jnp.float32).reshape(-1), 0.0, 1.0)
  valid = valid.reshape(-1)
  edges = jnp.asarray(bin_edges(num_bins))
  bins = jnp.clip(edge_bins(conf, num_bins, side="left") - 1, 0, num_bins - 1)
  counts = _split_counts(bins, correct, valid, num_bins).astype(jnp.float32)
  offset = jnp.where(valid, conf - edges[bins], 0.0)
  blocks = -(-conf.size // CALIBRATION_BLOCK)
  block = jnp.arange(conf.size) // CALIBRATION_BLOCK
  partial = jnp.bincount(block * num_bins + bins, weights=offset, length=blocks * num_bins)
  # The barrier keeps XLA from scattering the offsets straight onto n_b · edges[b] (with one
  # block it would), which rounds each offset at the scale of the bin's whole sum.
  offsets = jax.lax.optimization_barrier(partial.reshape(blocks, num_bins).sum(0))
  count = counts.sum(0)
  return jnp.stack([count, count * edges[:-1] + offsets, counts[1]])


def regroup_calibration(histogram: np.ndarray, num_bins: int) -> np.ndarray:
  """A `calibration_histogram` [3, bins] summed into num_bins equal-width bins (it must
  divide bins): float64 [3, num_bins]."""
  histogram = np.asarray(histogram, np.float64)
  if histogram.shape[1] % num_bins:
    raise ValueError(f"{histogram.shape[1]} bins do not regroup into {num_bins}")
  return histogram.reshape(3, num_bins, -1).sum(-1)


def calibration_errors(histogram: np.ndarray, num_bins: int | None = None) -> dict[str, float]:
  """ECE = Σ_b (n_b / N) |acc_b − conf_b| and MCE = max over non-empty bins, from a
  `calibration_histogram` [3, bins], first regrouped into num_bins equal-width bins when
  given (`regroup_calibration`); nan when it is empty."""
  if num_bins is not None:
    histogram = regroup_calibration(histogram, num_bins)
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


def adaptive_calibration_errors(histogram: np.ndarray, num_bins: int = 15) -> dict[str, float]:
  """Adaptive (equal-mass) ECE and MCE from a fine `calibration_histogram` [3, fine bins].

  Consecutive fine bins are grouped into num_bins groups of about N / num_bins pixels: a
  fine bin joins group ⌊num_bins · (pixels in lower bins) / N⌋, so a group boundary falls
  where the cumulative count crosses k · N / num_bins. ECE = Σ_groups |Σ correct − Σ conf| / N
  and MCE = the largest |acc − conf| of a group. This is exact up to the fine-bin
  granularity: each boundary is off from the exact sorted split by less than one fine bin's
  count m, so the ECE is within 2 (num_bins − 1) max m / N of the exact one (in practice far
  closer). nan when the histogram is empty.
  """
  count, sum_conf, sum_ok = np.asarray(histogram, np.float64)
  before = np.cumsum(count) - count
  group = np.minimum(num_bins * before // max(count.sum(), 1), num_bins - 1).astype(int)
  return calibration_errors(np.stack([np.bincount(group, weights=x, minlength=num_bins)
                                      for x in (count, sum_conf, sum_ok)]))


def adaptive_expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                                        num_bins: int = 15) -> dict[str, float]:
  """Exact adaptive ECE and MCE of arrays: sorted by confidence and split into num_bins
  groups of equal count (`np.array_split`; ties in any order)."""
  conf = np.asarray(confidence, np.float64).reshape(-1)
  ok = np.asarray(correct, np.float64).reshape(-1)
  groups = np.array_split(np.argsort(conf, kind="stable"), num_bins)
  return calibration_errors(np.array([[len(g), conf[g].sum(), ok[g].sum()] for g in groups]).T)


# ------------------------------------------------------------ detection from histograms

# The detection histogram's bins by score u (docs/metrics.md): u = 0; 0 < u < 2^MIN_EXPONENT;
# 2^MANTISSA_BITS bins per octave up to 2^LINEAR_EXPONENT (the float32's exponent and top
# mantissa bits: relative width <= 2^-8); from there up to 1, bins of width 2^-LINEAR_BITS
# (finer than the last log bins, 2^(LINEAR_EXPONENT - MANTISSA_BITS)); u = 1.
DETECTION_MANTISSA_BITS = 8
DETECTION_MIN_EXPONENT = -100
DETECTION_LINEAR_EXPONENT = -5
DETECTION_LINEAR_BITS = 14
_LOG_BINS = (DETECTION_LINEAR_EXPONENT - DETECTION_MIN_EXPONENT) << DETECTION_MANTISSA_BITS
_LINEAR_SCALE = 2 ** DETECTION_LINEAR_BITS  # 1 / bin width
_FIRST_LINEAR = 2 ** (DETECTION_LINEAR_BITS + DETECTION_LINEAR_EXPONENT)  # 2^LINEAR_EXPONENT
DETECTION_BINS = 2 + _LOG_BINS + (_LINEAR_SCALE - _FIRST_LINEAR) + 1  # 40195


def detection_histogram(score: jax.Array, correct: jax.Array, valid: jax.Array) -> jax.Array:
  """Counts of valid pixels per score bin of the detection layout, by correctness (jit-able).

  The bins (see DETECTION_BINS) have a relative width of at most 2^-8 down to 2^-100 and an
  absolute width of at most 2^-14, so AUROC, AUPR, FPR@95 and AURC of scores concentrated
  near 0 are close to those of the exact per-pixel scores (bounds in docs/metrics.md);
  scores that share a value share a bin, which the metrics count as ties. NaN counts as 1.

  Args:
    score: a score in [0, 1] (normalised uncertainty), any shape; clipped to [0, 1].
    correct: bool, same shape (prediction == label).
    valid: bool, same shape (label != 255).

  Returns:
    int32 [2, DETECTION_BINS] ordered by score: row 0 incorrect, row 1 correct (the layout
    of `uncertainty_histogram`, read by the `*_from_histograms` functions).
  """
  u = jnp.clip(jnp.nan_to_num(score.astype(jnp.float32).reshape(-1), nan=1.0), 0.0, 1.0)
  m = DETECTION_MANTISSA_BITS
  bits = jax.lax.bitcast_convert_type(u, jnp.int32)  # monotone in u for u >= 0
  log_bin = 2 + (bits >> (23 - m)) - ((127 + DETECTION_MIN_EXPONENT) << m)
  linear_bin = 2 + _LOG_BINS - _FIRST_LINEAR + jnp.floor(u * _LINEAR_SCALE).astype(jnp.int32)
  small_bin = (u > 0).astype(jnp.int32)  # 0: u = 0, 1: 0 < u < 2^MIN_EXPONENT
  bins = jnp.where(u >= 2.0 ** DETECTION_LINEAR_EXPONENT, linear_bin,
                   jnp.where(u >= 2.0 ** DETECTION_MIN_EXPONENT, log_bin, small_bin))
  return _split_counts(bins, correct, valid, DETECTION_BINS)


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

  AURC is the per-pixel one: with the N pixels sorted by u, the mean over k = 1..N of the
  error rate of the first k, averaged over every order of the pixels within a bin (ties).
  In that average the expected number of errors grows linearly through a bin, so a bin of
  n pixels, e of them incorrect, after K pixels with E errors adds
  Σ_{j=1..n} (E + j e / n) / (K + j) = e + (E − K e / n) (H(K + n) − H(K)) (H harmonic
  numbers). A constant score gives the error rate. Lower is better.

  Args:
    histogram: [2, bins] ordered by u (row 0 incorrect, row 1 correct).

  Returns:
    {"coverage": [bins + 1] fraction kept, "risk": [bins + 1] error rate of the kept
    pixels (nan where none is kept), "aurc": float (nan when the histogram is empty)}.
  """
  histogram = np.asarray(histogram, np.float64)
  below = np.concatenate([[[0], [0]], np.cumsum(histogram, axis=1)], axis=1)
  kept = below.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    coverage = kept / kept[-1]
    risk = np.where(kept > 0, below[0] / kept, np.nan)
  count = histogram.sum(0)
  filled = count > 0
  n, e = count[filled], histogram[0, filled]
  before, errors_before = kept[:-1][filled], below[0, :-1][filled]  # K, E
  harmonic = special.digamma(before + n + 1) - special.digamma(before + 1)  # H(K+n) − H(K)
  total = np.sum(e + (errors_before - before * e / n) * harmonic)
  return {"coverage": coverage, "risk": risk,
          "aurc": float(total / kept[-1]) if kept[-1] else float("nan")}
