"""Input pipelines: A2D2, Cityscapes and synthetic A2D2-format scenes on tf.data.

This package never imports `moe_jax`; it hands out `tf.data.Dataset`s of dicts
`{"image": uint8 [B,H,W,3], "label": uint8 [B,H,W], "domain": int32 [B], "frame": string [B]}`.
"""

import tensorflow as tf

# tf.data runs on the host. Keep TensorFlow away from any accelerator so JAX owns it.
tf.config.set_visible_devices([], "GPU")


class DataError(ValueError):
  """Bad input data. The message is one line naming the file or key and the fix."""
