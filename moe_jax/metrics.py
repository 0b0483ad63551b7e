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
