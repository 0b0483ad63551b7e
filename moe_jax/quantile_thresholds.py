"""Conditional-correctness metrics at each measure's own quantiles of uncertainty.

`metrics.conditional_correctness_from_histogram` reports Mukhoti & Gal's
p(accurate|certain), p(uncertain|inaccurate) and PAvPU at fixed thresholds t
(`metrics.REFERENCE_THRESHOLDS`). Measures with different ranges are not comparable there:
a mutual information whose normalised values all lie in [0, 0.19] calls every pixel
certain at t = 0.49, so p(uncertain|inaccurate) = 0. Here t is a quantile of the
measure's own uncertainty over the split (e.g. its median), read from the same
`metrics.uncertainty_histogram` ([2, num_bins], row 0 incorrect, row 1 correct, bin b
holding edges[b] <= u < edges[b + 1] and u = 1 in the last bin), so the result still
merges by summing histograms.

Conventions:
  - t is always a bin edge k / num_bins with 0 <= k < num_bins, so every count, and
    therefore every ratio, is exact at t (the histogram's bins are compared against the
    same float32 edges).
  - "Certain" <=> u < t, strictly, in float32, as in
    `metrics.conditional_correctness_from_histogram` (which computes the ratios here).
  - The quantile is numpy's default (method="linear") over the pooled valid pixels,
    correct and incorrect together, and t is within one bin width 1 / num_bins of it
    (see `quantile_from_histogram`).
"""

from __future__ import annotations

import numpy as np

from moe_jax import metrics


def _check_quantiles(q) -> np.ndarray:
  """float64 array of q; ValueError unless every q is in [0, 1] (nan included)."""
  q = np.asarray(q, np.float64)
  if not np.all((q >= 0.0) & (q <= 1.0)):
    raise ValueError(f"quantiles must lie in [0, 1], got {q.tolist()}")
  return q


def _pooled_counts(histogram: np.ndarray) -> np.ndarray:
  """int64 [num_bins] counts of a [2, num_bins] (or pooled [num_bins]) histogram."""
  histogram = np.asarray(histogram)
  if histogram.ndim not in (1, 2) or histogram.shape[-1] == 0:
    raise ValueError(f"expected a [2, num_bins] or [num_bins] histogram, got shape "
                     f"{histogram.shape}")
  return histogram.reshape(-1, histogram.shape[-1]).astype(np.int64).sum(0)


def _quantile_edges(counts: np.ndarray, q: np.ndarray) -> np.ndarray:
  """int64 edge indices k (shape of q) of `quantile_from_histogram`; counts.sum() > 0."""
  num_bins = counts.shape[0]
  n = int(counts.sum())
  cumulative = np.cumsum(counts)  # [bins]: pixels in bins <= b
  below = np.concatenate([[0], cumulative])  # [bins + 1]: pixels with u < edges[k]
  # np.quantile(method="linear"): position q (n - 1) between order statistics i and i + 1.
  position = q * (n - 1)
  i = np.floor(position)
  fraction = position - i
  i = i.astype(np.int64)
  # The bin of the j-th smallest value (0-based): the first b with cumulative[b] > j.
  bin_lo = np.searchsorted(cumulative, i, side="right")
  bin_hi = np.searchsorted(cumulative, np.minimum(i + 1, n - 1), side="right")
  # Each order statistic lies in [b, b + 1] / num_bins, so the quantile lies in
  # [x, x + 1] / num_bins; any integer k in [x, x + 1] is within one bin of it.
  x = (1.0 - fraction) * bin_lo + fraction * bin_hi
  k_lo = np.ceil(x).astype(np.int64)  # <= num_bins - 1, as x is
  # k_hi = k_lo unless x is an integer; x = num_bins - 1 would give k_hi = num_bins (t = 1).
  k_hi = np.minimum(np.floor(x + 1.0).astype(np.int64), num_bins - 1)
  closer_hi = np.abs(below[k_hi] / n - q) < np.abs(below[k_lo] / n - q)
  return np.where(closer_hi, k_hi, k_lo)


def quantile_from_histogram(histogram: np.ndarray, q: float | np.ndarray
                            ) -> float | np.ndarray:
  """The bin edge t nearest the q-quantile of the uncertainty of a histogram's pixels.

  The pixels are pooled over the histogram's rows (correct and incorrect). Guarantee: with
  B = num_bins and u the valid pixels' normalised uncertainty (in [0, 1], the values the
  histogram bins; it clips u to [0, 1] and counts nan as 1),

    |t - np.quantile(u, q)| <= 1 / B   (up to the float32 rounding of the edges, < 1e-7).

  np.quantile interpolates between the order statistics i = floor(q (N - 1)) and i + 1,
  and the histogram gives the bin of each, hence an interval [x, x + 1] / B of width one
  bin holding the quantile. t = k / B for an integer k in [x, x + 1], 0 <= k < B (t = 1 is
  never needed, since x <= B - 1). When there are two such k (x an integer, e.g. both
  order statistics in bin x), t is the one whose fraction of pixels with u < t is closer to
  q (the lower one on a tie).

  An edge chosen only to bring the fraction below t closest to q may be far from the
  quantile: half the pixels at u = 0 and half at 0.9 give fraction 0.5 at every t in
  (0, 0.9], while np.quantile(u, 0.5) = 0.45 (and t = 0.45 here). Ties are never split,
  so the fraction of pixels below t can be far from q when many pixels share the
  quantile's value (e.g. t = 0 at q = 0.1 for a map that is 0 on 40% of its pixels).

  Args:
    histogram: int [2, num_bins] counts of `metrics.uncertainty_histogram` (row 0
      incorrect, row 1 correct), summed over images, or their pooled sum [num_bins].
    q: quantile in [0, 1], a float or an array of any shape.

  Returns:
    t = k / num_bins as a float for a scalar q, else float64 with the shape of q; nan when
    the histogram holds no pixel.

  Raises:
    ValueError: a q outside [0, 1] (or nan), or a histogram of another rank.
  """
  q_array = _check_quantiles(q)
  counts = _pooled_counts(histogram)
  if counts.sum() == 0:
    t = np.full(q_array.shape, np.nan)
  else:
    t = _quantile_edges(counts, q_array) / counts.shape[0]
  return float(t) if t.ndim == 0 else t


def conditional_correctness_at_quantiles(histogram: np.ndarray,
                                         quantiles: tuple[float, ...] | np.ndarray = (0.5,)
                                         ) -> dict[str, np.ndarray]:
  """p(accurate|certain), p(uncertain|inaccurate), PAvPU at quantiles of the uncertainty.

  Each threshold is `quantile_from_histogram(histogram, q)`, a bin edge k / num_bins < 1,
  at which `metrics.conditional_correctness_from_histogram` is exact: "certain" <=> u < t
  (strict, float32). At q = 0 no pixel is certain (p(accurate|certain) is nan); at q = 1
  t is the edge at or just above the largest u, and below 1.

  Args:
    histogram: int [2, num_bins] counts of `metrics.uncertainty_histogram` (row 0
      incorrect, row 1 correct), summed over images.
    quantiles: [Q] values in [0, 1].

  Returns:
    {name: float64 [Q]}: "quantiles", "thresholds", and from
    `conditional_correctness_from_histogram` at those thresholds
    "p_accurate_given_certain", "p_uncertain_given_inaccurate", "pavpu",
    "pavpu_reference" and the counts "n_ac", "n_ic", "n_au", "n_iu". An empty histogram
    gives nan thresholds and ratios (and zero counts).

  Raises:
    ValueError: a quantile outside [0, 1] (or nan), or a histogram not [2, num_bins].
  """
  histogram = np.asarray(histogram)
  if histogram.ndim != 2 or histogram.shape[0] != 2:
    raise ValueError(f"expected a [2, num_bins] histogram, got shape {histogram.shape}")
  q = _check_quantiles(quantiles).reshape(-1)
  thresholds = np.asarray(quantile_from_histogram(histogram, q), np.float64).reshape(-1)
  # An empty histogram: every ratio has an empty denominator (nan) at any edge, so read
  # the (zero) counts at t = 0 and report the thresholds as nan.
  result = metrics.conditional_correctness_from_histogram(
      histogram, np.where(np.isnan(thresholds), 0.0, thresholds))
  return {"quantiles": q, "thresholds": thresholds, **result}
