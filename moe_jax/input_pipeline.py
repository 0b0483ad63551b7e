"""The boundary between the data pipelines (tf.data) and the library: config -> batches."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from data_pipelines import DataError, a2d2, cityscapes, corruptions, synthetic
from data_pipelines.transforms import IGNORE_LABEL


def resolve_paths(data: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Replaces "{workdir}" in the data paths, in place."""
  for key in ("data_dir", "split_dir", "tfds_dir"):
    if key in data and data[key]:
      data[key] = data[key].replace("{workdir}", os.fspath(workdir))


def prepare(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Generates synthetic data if asked, writes the TFDS shards once, counts the frames.

  Args:
    data: the config's `data` section with resolved paths.

  Returns:
    {split name: number of frames} for the splits the pipeline uses.

  Raises:
    DataError: with one line naming the path or key and the fix.
  """
  size = tuple(data.image_size)
  if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
    raise DataError(f"config key data.image_size={size!r} must be two positive ints "
                    "(height, width), e.g. --config.data.image_size='(96,160)'.")
  if size[0] % 16 or size[1] % 16:
    raise DataError(f"config key data.image_size={size!r} must be multiples of 16 (the "
                    "backbone's output stride), e.g. --config.data.image_size='(96,160)'.")
  if not data.data_dir:
    raise DataError(f"config key data.data_dir is empty; set --config.data.data_dir=/path/to/"
                    f"{data.name}, or run the demo with --config configs/a2d2.py:synthetic.")
  if data.name == "a2d2":
    if data.synthetic is not None:
      synthetic.generate(data.data_dir, **data.synthetic.to_dict())
    builder = a2d2.prepare(data.data_dir, split_dir=data.split_dir or None,
                           tfds_dir=data.tfds_dir or None)
    splits = [f"{e}_train" for e in data.experts] + ["all_train", data.val_split,
                                                     *data.test_splits]
    return {s: a2d2.num_examples(s, builder) for s in dict.fromkeys(splits)}
  if data.name == "cityscapes":
    cityscapes.expert_groups(data.groups)  # validates before the long preparation
    builder = cityscapes.prepare(data.data_dir, tfds_dir=data.tfds_dir or None)
    return {name: split.num_examples for name, split in builder.info.splits.items()}
  raise DataError(f"config key data.name={data.name!r} is unknown; use 'a2d2' or 'cityscapes'.")


def dataset(data: ml_collections.ConfigDict, split: str, *, batch_size: int, train: bool,
            seed: int, start: int = 0):
  """Batches of `split` as a tf.data.Dataset (see data_pipelines.a2d2.dataset).

  `start` (training only) is the index of the first frame of the endless stream.
  """
  common = dict(image_size=tuple(data.image_size), batch_size=batch_size, train=train,
                seed=seed, tfds_dir=data.tfds_dir or None, shuffle_buffer=data.shuffle_buffer,
                start=start)
  if data.name == "a2d2":
    return a2d2.dataset(data.data_dir, split, split_dir=data.split_dir or None, **common)
  return cityscapes.dataset(data.data_dir, split, groups=data.groups, **common)


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """Frames in `split`."""
  if data.name == "a2d2":
    builder = a2d2.prepare(data.data_dir, split_dir=data.split_dir or None,
                           tfds_dir=data.tfds_dir or None)
    return a2d2.num_examples(split, builder)
  return cityscapes.num_examples(data.data_dir, split, groups=data.groups,
                                 tfds_dir=data.tfds_dir or None)


def split_parts(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """The disjoint splits a split is the union of (A2D2's all_* = highway_* + urban_*), else
  [split]; statistics of the parts sum to those of the whole."""
  if data.name == "a2d2" and split in a2d2.COMBINED_SPLITS:
    return a2d2.COMBINED_SPLITS[split].split("+")
  return [split]


def expert_names(data: ml_collections.ConfigDict) -> list[str]:
  """One name per expert: A2D2 domains ("highway", "urban"), Cityscapes "group<k>"."""
  if data.name == "a2d2":
    return list(data.experts)
  return [f"group{k}" for k in range(len(cityscapes.expert_groups(data.groups)))]


def class_names(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The names of the C classes, in class-id order."""
  return a2d2.CLASS_NAMES if data.name == "a2d2" else cityscapes.CLASS_NAMES


def expert_split(data: ml_collections.ConfigDict, name: str, part: str) -> str:
  """The split expert `name` trains ("train") or validates ("val") on.

  Cityscapes has no per-group validation cities, so every expert validates on the whole
  validation split.
  """
  if part == "val" and data.name == "cityscapes":
    return data.val_split
  return f"{name}_{part}"


def train_batches(data: ml_collections.ConfigDict, splits: Sequence[str], *, batch_size: int,
                  seeds: Sequence[int], start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches, one stream per split, stacked on a leading member axis.

  Member k draws from `splits[k]` with `seeds[k]` (experts: one domain each; a deep
  ensemble: the same split with different seeds). Resuming at `start_step` continues
  each stream exactly where the uninterrupted run would be.

  Yields:
    {"image": uint8 [K, B, H, W, 3], "label": uint8 [K, B, H, W]}.
  """
  streams = [dataset(data, split, batch_size=batch_size, train=True, seed=seed,
                     start=start_step * batch_size).as_numpy_iterator()
             for split, seed in zip(splits, seeds, strict=True)]
  for batches in zip(*streams):
    yield {key: np.stack([b[key] for b in batches]) for key in ("image", "label")}


def eval_batches(data: ml_collections.ConfigDict, split: str, *, batch_size: int,
                 frames_per_part: int = 0, corruption: tuple[str, int] | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
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

  Yields:
    {"image": uint8 [B, H, W, 3], "label": uint8 [B, H, W]}.
  """
  frames = _frames(data, split, frames_per_part, batch_size)
  if corruption is not None:
    name, severity = corruption
    frames = ((corruptions.corrupt(image, name, severity, seed=i), label)
              for i, (image, label) in enumerate(frames))
  while chunk := list(itertools.islice(frames, batch_size)):
    images, labels = (np.stack(column) for column in zip(*chunk))
    pad = batch_size - len(chunk)
    yield {"image": np.pad(images, [(0, pad), (0, 0), (0, 0), (0, 0)]),
           "label": np.pad(labels, [(0, pad), (0, 0), (0, 0)], constant_values=IGNORE_LABEL)}


def _frames(data: ml_collections.ConfigDict, split: str, frames_per_part: int,
            read_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(image uint8 [H,W,3], label uint8 [H,W]) of each part of `split` in order, at most
  `frames_per_part` of each (0 = all)."""
  for part in split_parts(data, split):
    batches = dataset(data, part, batch_size=read_size, train=False, seed=0).as_numpy_iterator()
    frames = ((image, label) for batch in batches
              for image, label in zip(batch["image"], batch["label"]))
    yield from itertools.islice(frames, frames_per_part or None)


def workdir_path(workdir: str | os.PathLike) -> Path:
  """The workdir as a Path, created; DataError if it cannot be."""
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"cannot create workdir {path} ({e.strerror}); pass a writable --workdir.")
  if not os.access(path, os.W_OK):
    raise DataError(f"workdir {path} is not writable; pass a writable --workdir.")
  return path
