"""From a config file to batches, as the training stages will get them."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import DataError, corruptions
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


def test_eval_batches_pad_limit_parts_and_corrupt_deterministically(tmp_path, monkeypatch):
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
  # A split that yields fewer frames than its metadata counts is one clear error, not
  # silently padded batches.
  counted = input_pipeline.num_examples
  with monkeypatch.context() as patch:
    patch.setattr(input_pipeline, "num_examples", lambda data, split: counted(data, split) + 1)
    with pytest.raises(DataError, match="split highway_test of .* has fewer frames than the 5 "
                                        "its metadata counts; delete the prepared TFDS files"):
      frames("highway_test")


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_reads_its_rows_and_together_they_read_the_one_process_batches(
    tmp_path, count):
  """Several processes (moe_jax.sharding.process_rows): process p's training and
  evaluation batches are rows p*b..(p+1)*b of the one-process batches (b = B / count), at
  the start and on resume; every process yields as many evaluation batches, padding
  included."""
  config = load_config("a2d2", "smoke")
  input_pipeline.resolve_paths(config.data, tmp_path)
  input_pipeline.prepare(config.data)
  data, B = config.data, 4
  splits, seeds = ["highway_train", "urban_train"], [3, 4]

  def train(start_step, process=(0, 1)):
    stream = input_pipeline.train_batches(data, splits, batch_size=B, seeds=seeds,
                                          start_step=start_step, process=process)
    return [next(stream) for _ in range(3)]  # 12 of 8 frames: into the second epoch

  for start_step in (0, 2):
    whole = train(start_step)
    parts = [train(start_step, (p, count)) for p in range(count)]
    for step, batch in enumerate(whole):
      for key in ("image", "label"):
        assert parts[0][step][key].shape[1] == B // count
        np.testing.assert_array_equal(
            np.concatenate([part[step][key] for part in parts], axis=1), batch[key])

  # 3 frames of each part: 6 frames, the second batch 2 frames and 2 padded rows (with 2
  # processes, all of process 1's rows), and corrupted frames seeded by their place.
  options = dict(batch_size=B, frames_per_part=3, corruption=("gaussian_noise", 3))
  whole = list(input_pipeline.eval_batches(data, "all_test", **options))
  parts = [list(input_pipeline.eval_batches(data, "all_test", **options, process=(p, count)))
           for p in range(count)]
  assert len(whole) == 2 and all(len(part) == 2 for part in parts)
  assert np.all(whole[1]["label"][2:] == input_pipeline.IGNORE_LABEL)
  for i, batch in enumerate(whole):
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[i][key] for part in parts]),
                                    batch[key])
  with pytest.raises(ValueError, match="an evaluation batch of 3 does not split over 2"):
    next(input_pipeline.eval_batches(data, "all_test", batch_size=3, process=(0, 2)))
  # A process's evaluation stream holds its own frames only (so it decodes only those),
  # numbered from `start`, the part's first frame in the whole pass.
  def frames(**options):
    return [f for batch in input_pipeline.dataset(data, "urban_test", train=False, seed=0,
                                                  **options).as_numpy_iterator()
            for f in batch["frame"]]

  one, b = frames(batch_size=B), B // count
  for p in range(count):
    expected = [f for i, f in enumerate(one, start=3) if (i % B) // b == p]
    assert frames(batch_size=b, start=3, process=(p, count)) == expected
