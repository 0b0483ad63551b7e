"""A2D2's classes, domains and splits, and its `registry` entry, without TensorFlow.

Importing this module costs numpy and the standard library only. The entry's functions that
read data (`prepare`, `num_examples`, `dataset`) import the tf.data pipeline,
`data_pipelines.a2d2`, on their first call. The synthetic scenes are A2D2 with
`data.synthetic` set: `prepare` generates them first.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf

CLASS_NAMES = (
    "Car", "Bicycle", "Pedestrian", "Truck", "Small vehicles", "Traffic signal",
    "Traffic sign", "Utility vehicle", "Sidebars", "Speed bumper", "Curbstone", "Solid line",
    "Irrelevant signs", "Road blocks", "Tractor", "Non-drivable street", "Zebra crossing",
    "Obstacles / trash", "Poles", "RD restricted area", "Animals", "Grid structure",
    "Signal corpus", "Drivable cobblestone", "Electronic traffic", "Slow drive area",
    "Nature object", "Parking area", "Sidewalk", "Ego car", "Painted driv. instr.",
    "Traffic guide obj.", "Dashed line", "RD normal street", "Sky", "Buildings",
    "Blurred area", "Rain dirt",
)
NUM_CLASSES = len(CLASS_NAMES)

# The class_list.json of the A2D2 release: 55 colours, 38 classes once the instance
# number is dropped. The raw data carries its own copy; this one writes synthetic trees.
REFERENCE_CLASS_LIST = {
    "#ff0000": "Car 1", "#c80000": "Car 2", "#960000": "Car 3", "#800000": "Car 4",
    "#b65906": "Bicycle 1", "#963204": "Bicycle 2", "#5a1e01": "Bicycle 3",
    "#5a1e1e": "Bicycle 4", "#cc99ff": "Pedestrian 1", "#bd499b": "Pedestrian 2",
    "#ef59bf": "Pedestrian 3", "#ff8000": "Truck 1", "#c88000": "Truck 2",
    "#968000": "Truck 3", "#00ff00": "Small vehicles 1", "#00c800": "Small vehicles 2",
    "#009600": "Small vehicles 3", "#0080ff": "Traffic signal 1",
    "#1e1c9e": "Traffic signal 2", "#3c1c64": "Traffic signal 3",
    "#00ffff": "Traffic sign 1", "#1edcdc": "Traffic sign 2", "#3c9dc7": "Traffic sign 3",
    "#ffff00": "Utility vehicle 1", "#ffffc8": "Utility vehicle 2", "#e96400": "Sidebars",
    "#6e6e00": "Speed bumper", "#808000": "Curbstone", "#ffc125": "Solid line",
    "#400040": "Irrelevant signs", "#b97a57": "Road blocks", "#000064": "Tractor",
    "#8b636c": "Non-drivable street", "#d23273": "Zebra crossing",
    "#ff0080": "Obstacles / trash", "#fff68f": "Poles", "#960096": "RD restricted area",
    "#ccff99": "Animals", "#eea2ad": "Grid structure", "#212cb1": "Signal corpus",
    "#b432b4": "Drivable cobblestone", "#ff46b9": "Electronic traffic",
    "#eee9bf": "Slow drive area", "#93fdc2": "Nature object", "#9696c8": "Parking area",
    "#b496c8": "Sidewalk", "#48d1cc": "Ego car", "#c87dd2": "Painted driv. instr.",
    "#9f79ee": "Traffic guide obj.", "#8000ff": "Dashed line", "#ff00ff": "RD normal street",
    "#87ceff": "Sky", "#f1e6ff": "Buildings", "#60458f": "Blurred area",
    "#352e52": "Rain dirt",
}

# Domain ids: experts are trained on 0 (highway) and 1 (urban); 2 (ambiguous) is OOD.
DOMAINS = ("highway", "urban", "ambiguous")
# The reference's "all" splits are highway followed by urban.
COMBINED_SPLITS = {f"all_{part}": f"highway_{part}+urban_{part}"
                   for part in ("train", "val", "test")}


def class_id(name: str) -> int:
  """Class id of a class_list.json name: "Car 3" -> 0, "Sky" -> 34 (instance number dropped)."""
  base = re.sub(r"\s+\d+$", "", name.strip())
  return CLASS_NAMES.index(base)


# ----------------------------------------------------------------------------- registry entry


def prepare(data: ml_collections.ConfigDict) -> dict[str, int]:
  """Generates the synthetic tree if `data.synthetic` is set, writes the TFDS shards once.

  Returns:
    {split: frames} of the experts' training splits, all_train, the validation split and
    the test splits.
  """
  from data_pipelines import a2d2, synthetic
  if data.synthetic is not None:
    synthetic.generate(data.data_dir, **data.synthetic.to_dict())
  builder = _builder(data)
  splits = [expert_split(data, name, "train") for name in expert_names(data)]
  splits += ["all_train", data.val_split, *data.test_splits]
  return {split: a2d2.num_examples(split, builder) for split in dict.fromkeys(splits)}


def num_examples(data: ml_collections.ConfigDict, split: str) -> int:
  """Frames in `split` (a split list's name or an all_* union)."""
  from data_pipelines import a2d2
  return a2d2.num_examples(split, _builder(data))


def dataset(data: ml_collections.ConfigDict, split: str, *, batch_size: int, train: bool,
            seed: int, start: int = 0, process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
  """Batches of `split` (see `data_pipelines.a2d2.dataset`)."""
  from data_pipelines import a2d2
  return a2d2.dataset(data.data_dir, split, image_size=tuple(data.image_size),
                      batch_size=batch_size, train=train, seed=seed,
                      split_dir=data.split_dir or None, tfds_dir=data.tfds_dir or None,
                      shuffle_buffer=data.shuffle_buffer, start=start,
                      process=process)


def class_names(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The 38 A2D2 classes, in class-id order."""
  del data
  return CLASS_NAMES


def expert_names(data: ml_collections.ConfigDict) -> list[str]:
  """The experts' domains, `data.experts` ("highway", "urban")."""
  return list(data.experts)


def expert_split(data: ml_collections.ConfigDict, name: str, part: str) -> str:
  """The split list of expert `name`'s domain: "<name>_train" or "<name>_val"."""
  del data
  return f"{name}_{part}"


def split_parts(data: ml_collections.ConfigDict, split: str) -> list[str]:
  """all_* -> [highway_*, urban_*]; any other split -> [split]."""
  del data
  return COMBINED_SPLITS[split].split("+") if split in COMBINED_SPLITS else [split]


def _builder(data: ml_collections.ConfigDict):
  """The prepared TFDS builder of `data`'s split lists (see `data_pipelines.a2d2.prepare`)."""
  from data_pipelines import a2d2
  return a2d2.prepare(data.data_dir, split_dir=data.split_dir or None,
                      tfds_dir=data.tfds_dir or None)
