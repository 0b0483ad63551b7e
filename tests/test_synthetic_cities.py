"""The synthetic cities: the official zip layout, read by TFDS's Cityscapes builder through our
loader; labelIds that map as cityscapesScripts says; cities that differ; determinism; atomic
writes."""

import dataclasses
import io
import json
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import DataError, cityscapes, cityscapes_meta, synthetic_cities
from data_pipelines.cityscapes_meta import TRAIN_CITIES, expert_groups

SIZE = (64, 128)
COUNTS = {"train": 2, "val": 2, "test": 2}  # frames per city of each split in the fixture
CITIES = {"train": TRAIN_CITIES, "val": synthetic_cities.VAL_CITIES,
          "test": synthetic_cities.TEST_CITIES + synthetic_cities.OOD_CITIES}
LOADER_SPLITS = {"train": "train", "val": "validation", "test": "test"}

# cityscapesScripts helpers/labels.py, restated: the trainIds of the 19 evaluated labelIds;
# every other labelId is ignored (255). Below, the ignored classes the generator draws.
OFFICIAL_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                     24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
IGNORED_DRAWN = {1: "ego vehicle", 4: "static", 5: "dynamic", 6: "ground", 9: "parking",
                 10: "rail track", 14: "guard rail", 15: "bridge", 16: "tunnel",
                 18: "polegroup", 29: "caravan", 30: "trailer"}

# Total-variation distance that the class mixes of any two training cities keep at least
# (mean trainId histograms of HISTOGRAM_FRAMES frames; ~0.10 measured with 24 and with 48
# frames, while two samples of one city differ by <= 0.06).
CLASS_MIX_MARGIN = 0.05
HISTOGRAM_FRAMES = 24
# Mean-colour distance (RGB, grey levels) of every OOD city from every training city
# (~64 measured: night, orange dust, a sodium-lit tunnel).
OOD_COLOUR_MARGIN = 30.0


def frame_ids(city, count):
  return [f"{city}_{index:06d}_000019" for index in range(count)]


def decode(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)))


def read_zips(root):
  """{frame id: (split, image uint8 [H,W,3], labelIds uint8 [H,W])} of the written zips."""
  frames = {}
  with zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip") as images, \
       zipfile.ZipFile(root / "gtFine_trainvaltest.zip") as labels:
    for name in images.namelist():
      if name.endswith("_leftImg8bit.png"):
        _, split, city, file = name.split("/")
        frame = file.removesuffix("_leftImg8bit.png")
        label = labels.read(f"gtFine/{split}/{city}/{frame}_gtFine_labelIds.png")
        frames[frame] = (split, decode(images.read(name)), decode(label))
  return frames


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """(zips dir, tfds dir): a tiny tree, prepared by TFDS once (the slow part)."""
  root = synthetic_cities.generate(
      tmp_path_factory.mktemp("cities") / "zips", train_frames=COUNTS["train"],
      val_frames=COUNTS["val"], test_frames=COUNTS["test"], image_size=SIZE, seed=0)
  tfds_dir = tmp_path_factory.mktemp("tfds")
  cityscapes.prepare(root, tfds_dir=tfds_dir)
  return root, tfds_dir


@pytest.fixture(scope="module")
def written(tree):
  return read_zips(tree[0])


@pytest.fixture(scope="module")
def loaded(tree):
  """{zip split: {frame id: batch of one}} as our loader reads each split at the written size."""
  root, tfds_dir = tree
  return {split: {batch["frame"][0].decode(): batch for batch in cityscapes.dataset(
      root, name, image_size=SIZE, batch_size=1, train=False, tfds_dir=tfds_dir
  ).as_numpy_iterator()} for split, name in LOADER_SPLITS.items()}


def class_mix(city, seed, frames=HISTOGRAM_FRAMES):
  """float [19]: mean over frames of the fraction of evaluated pixels in each trainId."""
  rng = np.random.default_rng(seed)
  character = synthetic_cities.city_character(city)
  mix = np.zeros(19)
  for _ in range(frames):
    _, label_ids = synthetic_cities._render(character, rng, SIZE)
    counts = np.bincount(cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids].ravel(), minlength=256)[:19]
    mix += counts / counts.sum() / frames
  return mix


def total_variation(p, q):
  """[len(p), len(q)] total-variation distances between the rows of p and q."""
  return 0.5 * np.abs(p[:, None] - q[None]).sum(-1)


# --- the zips ---------------------------------------------------------------------------


def test_zips_are_in_the_official_layout(tree):
  root, _ = tree
  expected = {split: [frame for city in CITIES[split] for frame in frame_ids(city, COUNTS[split])]
              for split in CITIES}
  images = zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip")
  labels = zipfile.ZipFile(root / "gtFine_trainvaltest.zip")
  assert set(images.namelist()) == {"README"} | {
      f"leftImg8bit/{split}/{frame.split('_')[0]}/{frame}_leftImg8bit.png"
      for split, frames in expected.items() for frame in frames}
  assert set(labels.namelist()) == {"README"} | {
      f"gtFine/{split}/{frame.split('_')[0]}/{frame}_gtFine_{suffix}"
      for split, frames in expected.items() for frame in frames
      for suffix in ("labelIds.png", "polygons.json")}
  for archive in (images, labels):
    assert archive.namelist() == sorted(archive.namelist())
    assert {info.date_time for info in archive.infolist()} == {(2016, 1, 1, 0, 0, 0)}
  image = Image.open(io.BytesIO(images.read("leftImg8bit/val/lindau/lindau_000001_000019"
                                            "_leftImg8bit.png")))
  label = Image.open(io.BytesIO(labels.read("gtFine/test/munich/munich_000000_000019"
                                            "_gtFine_labelIds.png")))
  assert (image.mode, image.size, label.mode, label.size) == ("RGB", (128, 64), "L", (128, 64))
  polygons = json.loads(labels.read("gtFine/train/ulm/ulm_000001_000019_gtFine_polygons.json"))
  assert (polygons["imgHeight"], polygons["imgWidth"]) == SIZE
  assert json.loads((root / "synthetic.json").read_text())["seed"] == 0


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_loader_reads_every_frame_with_its_city_and_labels(written, loaded, split):
  batches = loaded[split]
  assert sorted(batches) == sorted(frame for city in CITIES[split]
                                   for frame in frame_ids(city, COUNTS[split]))
  groups = expert_groups(2)
  for frame, batch in batches.items():
    zip_split, image, label_ids = written[frame]
    assert zip_split == split
    np.testing.assert_array_equal(batch["label"][0], cityscapes.LABEL_ID_TO_TRAIN_ID[label_ids])
    np.testing.assert_array_equal(batch["image"][0], image)
    city = frame.split("_")[0]
    expected = next((k for k, group in enumerate(groups) if city in group), -1)
    assert batch["domain"][0] == expected and (expected >= 0) == (split == "train")


def test_every_label_id_used_occurs_and_maps_as_the_official_table_says(written, loaded):
  used = synthetic_cities.LABEL_IDS_USED
  assert list(used) == sorted(set(used)) and all(type(i) is int for i in used)
  assert set(used) == set(OFFICIAL_TRAIN_ID) | set(IGNORED_DRAWN)
  occurring = set()
  for _, _, label_ids in written.values():
    occurring |= set(np.unique(label_ids).tolist())
  assert occurring == set(used)
  for label_id in used:
    assert cityscapes.LABEL_ID_TO_TRAIN_ID[label_id] == OFFICIAL_TRAIN_ID.get(label_id, 255)
  decoded = set()
  for batches in loaded.values():
    for batch in batches.values():
      decoded |= set(np.unique(batch["label"]).tolist())
  assert decoded == set(range(19)) | {255}


def test_frames_are_textured_not_flat(written):
  """Pixels of one class vary within a frame, so one pixel's colour does not give its class."""
  _, image, label_ids = written["aachen_000000_000019"]
  for label_id in (7, 11, 23):  # road, building, sky
    pixels = image[label_ids == label_id].astype(np.float32)
    assert len(pixels) > 50 and pixels.std(axis=0).min() > 2.0


# --- the cities -------------------------------------------------------------------------


def test_training_cities_have_their_own_class_mix():
  first = np.array([class_mix(city, [1, k]) for k, city in enumerate(TRAIN_CITIES)])
  second = np.array([class_mix(city, [2, k]) for k, city in enumerate(TRAIN_CITIES)])
  between = total_variation(first, first)[~np.eye(18, dtype=bool)]
  assert between.min() >= CLASS_MIX_MARGIN, between.min()
  # A second sample of each city is nearest its own city's first: the mix identifies a city.
  np.testing.assert_array_equal(total_variation(second, first).argmin(1), np.arange(18))


def test_ood_cities_look_unlike_every_training_city():
  def mean_colour(city):
    rng = np.random.default_rng(3)
    character = synthetic_cities.city_character(city)
    return np.mean([synthetic_cities._render(character, rng, SIZE)[0].reshape(-1, 3).mean(0)
                    for _ in range(8)], axis=0)

  train = np.array([mean_colour(city) for city in TRAIN_CITIES])
  for city in synthetic_cities.OOD_CITIES:
    distance = np.linalg.norm(train - mean_colour(city), axis=1)
    assert distance.min() >= OOD_COLOUR_MARGIN, (city, distance.min())


def test_cities_are_those_of_the_official_splits():
  assert synthetic_cities.VAL_CITIES == cityscapes_meta.VAL_CITIES
  assert synthetic_cities.TEST_CITIES + synthetic_cities.OOD_CITIES == cityscapes_meta.TEST_CITIES


def test_val_and_test_frames_take_the_training_characters_in_turn():
  for cities in (synthetic_cities.VAL_CITIES, synthetic_cities.TEST_CITIES):
    names = [[synthetic_cities._frame_character(city, index).name for index in range(10)]
             for city in cities]
    for k, row in enumerate(names):
      assert row == [TRAIN_CITIES[(index + 6 * k) % 18] for index in range(10)]
    assert {name for row in names for name in row} == set(TRAIN_CITIES)


def test_characters_are_fixed_frozen_and_documented():
  bremen = synthetic_cities.city_character("bremen")
  assert bremen == synthetic_cities.city_character("bremen")
  assert synthetic_cities.city_character("hamburg").archetype == bremen.archetype == "harbour"
  with pytest.raises(dataclasses.FrozenInstanceError):
    bremen.gain = 2.0
  with pytest.raises(TypeError):
    bremen.objects["car"] = 99
  archetypes = {synthetic_cities.city_character(city).archetype for city in TRAIN_CITIES}
  assert archetypes == {"harbour", "dense", "suburban", "industrial", "tram", "leafy"}
  ood = {synthetic_cities.city_character(city).archetype for city in synthetic_cities.OOD_CITIES}
  assert not ood & archetypes
  attributes = synthetic_cities.CityCharacter.__doc__.split("Attributes:")[1]
  for field in dataclasses.fields(synthetic_cities.CityCharacter):
    assert re.search(rf"^    (\w+, )*{field.name}(, \w+)*:", attributes, re.M), field.name
  with pytest.raises(DataError, match="'frankfurt' has no character of its own"):
    synthetic_cities.city_character("frankfurt")
  with pytest.raises(DataError, match="'paris' is not a synthetic city"):
    synthetic_cities.city_character("paris")


# --- writing ----------------------------------------------------------------------------

TINY = dict(train_frames=1, val_frames=1, test_frames=1, image_size=(32, 64))
ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  a = synthetic_cities.generate(tmp_path / "a", seed=3, **TINY)
  b = synthetic_cities.generate(tmp_path / "b", seed=3, **TINY)
  c = synthetic_cities.generate(tmp_path / "c", seed=4, **TINY)
  for name in ZIPS:
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()
  labels_a, labels_c = read_zips(a), read_zips(c)
  assert any((labels_a[f][2] != labels_c[f][2]).any() for f in labels_a)


def test_a_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path):
  root = synthetic_cities.generate(tmp_path / "t", **TINY)
  before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
  assert synthetic_cities.generate(tmp_path / "t", **TINY) == root
  assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
  for other in (dict(TINY, seed=1), dict(TINY, train_frames=2)):
    with pytest.raises(DataError, match=f"^{root} exists but is not a synthetic Cityscapes tree"):
      synthetic_cities.generate(root, **other)
  (tmp_path / "foreign").mkdir()
  with pytest.raises(DataError, match="foreign exists but is not"):
    synthetic_cities.generate(tmp_path / "foreign", **TINY)
  assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "t"]


@pytest.mark.parametrize("bad", [dict(train_frames=0), dict(image_size=(8, 16))])
def test_bad_arguments(tmp_path, bad):
  with pytest.raises(DataError, match="at least one frame per city"):
    synthetic_cities.generate(tmp_path / "t", **{**TINY, **bad})
  assert not list(tmp_path.iterdir())


def test_a_run_killed_mid_write_leaves_no_finished_tree(tmp_path):
  root = tmp_path / "t"
  script = (
      "import os, signal, sys\n"
      "from data_pipelines import synthetic_cities as s\n"
      "render, calls = s._render, []\n"
      "def killing(*args):\n"
      "  calls.append(1)\n"
      "  if len(calls) == 5:\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "  return render(*args)\n"
      "s._render = killing\n"
      f"s.generate({str(root)!r}, **{TINY!r})\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == -signal.SIGKILL, result.stderr
  (partial,) = tmp_path.iterdir()  # only the half-written sibling, not the tree
  assert partial.name.startswith("t.partial-") and not (partial / "synthetic.json").exists()
  assert (partial / ZIPS[0]).exists()
  synthetic_cities.generate(root, **TINY)  # removes the dead run's sibling
  assert [p.name for p in tmp_path.iterdir()] == ["t"]
  assert sorted(p.name for p in root.iterdir()) == sorted([*ZIPS, "synthetic.json"])


def test_an_error_mid_write_removes_the_partial_tree(tmp_path, monkeypatch):
  render, calls = synthetic_cities._render, []

  def failing(*args):
    calls.append(1)
    if len(calls) == 4:
      raise RuntimeError("disk full")
    return render(*args)

  monkeypatch.setattr(synthetic_cities, "_render", failing)
  with pytest.raises(RuntimeError, match="disk full"):
    synthetic_cities.generate(tmp_path / "t", **TINY)
  assert not list(tmp_path.iterdir())  # neither the tree nor this process's partial sibling
