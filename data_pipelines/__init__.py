"""Input pipelines: A2D2, Cityscapes and synthetic A2D2-format scenes on tf.data.

This package never imports `moe_jax`; it hands out `tf.data.Dataset`s of dicts
`{"image": uint8 [B,H,W,3], "label": uint8 [B,H,W], "domain": int32 [B], "frame": string [B]}`.
`registry` names the datasets (see there for adding one). The package itself, `registry`
and the metadata modules (`a2d2_meta`, `cityscapes_meta`) do not import TensorFlow, so class
names, experts and splits are cheap to read; the modules that build datasets (`a2d2`,
`cityscapes`) do, through `transforms`, which keeps TensorFlow off the GPU.
"""

import os

# TensorFlow's oneDNN kernels sum in a thread-dependent order, and since TF 2.21 importing
# TensorFlow announces them on stderr (two absl lines), which buries the CLI's one-line
# errors. The pipelines only decode, resize and flip (their bytes are the same either way,
# measured on the smoke data); set before any module here imports TF.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# The label of pixels no metric counts (unknown colours, unevaluated classes, padding).
IGNORE_LABEL = 255


class DataError(ValueError):
  """Bad input data. The message is one line naming the file or key and the fix."""
