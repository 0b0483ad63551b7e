"""Cityscapes (fine annotations) on tf.data through TFDS's `cityscapes/semantic_segmentation`.

The user downloads `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
https://www.cityscapes-dataset.com/downloads/ into one directory (`data_dir`); TFDS prepares
its shards from them once, offline, and every later call reads the shards. Labels are stored
as labelIds (0..33) and mapped to the 19 trainIds at stream time, so the prepared shards stay
the unmodified TFDS dataset.

Experts specialise on groups of training cities: `cityscapes_meta.expert_groups` splits the
18 training cities into groups, and each training example's "domain" is the index of its
city's group. The classes, cities and groups are in `cityscapes_meta`, which imports without
TensorFlow.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import IGNORE_LABEL, DataError, transforms
from data_pipelines.cityscapes_meta import NUM_CLASSES, city_splits, expert_groups

# labelIds of the 19 evaluated classes in trainId order (cityscapesScripts labels.py). Every
# other labelId, including license plate (-1, which a uint8 PNG cannot hold), is ignored.
_EVALUATED_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, np.uint8)
LABEL_ID_TO_TRAIN_ID[list(_EVALUATED_LABEL_IDS)] = np.arange(NUM_CLASSES)

_TFDS_NAME = "cityscapes/semantic_segmentation"
_ZIPS = {
    "leftImg8bit_trainvaltest.zip": "the left 8-bit images, 11 GB",
    "gtFine_trainvaltest.zip": "the fine annotations, 241 MB",
}
_DOWNLOAD_URL = "https://www.cityscapes-dataset.com/downloads/"


def train_ids(label: tf.Tensor) -> tf.Tensor:
  """Maps Cityscapes labelIds to trainIds.

  Args:
    label: uint8 [...] labelIds, e.g. a decoded `*_gtFine_labelIds.png`.

  Returns:
    uint8 [...] trainIds 0..18, or 255 for classes Cityscapes does not evaluate.
  """
  return tf.gather(tf.constant(LABEL_ID_TO_TRAIN_ID), tf.cast(label, tf.int32))


def cities(frame: tf.Tensor) -> tf.Tensor:
  """Returns the city of Cityscapes image ids: string [...] `city_seq_frame` -> string [...]."""
  return tf.strings.regex_replace(frame, "_.*", "")


def _check_manual_dir(data_dir: str) -> None:
  """Raises DataError unless `data_dir` holds both zips the TFDS builder prepares from."""
  if not tf.io.gfile.isdir(data_dir):
    raise DataError(f"{data_dir}: Cityscapes directory not found; create it and download "
                    f"{' and '.join(_ZIPS)} from {_DOWNLOAD_URL} into it")
  for name, contents in _ZIPS.items():
    path = os.path.join(data_dir, name)
    if not tf.io.gfile.exists(path):
      raise DataError(f"{path}: not found; download {name} ({contents}) from "
                      f"{_DOWNLOAD_URL} (free registration) into {data_dir}")


def prepare(data_dir: str | os.PathLike, *, tfds_dir: str | os.PathLike | None = None):
  """Prepares TFDS's Cityscapes shards from the zips once and returns the builder.

  `data_dir` is checked only while the shards are missing, so the zips may be deleted
  after preparation.
  """
  builder = tfds.builder(_TFDS_NAME, data_dir=None if tfds_dir is None else os.fspath(tfds_dir))
  if not builder.is_prepared():
    data_dir = os.fspath(data_dir)
    _check_manual_dir(data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=data_dir))
  return builder


def num_examples(data_dir: str | os.PathLike, split: str, *,
                 groups: int | Sequence[Sequence[str]] = 2,
                 named: Mapping[str, Sequence[str]] | None = None,
                 tfds_dir: str | os.PathLike | None = None) -> int:
  """Number of frames in a split (see `dataset` for the splits).

  A split of some cities reads its TFDS split's image ids once per process (no image is
  decoded) and is then remembered.
  """
  tfds_split, members = _split(split, groups, named)
  builder = prepare(data_dir, tfds_dir=tfds_dir)
  if members is None:
    return builder.info.splits[tfds_split].num_examples
  counts = _frames_per_city(os.fspath(builder.data_dir), tfds_split)
  return sum(counts.get(city, 0) for city in members)


def _split(split: str, groups, named) -> tuple[str, tuple[str, ...] | None]:
  """(TFDS split, cities or None) of `split`; DataError naming the known splits."""
  splits = city_splits(groups, named)
  if split not in splits:
    raise DataError(f"split {split!r} is unknown; use one of: {', '.join(splits)}; a split "
                    "of other cities goes in data.city_splits")
  return splits[split]


@functools.cache
def _frames_per_city(prepared_dir: str, tfds_split: str) -> dict[str, int]:
  """{city: frames} of one split of the prepared shards in `prepared_dir` (read once)."""
  builder = tfds.builder_from_directory(prepared_dir)
  ids = builder.as_dataset(split=tfds_split, decoders={
      "image_left": tfds.decode.SkipDecoding(), "segmentation_label": tfds.decode.SkipDecoding()})
  return dict(collections.Counter(
      city.decode() for city in ids.map(lambda r: cities(r["image_id"])).as_numpy_iterator()))


def dataset(data_dir: str | os.PathLike, split: str, *, image_size: Sequence[int] = (512, 1024),
            batch_size: int, train: bool, seed: int = 0,
            groups: int | Sequence[Sequence[str]] = 2,
            named: Mapping[str, Sequence[str]] | None = None,
            tfds_dir: str | os.PathLike | None = None, shuffle_buffer: int = 256, start: int = 0,
            drop_remainder: bool | None = None,
            process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
  """Cityscapes batches with trainId labels and the expert group of each city as domain.

  The first call for a `tfds_dir` prepares the TFDS shards from the zips in `data_dir`;
  later calls only read the shards, so `data_dir` is checked only while they are missing.

  Splits: "train", "validation", "test"; "group<k>_train" for k in 0..len(groups)-1 (the
  training frames of expert group k only); and the `named` city subsets
  (`cityscapes_meta.city_splits`).

  Args:
    data_dir: directory holding leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip.
    split: see above.
    image_size: (height, width) of the output; the originals are 1024x2048.
    batch_size: images per batch.
    train: shuffle, repeat forever and flip (see `transforms.stream`).
    seed: seed for file order, shuffling and flips; the same seed gives the same batches.
    groups: expert groups, see `expert_groups`.
    named: {split: cities}, more splits of some cities each (`data.city_splits`).
    tfds_dir: where TFDS writes its prepared shards; None is TFDS's default
      (~/tensorflow_datasets or $TFDS_DATA_DIR).
    shuffle_buffer: examples in the shuffle buffer. An example is ~2.2 MB of PNG bytes
      (11 GB / 5000 frames), so the default holds ~0.6 GB.
    start: the index of the first frame: training skips to it (resume); an evaluation pass
      numbers its frames from it (for `process`).
    drop_remainder: override the default (True for training, False otherwise).
    process: this process's rows of each global batch (`transforms.stream`).

  Returns:
    Dataset of {"image": uint8 [B,H,W,3], "label": uint8 [B,H,W] trainIds or 255,
    "domain": int32 [B] group index of the city or -1, "frame": string [B] image id such as
    "aachen_000000_000019"}.

  Raises:
    DataError: unknown split, bad groups or named splits, or (when preparing) a missing
      directory or zip.
  """
  groups = expert_groups(groups)
  tfds_split, members = _split(split, groups, named)

  builder = prepare(data_dir, tfds_dir=tfds_dir)
  # Undecoded PNGs keep the shuffle buffer small; `transforms.stream` decodes in parallel.
  records = builder.as_dataset(
      split=tfds_split, shuffle_files=train, read_config=transforms.read_config(seed, train),
      decoders={"image_left": tfds.decode.SkipDecoding(),
                "segmentation_label": tfds.decode.SkipDecoding()})

  city_group = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          [city for group in groups for city in group],
          [k for k, group in enumerate(groups) for _ in group], tf.string, tf.int32),
      default_value=-1)
  examples = records.map(lambda record: {
      "image": record["image_left"], "label": record["segmentation_label"],
      "domain": city_group.lookup(cities(record["image_id"])), "frame": record["image_id"]})
  if members is not None:
    size = num_examples(data_dir, split, groups=groups, named=named, tfds_dir=tfds_dir)
    wanted = tf.constant(members)
    examples = examples.filter(
        lambda example: tf.reduce_any(cities(example["frame"]) == wanted)).apply(
        tf.data.experimental.assert_cardinality(size))
  return transforms.stream(examples, image_size=image_size, batch_size=batch_size, train=train,
                           seed=seed, shuffle_buffer=shuffle_buffer, start=start,
                           drop_remainder=drop_remainder, label_map=train_ids,
                           process=process)
