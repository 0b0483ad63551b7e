"""The synthetic scene generator: A2D2 layout, determinism, domains that differ."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import DataError, a2d2, a2d2_meta, synthetic


def read_labels(root, split):
  class_list = a2d2.read_class_list(root / "class_list.json")
  frames = a2d2.parse_split_list(root / "splits" / f"{split}.txt")
  return [a2d2.decode_label(np.asarray(Image.open(f.label_path(root))), class_list)
          for f in frames]


def test_tree_is_in_the_a2d2_layout(a2d2_root):
  assert json.loads((a2d2_root / "class_list.json").read_text()) == a2d2_meta.REFERENCE_CLASS_LIST
  files = a2d2.split_files(a2d2_root / "splits")
  assert sorted(files) == ["ambiguous_test", "highway_test", "highway_train", "highway_val",
                           "urban_test", "urban_train", "urban_val"]
  line = (a2d2_root / "splits" / "highway_val.txt").read_text().splitlines()[0]
  assert line.startswith("highway/train_val/GT/") and "_label_frontcenter_" in line
  for name, path in files.items():
    for frame in a2d2.parse_split_list(path):
      camera = Image.open(frame.camera_path(a2d2_root))
      label = Image.open(frame.label_path(a2d2_root))
      assert camera.size == label.size == (80, 48) and camera.mode == label.mode == "RGB"


def test_generation_is_deterministic_per_seed(tmp_path):
  kwargs = dict(num_train=2, num_val=1, num_test=1, image_size=(24, 40))
  a = synthetic.generate(tmp_path / "a", seed=3, **kwargs)
  b = synthetic.generate(tmp_path / "b", seed=3, **kwargs)
  c = synthetic.generate(tmp_path / "c", seed=4, **kwargs)
  pngs = sorted(p.relative_to(a) for p in a.glob("**/*.png"))
  assert len(pngs) == 2 * (2 * (2 + 1 + 1) + 1)  # image + label of 2 domains x 4 + 1 ambiguous
  assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)
  assert any((a / p).read_bytes() != (c / p).read_bytes() for p in pngs)


def test_same_arguments_reuse_the_tree_and_others_are_refused(tmp_path):
  kwargs = dict(num_train=1, num_val=1, num_test=1, image_size=(24, 40), seed=0)
  root = synthetic.generate(tmp_path / "t", **kwargs)
  stamp = (root / "synthetic.json").stat().st_mtime_ns
  synthetic.generate(root, **kwargs)
  assert (root / "synthetic.json").stat().st_mtime_ns == stamp
  with pytest.raises(DataError, match="exists but is not a synthetic tree"):
    synthetic.generate(root, **{**kwargs, "seed": 1})
  assert not list(tmp_path.glob("*.partial-*"))


def test_a_tree_left_half_written_by_a_killed_run_is_removed_by_the_next(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  abandoned = tmp_path / f"t.partial-{dead}"
  (abandoned / "splits").mkdir(parents=True)
  alive = tmp_path / f"t.partial-{os.getpid()}x"  # not a pid: left alone
  alive.mkdir()
  root = synthetic.generate(tmp_path / "t", num_train=1, num_val=1, num_test=1,
                            image_size=(24, 40))
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t", alive.name])
  assert (root / "synthetic.json").is_file()


def test_domains_have_their_own_classes(tmp_path):
  root = synthetic.generate(tmp_path / "t", num_train=40, num_val=1, num_test=1,
                            image_size=(60, 96), seed=0)
  freq = {d: np.bincount(np.concatenate([l.ravel() for l in read_labels(root, f"{d}_train")]),
                         minlength=256)[:38] for d in ("highway", "urban")}
  c = {name: i for i, name in enumerate(a2d2_meta.CLASS_NAMES)}
  for urban_only in ("Buildings", "Sidewalk", "Zebra crossing", "Pedestrian", "Curbstone"):
    assert freq["urban"][c[urban_only]] > 0 and freq["highway"][c[urban_only]] == 0
  for highway_only in ("Nature object", "Sidebars", "Solid line", "Truck"):
    assert freq["highway"][c[highway_only]] > 0 and freq["urban"][c[highway_only]] == 0
  shared = [c[n] for n in ("Car", "RD normal street", "Sky", "Dashed line")]
  assert (freq["highway"][shared] > 0).all() and (freq["urban"][shared] > 0).all()


def test_all_55_colours_occur_and_nothing_else(tmp_path):
  root = synthetic.generate(tmp_path / "t", num_train=150, num_val=1, num_test=40,
                            image_size=(24, 40), seed=0)
  colours = set()
  for path in root.glob("*/label/cam_front_center/*.png"):
    rgb = np.asarray(Image.open(path)).reshape(-1, 3)
    colours |= {"#%02x%02x%02x" % tuple(c) for c in np.unique(rgb, axis=0)}
  assert colours == set(a2d2_meta.REFERENCE_CLASS_LIST)


def test_images_are_textured_not_flat(a2d2_root):
  """The camera image is not a function of the label: pixels of one class vary."""
  frame = a2d2.parse_split_list(a2d2_root / "splits" / "highway_train.txt")[0]
  image = np.asarray(Image.open(frame.camera_path(a2d2_root)), np.float32)
  label = read_labels(a2d2_root, "highway_train")[0]
  sky = image[label == a2d2_meta.CLASS_NAMES.index("Sky")]
  assert sky.std(axis=0).min() > 2.0
