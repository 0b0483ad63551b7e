"""A2D2 highway/urban mixture of experts (Pavlitska et al., arXiv 2509.04816).

Presets (the argument after the colon):

  python -m moe_jax.main --config configs/a2d2.py:synthetic --workdir runs/demo
      CPU demo: generates synthetic scenes in the A2D2 layout inside the workdir.
  python -m moe_jax.main --config configs/a2d2.py:smoke --workdir /tmp/smoke
      Tiny, for tests.
  python -m moe_jax.main --config configs/a2d2.py:bayes --workdir runs/bayes
      The demo with all eight Bayesian routers (model.routers) around the simple gate.
  python -m moe_jax.main --config configs/a2d2.py --config.data.data_dir=/data/a2d2 \
      --workdir runs/a2d2
      The paper's setting on the real data (912x912, the reference split lists).

Any key can be overridden on the command line, e.g. --config.data.image_size='(456,456)'
or --config.train.experts.epochs=2. Paths may contain "{workdir}", replaced by --workdir.
"""

import ml_collections

from moe_jax.config_checks import (MESH_DEFAULTS, ROBUST_DEFAULTS,  # plain values, no JAX
                                   ROUTING_DEFAULTS)

# The "bayes" preset's routers: all eight of moe_jax.models.bayesian_routers.
BAYES_PRESET_ROUTERS = ("deterministic", "temp_sampling", "mcdr", "swagr", "der", "mfvr", "fcvr",
                    "vtsr")


def stage(*, batch_size: int, epochs: int, eval_every_epochs: int, optimizer: str,
          learning_rate: float, schedule: str = "constant", momentum: float = 0.0,
          weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  """One training stage's section: batches, length, validation cadence, optimiser."""
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, epochs=epochs, eval_every_epochs=eval_every_epochs,
      optimizer=dict(name=optimizer, learning_rate=learning_rate, schedule=schedule,
                     momentum=momentum, weight_decay=weight_decay)))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  preset = arg or "paper"
  if preset not in ("paper", "synthetic", "smoke", "bayes"):
    raise ValueError(f"configs/a2d2.py: unknown preset {arg!r}; use '', 'synthetic', 'smoke' "
                     "or 'bayes'.")
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
  config.data.train_split = "all_train"     # the baseline, the deep ensemble and the gate
  config.data.val_split = "all_val"
  config.data.num_classes = 38
  config.data.test_splits = ("highway_test", "urban_test", "all_test", "ambiguous_test")
  # Generated A2D2-format scenes instead of data_dir (None = use the real data).
  config.data.synthetic = ml_collections.config_dict.placeholder(ml_collections.ConfigDict)

  # The paper's experts: DeepLabv3+ on ResNet-101 at output stride 16.
  config.model = ml_collections.ConfigDict()
  config.model.backbone = "resnet101"       # resnet10 | 18 | 34 | 50 | 101
  config.model.width = 1.0                  # channel multiplier of the backbone
  # torchvision ResNet ImageNet weights (.pth or .safetensors) the experts, the baseline and
  # the deep ensemble start from ("" = random init); docs/backbone_weights.md says where to
  # get them.
  config.model.backbone_weights = ""
  config.model.aspp_channels = 256
  config.model.aspp_dropout = 0.1           # the reference's (and MC dropout's) dropout site
  config.model.decoder_dropout = 0.0        # optional second site, before the classifier
  # How the stacked experts run inside one compiled call: "vmap" (batched convolutions,
  # for accelerators) or "unroll" (one after another; 2.6x faster on a 2-core CPU).
  config.model.expert_execution = "vmap"
  # One gate (and one MoE, "moe_<gate>") per entry, each trained on the same frozen experts.
  config.model.gates = ("simple", "classwise")
  config.model.fusion_conv = False          # the paper's "+conv": 3x3 conv after fusion
  config.model.gate_hidden = 128
  config.model.deep_ensemble_members = 0    # M > 0 trains a deep ensemble of M models
  # Bayesian routers (moe_jax.models.bayesian_routers.BAYESIAN_ROUTERS): one MoE
  # "moe_<gate>_<router>" per router around each gate type of model.bayesian_gates
  # (() = every gate of model.gates); "deterministic" is the gate itself ("moe_<gate>").
  config.model.routers = ("deterministic",)
  config.model.bayesian_gates = ()
  # The Bayesian routers' settings (prior σ0, β, dropout, SWAG, der's M, temperatures):
  # each key is explained in moe_jax/config_checks.py ROUTING_DEFAULTS.
  config.model.routing = ml_collections.ConfigDict(dict(ROUTING_DEFAULTS))

  # The reference's training: SGD lr 0.01, momentum 0.99, weight decay 1e-4, constant LR
  # (its "cos" schedule is never read), 50 epochs, batch 1 (experts) and 8 (gate).
  sgd = dict(optimizer="sgd", learning_rate=0.01, momentum=0.99, weight_decay=1e-4)
  # The device mesh (moe_jax/sharding.py): "data" splits every batch over devices, "expert"
  # splits the stacked experts (needs expert_execution "vmap"); -1 = every device left.
  config.mesh = ml_collections.ConfigDict(dict(MESH_DEFAULTS))

  config.train = ml_collections.ConfigDict()
  config.train.experts = stage(batch_size=1, epochs=50, eval_every_epochs=2, **sgd)
  config.train.baseline = stage(batch_size=1, epochs=50, eval_every_epochs=2, **sgd)
  config.train.deep_ensemble = stage(batch_size=1, epochs=50, eval_every_epochs=2, **sgd)
  config.train.gate = stage(batch_size=8, epochs=50, eval_every_epochs=10, **sgd)
  # "baseline": every expert starts from the baseline's best checkpoint (trained first) and
  # fine-tunes on its domain; "" = from scratch (or model.backbone_weights), as the paper.
  config.train.experts.init_from = ""
  # One MoE per objective around each gate type of train.objective_gates (() = every gate;
  # deterministic router): "erm", "robust", "robust_filtered" (moe_jax/losses.py
  # GATE_OBJECTIVES; methods "moe_<gate>_<objective>"), with the settings of train.robust
  # (explained in moe_jax/config_checks.py ROBUST_DEFAULTS).
  config.train.gate_objectives = ("erm",)
  config.train.objective_gates = ()
  config.train.robust = ml_collections.ConfigDict(dict(ROBUST_DEFAULTS))
  config.train.keep_checkpoints = 2         # latest N kept, plus the best by val mIoU
  config.train.log_every = 50               # steps between loss readouts
  # A step whose loss or gradients are not finite: "stop" the stage (naming the step; the
  # last good checkpoint stays) or "skip" it (the model and optimiser stay as before it).
  config.train.nonfinite = "stop"

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 4
  # Images one device evaluates at once: every batch is split over all devices and each
  # runs its share this many at a time, so results.json is the same for every mesh whose
  # devices x micro_batch divides eval.batch_size (docs/scaling.md). Raise it on GPUs.
  config.eval.micro_batch = 1
  config.eval.moe_members = "weighted"      # MoE sample set: weighted | uniform | stacked
  # The MoE's expert variance at argmax p̄ of its sample set ("sample") or at its fused
  # prediction ("fused", the reference code's choice).
  config.eval.ev_at = "sample"
  config.eval.mc_dropout_passes = (2, 10, 20)  # one mc_dropout_<T> method per T
  config.eval.ood_splits = ("all_test", "ambiguous_test")  # (in-distribution, OOD)
  # ImageNet-C corruptions of eval.corruption_split, at every severity in eval.severities:
  # splits named "<split>:<corruption>:<severity>" (data_pipelines.corruptions.CORRUPTIONS).
  config.eval.corruption_split = "all_test"
  config.eval.corruptions = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                             "motion_blur", "gaussian_blur", "fog", "brightness", "contrast",
                             "jpeg_compression", "pixelate")
  config.eval.severities = (1, 2, 3, 4, 5)
  # Frames of each part of the corruption split (0 = all); when limited, the clean frames
  # of the same subset are evaluated too, as "<split>:clean:0".
  config.eval.corruption_frames_per_part = 0
  # The MoEs also evaluated hard-routed, temperature-scaled and with MoCaE experts
  # ("moe_<...>_hard", "_ts", "_mocae", "_mocae_hard", "_mocae_ts"): those whose Bayesian
  # router is one of these (() = every MoE).
  config.eval.variant_routers = ()
  config.eval.routing_samples = 16          # S routing samples of a Bayesian router
  # Routing stability: the first eval.stability_images images of the ID split (ood_splits[0],
  # else the first test split) plus Gaussian noise of std σ x each image's pixel std.
  config.eval.stability_noise = (1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
  config.eval.stability_images = 16         # 0 = off
  config.eval.stability_top_k = 2           # Jaccard of the top-k experts (when K > 2)
  config.eval.panel_images = 3              # images per split in the uncertainty panels
  config.eval.patch_size = 4                # Mukhoti & Gal's patch metrics (0 = off)

  # Stage "calibrate" (moe_jax/calibrate.py): temperatures fitted on data.val_split, per
  # expert (MoCaE) and per method (aggregate TS), by L-BFGS on log T, clamped to bounds;
  # on a grid of at most max_pixels val pixels.
  # expert_region: each expert's temperature on its own domain's val pixels ("domain") or
  # on the whole val split ("all", as the paper's code, whose experts share one input).
  config.calibrate = ml_collections.ConfigDict(dict(
      max_pixels=2 ** 18, bounds=(0.1, 10.0), iterations=50, expert_region="domain"))

  if preset in ("synthetic", "smoke", "bayes"):
    small = preset == "smoke"
    # The demo trains four Bayesian routers around the simple gate; "bayes" all eight.
    config.model.routers = (("deterministic", "mfvr") if small else
                            BAYES_PRESET_ROUTERS if preset == "bayes" else
                            ("deterministic", "mcdr", "mfvr", "der"))
    config.model.bayesian_gates = ("simple",)
    # Wong et al.'s robust objectives around the simple gate: Robust MoE in the demo, the
    # filtered one (the other code path) in the smoke run.
    config.train.gate_objectives = ("erm", "robust_filtered" if small else "robust")
    config.train.objective_gates = ("simple",)
    config.eval.variant_routers = ("deterministic",)
    config.eval.stability_images = 4 if small else 8
    # S = 4 routing samples in the demo: each sample's fused softmax and the routing
    # decomposition's entropies cost S x C transcendentals per pixel, which on a CPU with
    # the demo's small experts is as much as the experts themselves at S = 16
    # (docs/bayesian_routing.md#cost).
    config.eval.routing_samples = 2 if small else 4
    # The smoke run is mostly compilation: one block per stage compiles faster.
    config.model.backbone = "resnet10" if small else "resnet18"
    config.model.width = 0.125 if small else 0.5
    config.model.aspp_channels = 16 if small else 64
    # The demo runs longer than it compiles, so "unroll" (faster on CPU); the smoke run is
    # mostly compilation, and "vmap" compiles one expert's graph instead of K.
    config.model.expert_execution = "vmap" if small else "unroll"
    config.model.gate_hidden = 16 if small else 128
    adamw = dict(optimizer="adamw", learning_rate=2e-3, schedule="cosine", weight_decay=1e-4)
    batch = 4 if small else 8
    for name in ("experts", "baseline", "deep_ensemble"):
      config.train[name] = stage(batch_size=batch, epochs=1 if small else 5,
                                 eval_every_epochs=1 if small else 3, **adamw)
    config.train.experts.init_from = ""
    config.train.gate = stage(batch_size=batch, epochs=2, eval_every_epochs=1, **adamw)
    if small:  # two checkpoints per trained stage, so that a test can kill between them
      config.train.experts.epochs = 2
    config.train.log_every = 1 if small else 5
    config.eval.batch_size = 4 if small else 16
    config.eval.mc_dropout_passes = (2,) if small else (2, 10)
    config.eval.corruptions = (("gaussian_noise", "fog") if small else
                               ("gaussian_noise", "defocus_blur", "fog"))
    config.eval.severities = (1, 5) if small else (1, 3, 5)
    config.eval.corruption_frames_per_part = 2 if small else 8
    config.eval.panel_images = 1 if small else 3
    config.data.data_dir = "{workdir}/data/a2d2_synthetic"
    config.data.split_dir = "{workdir}/data/a2d2_synthetic/splits"
    config.data.tfds_dir = "{workdir}/data/tfds"
    config.data.image_size = (32, 48) if small else (80, 128)
    config.data.shuffle_buffer = 64 if small else 256
    config.data.synthetic = ml_collections.ConfigDict(dict(
        num_train=8 if small else 150, num_val=3 if small else 30,
        num_test=4 if small else 60, image_size=(48, 80) if small else (120, 192),
        seed=0))
  return config
