"""The boundary between the data pipelines (tf.data) and the library: config -> batches.

Every dataset question goes to `data_pipelines.registry.get(data.name)`; nothing here
depends on which dataset it is. Importing this module does not import TensorFlow: only
reading data does (`prepare`, `dataset`, `num_examples` and the batch iterators).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from data_pipelines import IGNORE_LABEL, DataError, corruptions, registry
from moe_jax import config_checks


def resolve_paths(data: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Replaces "{workdir}" in the data paths, in place."""
  for key in ("data_dir", "split_dir", "tfds_dir"):
    if key in data and data[key]:
      data[key] = data[key].replace("{workdir}", os.fspath(workdir))


def prepare(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Checks the data section, then prepares the dataset once (see data_pipelines.registry).

  Args:
    data: the config's `data` section with resolved paths.

  Returns:
    {split name: number of frames} for the splits the pipeline uses.

  Raises:
    DataError: with one line naming the path or key and the fix (ConfigError: a bad
      data.image_size).
  """
  entry = registry.get(data.name)
  config_checks.image_size(data.image_size)
  if not data.data_dir:
    raise DataError(f"config key data.data_dir is empty; set --config.data.data_dir=/path/to/"
                    f"{data.name}, or run the demo with --config configs/a2d2.py:synthetic.")
  return entry.prepare(data)


def dataset(data: ml_collections.ConfigDict, split: str, *, batch_size: int, train: bool,
            seed: int, start: int = 0, process: tuple[int, int] = (0, 1)):
  """Batches of `split` as a tf.data.Dataset (see data_pipelines.registry.Dataset.dataset).

  `start` is the index of the first frame (training skips to it; an evaluation pass numbers
  its frames from it); `process`: (index, count), this process's rows of each global batch
  of batch_size * count frames, counted from `start`.
  """
  several = {"process": process} if process[1] > 1 else {}
  return registry.get(data.name).dataset(data, split, batch_size=batch_size, train=train,
                                         seed=seed, start=start, **several)


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """Frames in `split`."""
  return registry.get(data.name).num_examples(data, split)


def split_parts(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """The disjoint splits a split is the union of (A2D2's all_* = highway_* + urban_*), else
  [split]; statistics of the parts sum to those of the whole."""
  return registry.get(data.name).split_parts(data, split)


def expert_names(data: ml_collections.ConfigDict) -> list[str]:
  """One name per expert: A2D2 domains ("highway", "urban"), Cityscapes "group<k>"."""
  return registry.get(data.name).expert_names(data)


def class_names(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The names of the C classes, in class-id order."""
  return registry.get(data.name).class_names(data)


def expert_split(data: ml_collections.ConfigDict, name: str, part: str) -> str:
  """The split expert `name` trains ("train") or validates ("val") on (Cityscapes' experts
  all validate on the whole validation split)."""
  return registry.get(data.name).expert_split(data, name, part)


def train_batches(data: ml_collections.ConfigDict, splits: Sequence[str], *, batch_size: int,
                  seeds: Sequence[int], start_step: int = 0,
                  process: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches, one stream per split, stacked on a leading member axis.

  Member k draws from `splits[k]` with `seeds[k]` (experts: one domain each; a deep
  ensemble: the same split with different seeds). Resuming at `start_step` continues
  each stream exactly where the uninterrupted run would be.

  Args:
    batch_size: B, the global batch.
    process: (index, count): this process reads and yields only its rows index * b ..
      (index + 1) * b of each global batch, b = B / count (`moe_jax.sharding.put_batch`
      assembles the global batch).

  Yields:
    {"image": uint8 [K, b, H, W, 3], "label": uint8 [K, b, H, W]}.
  """
  index, count = process
  streams = [dataset(data, split, batch_size=batch_size // count, train=True, seed=seed,
                     start=start_step * batch_size, process=process).as_numpy_iterator()
             for split, seed in zip(splits, seeds, strict=True)]
  for batches in zip(*streams):
    yield {key: np.stack([b[key] for b in batches]) for key in ("image", "label")}


def eval_batches(data: ml_collections.ConfigDict, split: str, *, batch_size: int,
                 frames_per_part: int = 0, corruption: tuple[str, int] | None = None,
                 process: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over `split` in batches of exactly `batch_size` (one compiled shape).

  The last batch is padded with black images labelled 255 (ignored by every metric).

  Args:
    data: the config's data section.
    split: a split name; a union split (all_test) is read part by part.
    batch_size: B.
    frames_per_part: read only the first n frames of each part (0 = all).
    corruption: (name, severity): every frame goes through
      `data_pipelines.corruptions.corrupt` at the model's input size, frame i of the pass
      seeded with i (deterministic).
    process: (index, count): yield only this process's rows index * b .. (index + 1) * b
      of each (padded) batch, b = batch_size / count; every process yields as many
      batches, and decodes only its own frames.

  Yields:
    {"image": uint8 [b, H, W, 3], "label": uint8 [b, H, W]}.
  """
  if batch_size % process[1]:
    raise ValueError(f"an evaluation batch of {batch_size} does not split over "
                     f"{process[1]} processes")
  parts = split_parts(data, split)
  sizes = [num_examples(data, part) for part in parts]
  sizes = [min(size, frames_per_part) if frames_per_part else size for size in sizes]
  frames = _frames(data, parts, sizes, batch_size, process)
  if corruption is not None:
    name, severity = corruption
    frames = ((i, corruptions.corrupt(image, name, severity, seed=i), label)
              for i, image, label in frames)
  rows = batch_size // process[1]
  h, w = data.image_size
  pending = next(frames, None)
  for k in range(-(-sum(sizes) // batch_size)):  # global batch k: frames k * B .. k * B + B - 1
    batch = {"image": np.zeros((rows, h, w, 3), np.uint8),  # padding: black, ignored
             "label": np.full((rows, h, w), IGNORE_LABEL, np.uint8)}
    row = 0
    while pending is not None and pending[0] // batch_size == k:
      _, batch["image"][row], batch["label"][row] = pending
      row, pending = row + 1, next(frames, None)
    yield batch


def _frames(data: ml_collections.ConfigDict, parts: Sequence[str], sizes: Sequence[int],
            batch_size: int, process: tuple[int, int]
            ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(i, image uint8 [H,W,3], label uint8 [H,W]) of this process's frames: the first
  sizes[j] frames of each part in order, i a frame's index in that whole pass, and a
  process's frames its rows of each global batch of `batch_size` (see `eval_batches`)."""
  index, count = process
  rows = batch_size // count
  start = 0
  for part, size in zip(parts, sizes, strict=True):
    mine = [i for i in range(start, start + size) if (i % batch_size) // rows == index]
    batches = dataset(data, part, batch_size=rows, train=False, seed=0,
                      start=start if count > 1 else 0, process=process).as_numpy_iterator()
    frames = ((image, label) for batch in batches
              for image, label in zip(batch["image"], batch["label"]))
    read = 0
    for i, (image, label) in zip(mine, frames):
      read += 1
      yield i, image, label
    if read < len(mine):
      raise DataError(f"split {part} of {data.data_dir} has fewer frames than the "
                      f"{num_examples(data, part)} its metadata counts; delete the prepared "
                      "TFDS files (config key data.tfds_dir) so the data stage writes them "
                      "again.")
    start += size


def workdir_path(workdir: str | os.PathLike) -> Path:
  """The workdir as a Path, created; DataError if it cannot be. A leading "~" the shell
  did not expand (as in --workdir=~/runs/x) is the home directory, never a folder named "~"."""
  path = Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create workdir {path} ({e.strerror}); pass a writable --workdir.")
  if not os.access(path, os.W_OK):
    raise DataError(f"workdir {path} is not writable; pass a writable --workdir.")
  return path
