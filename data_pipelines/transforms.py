"""tf.data transforms shared by every dataset: decode, resize, flip, batch.

Every dataset hands `stream()` a `tf.data.Dataset` of *undecoded* examples
`{"image": PNG/JPEG bytes, "label": PNG bytes of class ids, "domain": int32, "frame": string}`
so that the shuffle buffer holds compressed bytes and decoding runs in parallel after it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

# tf.data runs on the host. Keep TensorFlow away from any accelerator so JAX owns it.
tf.config.set_visible_devices([], "GPU")


def read_config(seed: int, train: bool) -> tfds.ReadConfig:
  """TFDS read options for `stream`: the file order is seeded and the same every epoch.

  `stream` reshuffles the examples per epoch itself (from the seed and the epoch number);
  TFDS's own per-iteration file reshuffle would make epoch e depend on how many epochs this
  dataset object has already served, so a resumed stream would not continue the original.
  An evaluation pass reads its dataset once (and may stop early), so TFDS's in-memory
  auto-cache, which helps training epochs, is off for it.
  """
  return tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                         try_autocache=train)


def resize_pair(image: tf.Tensor, label: tf.Tensor, size: Sequence[int]):
  """Resizes an image bilinearly and its label by nearest neighbour.

  Args:
    image: uint8 [H, W, 3].
    label: uint8 [H, W, 1] class ids.
    size: (height, width) of the output.

  Returns:
    (uint8 [h, w, 3], uint8 [h, w, 1]). The image uses antialiasing when shrinking,
    like PIL's bilinear resize in the reference code; labels are never interpolated.
  """
  size = tf.constant(size, tf.int32)
  image = tf.image.resize(image, size, method="bilinear", antialias=True)
  image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  label = tf.image.resize(label, size, method="nearest")
  return image, label


def random_flip(image: tf.Tensor, label: tf.Tensor, seed: tf.Tensor):
  """Flips image and label together with probability 1/2 (stateless: same seed, same flip).

  Args:
    image: [H, W, 3]; label: [H, W, 1]; seed: int64 [2] stateless seed.
  """
  flip = tf.random.stateless_uniform([], seed=seed) < 0.5
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  label = tf.cond(flip, lambda: tf.reverse(label, axis=[1]), lambda: label)
  return image, label


def decode_example(example: dict, *, image_size: Sequence[int], train: bool,
                   seed: tf.Tensor | None = None,
                   label_map: Callable[[tf.Tensor], tf.Tensor] | None = None) -> dict:
  """Decodes one undecoded example, resizes it and (when training) flips it.

  Args:
    example: {"image": bytes, "label": bytes, "domain": int32 [], "frame": string []}.
    image_size: (height, width) of the output.
    train: apply the random horizontal flip.
    seed: int64 [2] stateless seed for the flip; required when `train`.
    label_map: optional function of the decoded uint8 [H, W, 1] label, e.g. a lookup
      from Cityscapes labelIds to trainIds.

  Returns:
    {"image": uint8 [h, w, 3], "label": uint8 [h, w], "domain": int32 [], "frame": string []}.
  """
  image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
  label = tf.io.decode_png(example["label"], channels=1)
  if label_map is not None:
    label = label_map(label)
  image, label = resize_pair(image, label, image_size)
  if train:
    image, label = random_flip(image, label, seed)
  return {"image": image, "label": label[..., 0],
          "domain": tf.cast(example["domain"], tf.int32), "frame": example["frame"]}


def stream(examples: tf.data.Dataset, *, image_size: Sequence[int], batch_size: int,
           train: bool, seed: int = 0, shuffle_buffer: int = 512, start: int = 0,
           drop_remainder: bool | None = None,
           label_map: Callable[[tf.Tensor], tf.Tensor] | None = None,
           process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
  """Turns undecoded examples into batches: shuffle, repeat, parallel decode, batch, prefetch.

  Training streams repeat forever; epoch e is shuffled with a seed derived from (seed, e)
  and element i is flipped with the stateless seed (seed, i), so two streams with the same
  seed yield identical batches, and a stream opened at `start` yields exactly what the
  full stream yields from element `start` on (a resumed run continues where it stopped;
  the skip reads at most one epoch of undecoded bytes and decodes nothing). Evaluation
  streams run once, in order, and keep the last partial batch.

  Args:
    examples: undecoded examples (see module docstring).
    image_size: (height, width).
    batch_size: images per batch.
    train: shuffle + repeat + flip, and drop the last partial batch by default.
    seed: seed for shuffling and flips.
    shuffle_buffer: elements in the shuffle buffer (compressed bytes, so it is cheap).
    start: the index of the first element: training skips to it (e.g. step x batch size
      on resume); an evaluation pass only numbers its elements from it (for `process`).
    drop_remainder: override the default (True for training, False otherwise).
    label_map: see `decode_example`.
    process: (index, count) of this process among `count` reading one stream together:
      it keeps rows index * batch_size .. (index + 1) * batch_size of every global batch
      of batch_size * count elements, and decodes only those; the union of the processes'
      batches is exactly the one-process stream's (`start` counts global elements).

  Returns:
    Dataset of {"image": uint8 [B,h,w,3], "label": uint8 [B,h,w], "domain": int32 [B],
    "frame": string [B]}.
  """
  if train:
    size = int(examples.cardinality())  # filtered datasets must assert theirs
    if size <= 0:
      raise ValueError(f"a training stream needs a non-empty split of known size, got {size}")
    first_epoch, offset = divmod(start, size)
    one_epoch = examples
    examples = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        lambda epoch: one_epoch.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch))
    examples = examples.skip(offset)
  examples = examples.enumerate(start=start)
  index, count = process
  if count > 1:
    examples = examples.filter(
        lambda i, _: (i % (batch_size * count)) // batch_size == index)

  def decode(index, example):
    element_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
    return decode_example(example, image_size=image_size, train=train, seed=element_seed,
                          label_map=label_map)

  examples = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if drop_remainder is None:
    drop_remainder = train
  examples = examples.batch(batch_size, drop_remainder=drop_remainder)
  return examples.prefetch(tf.data.AUTOTUNE).with_options(_OPTIONS)


# tf.data's autotuner off: with it on, deleting a stream waited for the autotuner's
# sleeping thread, 36 s after 90 training steps of 0.5 s (the demo lost ~40 s between two
# stages); 0.4 s with it off, at the same throughput (150 batches of 2 x 8 images: 11.4
# against 11.6 s here).
_OPTIONS = tf.data.Options()
_OPTIONS.autotune.enabled = False
