"""Cityscapes' classes, cities, expert groups and splits, and its `registry` entry, without
TensorFlow.

Importing this module costs numpy and the standard library only. The entry's functions that
read data (`prepare`, `num_examples`, `dataset`) import the tf.data pipeline,
`data_pipelines.cityscapes`, on their first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from data_pipelines import DataError

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf

NUM_CLASSES = 19
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

TRAIN_CITIES = (
    "aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg",
    "hanover", "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen",
    "ulm", "weimar", "zurich",
)
VAL_CITIES = ("frankfurt", "lindau", "munster")
TEST_CITIES = ("berlin", "bielefeld", "bonn", "leverkusen", "mainz", "munich")
# TFDS's splits and the cities the official download puts in each.
OFFICIAL_CITIES = {"train": TRAIN_CITIES, "validation": VAL_CITIES, "test": TEST_CITIES}


def expert_groups(groups: int | Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
  """Groups the 18 training cities for the experts.

  An int N (1..18) sorts the cities alphabetically (the order of `TRAIN_CITIES`) and cuts them
  into N contiguous groups whose sizes differ by at most one, larger groups first
  (`numpy.array_split`): N=4 gives sizes 5, 5, 4, 4. The result depends on N alone.

  Explicit groups are returned as given after validation: every name must be a training city,
  no city may appear twice and no group may be empty. Cities left out of every group belong
  to no expert (domain -1).

  Args:
    groups: N, or a sequence of groups, each a sequence of city names.

  Returns:
    One tuple of city names per group.

  Raises:
    DataError: N out of range, or an unknown, repeated or missing city in explicit groups.
  """
  if isinstance(groups, (int, np.integer)):
    if not 1 <= groups <= len(TRAIN_CITIES):
      raise DataError(f"groups={groups}: the number of expert groups must be in "
                      f"1..{len(TRAIN_CITIES)}, or pass explicit groups of city names")
    return tuple(tuple(str(city) for city in part)
                 for part in np.array_split(TRAIN_CITIES, groups))
  if not groups:
    raise DataError("groups: no expert groups given; pass an int in 1..18 or a non-empty "
                    "sequence of groups of training cities")
  seen = set()
  for k, group in enumerate(groups):
    # A bare string is a sequence of letters, which would otherwise read as unknown cities.
    if isinstance(group, str) or not group:
      raise DataError(f"groups[{k}]={group!r}: each expert group must be a non-empty sequence "
                      "of city names, e.g. ('aachen', 'bochum')")
    for city in group:
      if city not in TRAIN_CITIES:
        raise DataError(f"groups[{k}]: {city!r} is not a Cityscapes training city; use names "
                        f"from: {', '.join(TRAIN_CITIES)}")
      if city in seen:
        raise DataError(f"groups[{k}]: {city!r} is already in an earlier group; put each "
                        "city in at most one expert group")
      seen.add(city)
  return tuple(tuple(group) for group in groups)


def city_splits(groups: int | Sequence[Sequence[str]],
                named: Mapping[str, Sequence[str]] | None = None
                ) -> dict[str, tuple[str, tuple[str, ...] | None]]:
  """Every split a config can name: {split: (TFDS split it reads, its cities or None = all)}.

  TFDS's "train", "validation" and "test"; "group<k>_train", the training cities of expert
  group k (`expert_groups`); and the `named` ones (`data.city_splits`), each a subset of the
  cities of one official split, e.g. {"ood_test": ("leverkusen", "mainz", "munich")}.

  Raises:
    DataError: bad groups; a named split that reuses a split's name, is empty, or names an
      unknown city or cities of two official splits.
  """
  splits = {name: (name, None) for name in OFFICIAL_CITIES}
  splits.update({f"group{k}_train": ("train", group)
                 for k, group in enumerate(expert_groups(groups))})
  for name, cities in (named or {}).items():
    key = f"data.city_splits.{name}"
    if name in splits:
      raise DataError(f"config key {key}: {name!r} is already a split; choose another name")
    if isinstance(cities, str) or not cities:
      raise DataError(f"config key {key}={cities!r}: give a non-empty tuple of city names")
    official = {split for split, members in OFFICIAL_CITIES.items()
                for city in cities if city in members}
    unknown = [city for city in cities
               if not any(city in members for members in OFFICIAL_CITIES.values())]
    if unknown or len(official) != 1:
      raise DataError(f"config key {key}: " + (
          f"{unknown[0]!r} is not a Cityscapes city" if unknown else
          f"its cities come from the {' and '.join(sorted(official))} splits") +
          "; name cities of one split: " + "; ".join(
              f"{split}: {', '.join(members)}" for split, members in OFFICIAL_CITIES.items()))
    splits[name] = (official.pop(), tuple(cities))
  return splits


# ----------------------------------------------------------------------------- registry entry


def _named_splits(data: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """`data.city_splits` as a plain dict ({} when the config has none)."""
  named = data.get("city_splits")
  return {} if named is None else {name: tuple(cities) for name, cities in named.items()}


def prepare(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Checks `data.groups` and `data.city_splits`, writes the synthetic cities' zips if
  `data.synthetic` is set, then prepares TFDS's shards from the zips once.

  Returns:
    {split: frames} of every split the config can name (`city_splits`).
  """
  from data_pipelines import cityscapes
  splits = city_splits(data.groups, _named_splits(data))  # before the long preparation
  if data.get("synthetic") is not None:
    from data_pipelines import synthetic_cities
    synthetic_cities.generate(data.data_dir, **data.synthetic.to_dict())
  cityscapes.prepare(data.data_dir, tfds_dir=data.tfds_dir or None)
  return {split: num_examples(data, split) for split in splits}


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """Frames in `split` (any of `city_splits`)."""
  from data_pipelines import cityscapes
  return cityscapes.num_examples(data.data_dir, split, groups=data.groups,
                                 named=_named_splits(data), tfds_dir=data.tfds_dir or None)


def dataset(data: ml_collections.ConfigDict, split: str, *, batch_size: int, train: bool,
            seed: int, start: int = 0, process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
  """Batches of `split` (see `data_pipelines.cityscapes.dataset`)."""
  from data_pipelines import cityscapes
  return cityscapes.dataset(data.data_dir, split, image_size=tuple(data.image_size),
                            batch_size=batch_size, train=train, seed=seed, groups=data.groups,
                            named=_named_splits(data), tfds_dir=data.tfds_dir or None,
                            shuffle_buffer=data.shuffle_buffer, start=start,
                            process=process)


def class_names(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The 19 evaluated classes, in trainId order."""
  del data
  return CLASS_NAMES


def expert_names(data: ml_collections.ConfigDict) -> list[str]:
  """One name per city group of `data.groups`: "group0", "group1", ..."""
  return [f"group{k}" for k in range(len(expert_groups(data.groups)))]


def expert_split(data: ml_collections.ConfigDict, name: str, part: str) -> str:
  """The split expert `name` trains on ("<name>_train") or validates on: the whole
  `data.val_split`, as no validation city belongs to a group."""
  return data.val_split if part == "val" else f"{name}_{part}"


def split_parts(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """[split]: Cityscapes has no union splits."""
  del data
  return [split]
