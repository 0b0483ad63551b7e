"""Cityscapes with N experts, each trained on a group of training cities.

  python -m moe_jax.main --config configs/cityscapes.py:4 \
      --config.data.data_dir=/data/cityscapes_zips --workdir runs/cityscapes4

The argument is the number of experts (default 2); the 18 training cities are cut into
that many alphabetical groups (see data_pipelines.cityscapes_meta.expert_groups), or give
explicit groups with --config.data.groups. data_dir holds leftImg8bit_trainvaltest.zip
and gtFine_trainvaltest.zip. The model, training and evaluation sections are the A2D2
paper preset's (configs/a2d2.py); the paper gives no Cityscapes recipe.
"""

import importlib.util
import pathlib

import ml_collections


def _a2d2_paper_config() -> ml_collections.ConfigDict:
  # Config files are loaded by path, not as a package: load the sibling the same way.
  spec = importlib.util.spec_from_file_location(
      "a2d2_config", pathlib.Path(__file__).with_name("a2d2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  try:
    num_experts = int(arg or 2)
  except ValueError:
    raise ValueError(f"configs/cityscapes.py: the argument is the number of experts, "
                     f"got {arg!r}.") from None
  config = _a2d2_paper_config()
  config.data = ml_collections.ConfigDict()
  config.data.name = "cityscapes"
  config.data.data_dir = ""          # the folder holding the two Cityscapes zips (required)
  config.data.tfds_dir = ""          # "" = TFDS's default (~/tensorflow_datasets)
  config.data.image_size = (512, 1024)
  config.data.shuffle_buffer = 256
  config.data.groups = num_experts   # or explicit groups: (("aachen", ...), ...)
  config.data.train_split = "train"         # the baseline, the deep ensemble and the gate
  config.data.val_split = "validation"
  config.data.num_classes = 19
  config.data.test_splits = ("validation",)
  config.eval.ood_splits = ()               # Cityscapes has no out-of-distribution split
  config.eval.corruption_split = "validation"
  return config
