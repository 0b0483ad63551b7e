"""Input pipelines: A2D2, Cityscapes and synthetic A2D2-format scenes on tf.data.

This package never imports `moe_jax`; it hands out `tf.data.Dataset`s of dicts
`{"image": uint8 [B,H,W,3], "label": uint8 [B,H,W], "domain": int32 [B], "frame": string [B]}`.
The package itself does not import TensorFlow (so `DataError` is cheap to import); the
modules that build datasets do, through `transforms`, which keeps TensorFlow off the GPU.
"""


class DataError(ValueError):
  """Bad input data. The message is one line naming the file or key and the fix."""
