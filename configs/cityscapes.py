"""Cityscapes with N experts, each trained on a group of training cities.

The argument after the colon is a preset and/or the number of experts, comma-separated:

  python -m moe_jax.main --config configs/cityscapes.py:4 \
      --config.data.data_dir=/data/cityscapes_zips --workdir runs/cityscapes4
      The real data: data_dir holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip.
  python -m moe_jax.main --config configs/cityscapes.py:synthetic,experts=8 --workdir runs/cs8
      CPU demo: writes synthetic cities as the two Cityscapes zips inside the workdir
      (data_pipelines/synthetic_cities.py) and reads them through TFDS's Cityscapes builder.
  configs/cityscapes.py:smoke,experts=8
      Tiny, for tests.

experts=N (or a bare N; default 2) cuts the 18 training cities into N alphabetical groups
(data_pipelines.cityscapes_meta.expert_groups); explicit groups go in --config.data.groups.
The model, training and evaluation sections are the A2D2 config's of the same preset
(configs/a2d2.py); the paper gives no Cityscapes recipe. The synthetic presets also have an
in-distribution test split of three test cities and an out-of-distribution one
(data.city_splits), which real Cityscapes, whose test labels are withheld, lacks.
"""

import importlib.util
import pathlib

import ml_collections

from data_pipelines.synthetic_cities import OOD_CITIES, TEST_CITIES  # numpy and PIL, no TF

PRESETS = ("paper", "synthetic", "smoke")


def _a2d2_config(preset: str) -> ml_collections.ConfigDict:
  # Config files are loaded by path, not as a package: load the sibling the same way.
  spec = importlib.util.spec_from_file_location(
      "a2d2_config", pathlib.Path(__file__).with_name("a2d2.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("" if preset == "paper" else preset)


def parse_arg(arg: str) -> tuple[str, int]:
  """(preset, number of experts) of the config argument, e.g. "synthetic,experts=8"."""
  preset, num_experts = "paper", 2
  for part in filter(None, (p.strip() for p in arg.split(","))):
    key, _, value = part.rpartition("=")
    if part in PRESETS:
      preset = part
    elif key in ("", "experts") and value.isdigit():
      num_experts = int(value)
    else:
      raise ValueError(f"configs/cityscapes.py: bad argument {part!r} in {arg!r}; use a preset "
                       f"({', '.join(PRESETS)}) and/or experts=N, e.g. 'synthetic,experts=4'.")
  return preset, num_experts


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  preset, num_experts = parse_arg(arg)
  config = _a2d2_config(preset)
  config.data = ml_collections.ConfigDict()
  config.data.name = "cityscapes"
  config.data.data_dir = ""          # the folder holding the two Cityscapes zips (required)
  config.data.tfds_dir = ""          # "" = TFDS's default (~/tensorflow_datasets)
  config.data.image_size = (512, 1024)
  config.data.shuffle_buffer = 256
  config.data.groups = num_experts   # or explicit groups: (("aachen", ...), ...)
  # More splits, each some cities of one official split: {name: (city, ...)}.
  config.data.city_splits = ml_collections.ConfigDict()
  config.data.train_split = "train"         # the baseline, the deep ensemble and the gate
  config.data.val_split = "validation"
  config.data.num_classes = 19
  config.data.test_splits = ("validation",)
  # Synthetic cities instead of the real zips (None = use data_dir's zips).
  config.data.synthetic = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)
  config.eval.ood_splits = ()               # Cityscapes has no out-of-distribution split
  config.eval.corruption_split = "validation"
  if preset != "paper":
    small = preset == "smoke"
    # The ID test cities and the OOD cities of the synthetic cities.
    config.data.city_splits = ml_collections.ConfigDict(dict(test_id=TEST_CITIES,
                                                             test_ood=OOD_CITIES))
    config.data.test_splits = ("test_id", "test_ood")
    config.eval.ood_splits = ("test_id", "test_ood")
    config.eval.corruption_split = "test_id"
    config.data.data_dir = "{workdir}/data/cityscapes_synthetic"
    config.data.tfds_dir = "{workdir}/data/tfds"
    config.data.image_size = (32, 64) if small else (64, 128)
    config.data.shuffle_buffer = 64 if small else 256
    config.data.synthetic = ml_collections.ConfigDict(dict(
        train_frames=2 if small else 12, val_frames=1 if small else 10,
        test_frames=1 if small else 10, image_size=(64, 128) if small else (128, 256),
        seed=0))
    # Each expert fine-tunes the baseline on its cities: with N groups an expert sees 1/N
    # of the frames, too few to train from scratch at N = 8 (7.7 % val mIoU after 5 epochs,
    # against the baseline's 34.7 %).
    config.train.experts.init_from = "baseline"
    if not small:
      # The number-of-experts sweep runs this preset for every N and seed: the seed paper's
      # methods only (two gates, deterministic routing, ERM; the ensemble and MC dropout),
      # no corruptions or routing-stability noise, and 10 dropout passes.
      config.model.routers = ("deterministic",)
      config.model.bayesian_gates = ()
      config.train.gate_objectives = ("erm",)
      config.train.objective_gates = ()
      config.eval.mc_dropout_passes = (10,)
      config.eval.corruptions = ()
      config.eval.stability_images = 0
      config.eval.panel_images = 2
  return config
