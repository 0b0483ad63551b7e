"""The datasets by `data.name`: one entry each, all readable without TensorFlow.

An entry implements `Dataset`: what a config's `data` section means for that dataset. Its
metadata (class names, experts, splits) is plain Python, and only the functions that read
data (`prepare`, `num_examples`, `dataset`) import TensorFlow, on their first call, so that
restoring a trained model and predicting never import it. The entries are modules:
`a2d2_meta` (also the synthetic scenes: A2D2 with `data.synthetic` set) and
`cityscapes_meta`, each beside the tf.data pipeline it imports when it reads data.

Adding a dataset is one new module in `data_pipelines` and one entry in `_DATASETS` below
(and their tests): the module defines the seven functions of `Dataset` at its top level and
keeps TensorFlow out of its imports; `prepare`, `num_examples` and `dataset` import it (or a
tf.data module of their own, as `a2d2_meta` imports `a2d2`) when called. Then
`--config.data.name=<name>` reaches it from `moe_jax.input_pipeline`, which has no
per-dataset code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from data_pipelines import DataError, a2d2_meta, cityscapes_meta

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf


class Dataset(Protocol):
  """What `moe_jax.input_pipeline` asks of a dataset; `data` is the config's data section."""

  def prepare(self, data: ml_collections.ConfigDict) -> dict[str, int]:
    """Makes the data readable once (e.g. writes TFDS shards); {split: frames} of the splits
    a run reads. Raises DataError naming the path or key and the fix."""

  def num_examples(self, data: ml_collections.ConfigDict, split: str) -> int:
    """Frames in `split`."""

  def dataset(self, data: ml_collections.ConfigDict, split: str, *, batch_size: int,
              train: bool, seed: int, start: int = 0,
              process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
    """Batches {"image": uint8 [B,H,W,3], "label": uint8 [B,H,W] (255 ignored), "domain":
    int32 [B], "frame": string [B]} of `split` at `data.image_size`. Training streams are
    shuffled by `seed`, flipped and endless, starting at frame `start` (resume); otherwise
    one ordered pass. process=(index, count): this process's rows of each global batch,
    frames numbered from `start`, in training and in evaluation alike
    (`data_pipelines.transforms.stream` does both); passed only when several processes
    run, so a dataset without it still serves one process."""

  def class_names(self, data: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names of the C classes, in class-id order."""

  def expert_names(self, data: ml_collections.ConfigDict) -> list[str]:
    """One name per expert, in member order."""

  def expert_split(self, data: ml_collections.ConfigDict, name: str, part: str) -> str:
    """The split expert `name` trains ("train") or validates ("val") on."""

  def split_parts(self, data: ml_collections.ConfigDict, split: str) -> list[str]:
    """The disjoint splits `split` is the union of, else [split]; statistics of the parts
    sum to those of the whole."""


_DATASETS: dict[str, Dataset] = {
    "a2d2": a2d2_meta,
    "cityscapes": cityscapes_meta,
}


def get(name: str) -> Dataset:
  """The entry of `data.name`.

  Raises:
    DataError: `name` is not a known dataset (one line naming the key and the known names).
  """
  if name not in _DATASETS:
    raise DataError(f"config key data.name={name!r} is unknown; use one of: "
                    f"{', '.join(_DATASETS)}.")
  return _DATASETS[name]
