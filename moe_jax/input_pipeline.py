"""The boundary between the data pipelines (tf.data) and the library: config -> batches."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from data_pipelines import DataError, a2d2, cityscapes, synthetic


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
            seed: int):
  """Batches of `split` as a tf.data.Dataset (see data_pipelines.a2d2.dataset)."""
  common = dict(image_size=tuple(data.image_size), batch_size=batch_size, train=train,
                seed=seed, tfds_dir=data.tfds_dir or None, shuffle_buffer=data.shuffle_buffer)
  if data.name == "a2d2":
    return a2d2.dataset(data.data_dir, split, split_dir=data.split_dir or None, **common)
  return cityscapes.dataset(data.data_dir, split, groups=data.groups, **common)


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
