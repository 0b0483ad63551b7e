"""From a config file to batches, as the training stages will get them."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import corruptions
from moe_jax import input_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_smoke_config_gives_batches_of_each_expert_domain(tmp_path):
  config = load_config("a2d2", "smoke")
  input_pipeline.resolve_paths(config.data, tmp_path)
  assert config.data.tfds_dir == f"{tmp_path}/data/tfds"
  counts = input_pipeline.prepare(config.data)
  assert counts["highway_train"] == counts["urban_train"] == 8
  for domain, expert in enumerate(config.data.experts):
    batch = next(input_pipeline.dataset(config.data, f"{expert}_train", batch_size=2,
                                        train=True, seed=0).as_numpy_iterator())
    assert batch["image"].shape == (2, *config.data.image_size, 3)
    np.testing.assert_array_equal(batch["domain"], [domain, domain])


@pytest.mark.parametrize("arg, groups, synthetic", [
    ("4", 4, False), ("", 2, False), ("experts=3", 3, False), ("synthetic", 2, True),
    ("synthetic,experts=8", 8, True), ("smoke, experts=6", 6, True)])
def test_cityscapes_config_takes_a_preset_and_the_number_of_experts(arg, groups, synthetic):
  config = load_config("cityscapes", arg)
  assert config.data.groups == groups
  assert (config.data.synthetic is not None) == synthetic
  assert config.data.test_splits == (("test_id", "test_ood") if synthetic else ("validation",))


@pytest.mark.parametrize("arg", ["four", "synth", "experts=x", "smoke,bayes"])
def test_cityscapes_config_bad_argument(arg):
  with pytest.raises(ValueError, match="configs/cityscapes.py: bad argument .* use a preset "
                                       r"\(paper, synthetic, smoke\) and/or experts=N"):
    load_config("cityscapes", arg)


def test_eval_batches_pad_limit_parts_and_corrupt_deterministically(tmp_path):
  config = load_config("a2d2", "smoke")
  input_pipeline.resolve_paths(config.data, tmp_path)
  input_pipeline.prepare(config.data)
  data = config.data

  def frames(split, **options):
    batches = list(input_pipeline.eval_batches(data, split, batch_size=3, **options))
    assert all(b["image"].shape == (3, *data.image_size, 3) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    real = ~np.all(labels == 255, axis=(1, 2))  # padding is labelled 255 everywhere
    return images[real], labels[real], len(batches)

  highway, _, _ = frames("highway_test")
  urban, _, _ = frames("urban_test")
  union, _, num_batches = frames("all_test")  # 4 + 4 frames in batches of 3
  assert num_batches == 3 and len(union) == 8
  np.testing.assert_array_equal(union, np.concatenate([highway, urban]))
  first, labels, _ = frames("all_test", frames_per_part=2)  # 2 of each part
  np.testing.assert_array_equal(first, np.concatenate([highway[:2], urban[:2]]))
  noisy, noisy_labels, _ = frames("all_test", frames_per_part=2,
                                  corruption=("gaussian_noise", 3))
  np.testing.assert_array_equal(noisy_labels, labels)
  for i, (clean, corrupted) in enumerate(zip(first, noisy)):  # frame i seeded with i
    np.testing.assert_array_equal(corrupted,
                                  corruptions.corrupt(clean, "gaussian_noise", 3, seed=i))
  assert not np.array_equal(noisy[0] - first[0], noisy[1] - first[1])
