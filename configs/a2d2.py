"""A2D2 highway/urban mixture of experts (Pavlitska et al., arXiv 2509.04816).

Presets (the argument after the colon):

  python -m moe_jax.main --config configs/a2d2.py:synthetic --workdir runs/demo
      CPU demo: generates synthetic scenes in the A2D2 layout inside the workdir.
  python -m moe_jax.main --config configs/a2d2.py:smoke --workdir /tmp/smoke
      Tiny, for tests.
  python -m moe_jax.main --config configs/a2d2.py --config.data.data_dir=/data/a2d2 \
      --workdir runs/a2d2
      The paper's setting on the real data (912x912, the reference split lists).

Any key can be overridden on the command line, e.g. --config.data.image_size='(456,456)'.
Paths may contain "{workdir}", replaced by --workdir.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  preset = arg or "paper"
  if preset not in ("paper", "synthetic", "smoke"):
    raise ValueError(f"configs/a2d2.py: unknown preset {arg!r}; use '', 'synthetic' or 'smoke'.")
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "a2d2"
  config.data.data_dir = ""          # the A2D2 camera_lidar_semantic root (required)
  config.data.split_dir = ""         # "" = the reference highway/urban/ambiguous lists
  config.data.tfds_dir = ""          # "" = TFDS's default (~/tensorflow_datasets)
  config.data.image_size = (912, 912)
  config.data.shuffle_buffer = 512
  # Expert k trains on f"{experts[k]}_train"; the baseline and the gate on "all_train".
  config.data.experts = ("highway", "urban")
  config.data.val_split = "all_val"
  config.data.test_splits = ("highway_test", "urban_test", "all_test", "ambiguous_test")
  # Generated A2D2-format scenes instead of data_dir (None = use the real data).
  config.data.synthetic = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)

  if preset in ("synthetic", "smoke"):
    small = preset == "smoke"
    config.data.data_dir = "{workdir}/data/a2d2_synthetic"
    config.data.split_dir = "{workdir}/data/a2d2_synthetic/splits"
    config.data.tfds_dir = "{workdir}/data/tfds"
    config.data.image_size = (32, 48) if small else (96, 160)
    config.data.shuffle_buffer = 64 if small else 256
    config.data.synthetic = ml_collections.ConfigDict(dict(
        num_train=8 if small else 200, num_val=3 if small else 30,
        num_test=4 if small else 60, image_size=(48, 80) if small else (120, 192),
        seed=0))
  return config
