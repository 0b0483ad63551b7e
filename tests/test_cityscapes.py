"""Cityscapes pipeline on tiny zips in the official layout, prepared once by TFDS's builder."""

import io
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import DataError, cityscapes, cityscapes_meta

# cityscapesScripts helpers/labels.py: (name, labelId, trainId); trainId 255/-1 = ignored.
OFFICIAL_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
    ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12),
    ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255),
    ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
)
OFFICIAL_TRAIN_ID = {label_id: train_id % 256 for _, label_id, train_id in OFFICIAL_LABELS}

# Every labelId, plus 255 for anything outside the table.
LABEL_VALUES = np.array(list(range(34)) + [255], np.uint8)
STRIPE = 16  # 1024x2048 -> 64x128 is a 16x shrink: one output column per stripe.

FRAMES = {
    "train": ("aachen_000000_000019", "zurich_000000_000019"),
    "val": ("frankfurt_000000_000294",),
    "test": ("berlin_000000_000019",),
}
SMALL = (64, 128)


def png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def label_ids() -> np.ndarray:
  """uint8 [1024, 2048]: vertical stripes cycling through LABEL_VALUES."""
  columns = LABEL_VALUES[(np.arange(2048) // STRIPE) % len(LABEL_VALUES)]
  return np.broadcast_to(columns, (1024, 2048)).copy()


def write_zips(manual_dir):
  """Writes the Cityscapes zips with FRAMES, laid out like the official downloads."""
  manual_dir.mkdir(parents=True)
  rows, cols = np.mgrid[0:1024, 0:2048]
  label = png(label_ids())
  with zipfile.ZipFile(manual_dir / "leftImg8bit_trainvaltest.zip", "w") as images, \
       zipfile.ZipFile(manual_dir / "gtFine_trainvaltest.zip", "w") as labels:
    images.writestr("README", "fake Cityscapes for tests")
    labels.writestr("README", "fake Cityscapes for tests")
    for split, frames in FRAMES.items():
      for index, frame in enumerate(frames):
        city = frame.split("_")[0]
        image = np.stack([np.full_like(rows, 60 * index), cols // 8, rows // 4], -1)
        images.writestr(f"leftImg8bit/{split}/{city}/{frame}_leftImg8bit.png",
                        png(image.astype(np.uint8)))
        labels.writestr(f"gtFine/{split}/{city}/{frame}_gtFine_labelIds.png", label)
        labels.writestr(f"gtFine/{split}/{city}/{frame}_gtFine_polygons.json", "{}")
  return manual_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """(manual dir, tfds dir) with the TFDS shards already prepared (the slow part, ~10 s)."""
  manual_dir = write_zips(tmp_path_factory.mktemp("cityscapes") / "manual")
  tfds_dir = tmp_path_factory.mktemp("tfds")
  next(iter(cityscapes.dataset(manual_dir, "test", image_size=SMALL, batch_size=1, train=False,
                               tfds_dir=tfds_dir)))
  return manual_dir, tfds_dir


def read_all(prepared, split, **kwargs):
  manual_dir, tfds_dir = prepared
  batches = cityscapes.dataset(manual_dir, split, image_size=SMALL, batch_size=1, train=False,
                               tfds_dir=tfds_dir, **kwargs)
  return list(batches.as_numpy_iterator())


def domains(prepared, split, **kwargs):
  """{frame: domain} over one pass of `split`."""
  return {batch["frame"][0].decode(): int(batch["domain"][0])
          for batch in read_all(prepared, split, **kwargs)}


# --- labels -------------------------------------------------------------------------------


def test_train_ids_match_official_table():
  got = cityscapes.train_ids(tf.constant(LABEL_VALUES)).numpy()
  expected = [OFFICIAL_TRAIN_ID.get(int(v), 255) for v in LABEL_VALUES]
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.uint8


def test_every_byte_outside_the_19_classes_is_ignored():
  got = cityscapes.train_ids(tf.range(256, dtype=tf.int32)).numpy()
  evaluated = {i: t for i, t in OFFICIAL_TRAIN_ID.items() if t != 255 and i >= 0}
  np.testing.assert_array_equal(got, [evaluated.get(v, 255) for v in range(256)])


def test_class_names_in_train_id_order():
  names = sorted((t, name) for name, _, t in OFFICIAL_LABELS if 0 <= t < 255)
  assert cityscapes_meta.CLASS_NAMES == tuple(name for _, name in names)
  assert len(cityscapes_meta.CLASS_NAMES) == cityscapes_meta.NUM_CLASSES == 19


# --- expert groups ------------------------------------------------------------------------


def test_train_cities_are_the_18_official_ones_sorted():
  assert len(set(cityscapes_meta.TRAIN_CITIES)) == 18
  assert list(cityscapes_meta.TRAIN_CITIES) == sorted(cityscapes_meta.TRAIN_CITIES)
  assert {"aachen", "monchengladbach", "zurich"} <= set(cityscapes_meta.TRAIN_CITIES)
  assert not {"frankfurt", "lindau", "munster", "berlin"} & set(cityscapes_meta.TRAIN_CITIES)


@pytest.mark.parametrize("n, sizes", [
    (1, [18]), (2, [9, 9]), (3, [6, 6, 6]), (4, [5, 5, 4, 4]), (18, [1] * 18)])
def test_expert_groups_by_count(n, sizes):
  groups = cityscapes_meta.expert_groups(n)
  assert [len(g) for g in groups] == sizes
  # Contiguous runs of the sorted cities: concatenating restores TRAIN_CITIES exactly.
  assert tuple(c for g in groups for c in g) == cityscapes_meta.TRAIN_CITIES
  assert cityscapes_meta.expert_groups(n) == groups
  assert all(type(c) is str for g in groups for c in g)


def test_expert_groups_two_split_at_hanover():
  first, second = cityscapes_meta.expert_groups(2)
  assert (first[0], first[-1], second[0], second[-1]) == ("aachen", "hanover", "jena", "zurich")


@pytest.mark.parametrize("n", [0, -1, 19])
def test_expert_groups_count_out_of_range(n):
  with pytest.raises(DataError, match=r"1\.\.18"):
    cityscapes_meta.expert_groups(n)


def test_explicit_groups_kept_as_given():
  groups = [["zurich", "aachen"], ("ulm",)]
  assert cityscapes_meta.expert_groups(groups) == (("zurich", "aachen"), ("ulm",))


@pytest.mark.parametrize("groups, message", [
    ([["aachen"], ["frankfurt"]], r"groups\[1\]: 'frankfurt' is not a Cityscapes training"),
    ([["aachen", "ulm"], ["ulm"]], r"groups\[1\]: 'ulm' is already in an earlier group"),
    ([["aachen"], []], r"groups\[1\]=\[\]: each expert group must be a non-empty"),
    (["aachen"], r"groups\[0\]='aachen': each expert group must be a non-empty sequence"),
    ([], r"no expert groups given"),
])
def test_explicit_group_errors(groups, message):
  with pytest.raises(DataError, match=message) as error:
    cityscapes_meta.expert_groups(groups)
  assert "\n" not in str(error.value)


# --- dataset ------------------------------------------------------------------------------


def test_train_batches_shapes_and_dtypes(prepared):
  manual_dir, tfds_dir = prepared
  batch = next(cityscapes.dataset(manual_dir, "train", image_size=SMALL, batch_size=3,
                                  train=True, tfds_dir=tfds_dir).as_numpy_iterator())
  assert batch["image"].shape == (3, 64, 128, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (3, 64, 128) and batch["label"].dtype == np.uint8
  assert batch["domain"].shape == (3,) and batch["domain"].dtype == np.int32
  assert batch["frame"].shape == (3,) and batch["frame"].dtype == object
  assert set(batch["frame"]) <= {f.encode() for f in FRAMES["train"]}


def test_labels_are_train_ids(prepared):
  (batch,) = read_all(prepared, "validation")
  # Nearest-neighbour 16x shrink samples one pixel per 16-pixel stripe.
  columns = LABEL_VALUES[np.arange(SMALL[1]) % len(LABEL_VALUES)]
  expected = [OFFICIAL_TRAIN_ID.get(int(v), 255) for v in columns]
  np.testing.assert_array_equal(batch["label"][0], np.broadcast_to(expected, SMALL))


def test_domain_is_group_of_city(prepared):
  assert domains(prepared, "train") == {"aachen_000000_000019": 0, "zurich_000000_000019": 1}
  assert domains(prepared, "group0_train") == {"aachen_000000_000019": 0}
  assert domains(prepared, "group1_train") == {"zurich_000000_000019": 1}
  assert domains(prepared, "validation") == {"frankfurt_000000_000294": -1}
  assert domains(prepared, "test") == {"berlin_000000_000019": -1}


def test_explicit_groups_and_cities_outside_them(prepared):
  groups = [["zurich"], ["bochum"]]
  assert domains(prepared, "train", groups=groups) == {
      "aachen_000000_000019": -1, "zurich_000000_000019": 0}
  assert domains(prepared, "group0_train", groups=groups) == {"zurich_000000_000019": 0}
  assert domains(prepared, "group1_train", groups=groups) == {}


def test_frames_per_split_and_an_endless_city_group_stream(prepared):
  manual_dir, tfds_dir = prepared
  counts = {split: cityscapes.num_examples(manual_dir, split, tfds_dir=tfds_dir)
            for split in ("train", "validation", "group0_train", "group1_train")}
  assert counts == {"train": 2, "validation": 1, "group0_train": 1, "group1_train": 1}
  assert cityscapes.num_examples(manual_dir, "group1_train", groups=[["zurich"], ["bochum"]],
                                 tfds_dir=tfds_dir) == 0
  stream = cityscapes.dataset(manual_dir, "group1_train", image_size=SMALL, batch_size=1,
                              train=True, tfds_dir=tfds_dir, start=3)
  frames = [b["frame"][0] for b in stream.take(3).as_numpy_iterator()]
  assert frames == [b"zurich_000000_000019"] * 3  # repeats its one frame, from any start


def test_named_city_splits(prepared):
  """data.city_splits: some cities of one official split, read from its TFDS split."""
  manual_dir, tfds_dir = prepared
  named = {"aachen_only": ("aachen",), "test_cities": ("berlin", "mainz")}
  assert domains(prepared, "aachen_only", named=named) == {"aachen_000000_000019": 0}
  assert domains(prepared, "test_cities", named=named) == {"berlin_000000_000019": -1}
  assert [cityscapes.num_examples(manual_dir, split, named=named, tfds_dir=tfds_dir)
          for split in named] == [1, 1]
  assert cityscapes_meta.city_splits(2, named)["test_cities"] == ("test", ("berlin", "mainz"))


@pytest.mark.parametrize("named, message", [
    ({"test": ("berlin",)}, r"city_splits.test: 'test' is already a split"),
    ({"x": ("berlin", "frankfurt")}, r"city_splits.x: its cities come from the test and "
                                     r"validation splits; name cities of one split: train: "),
    ({"x": ("paris",)}, r"city_splits.x: 'paris' is not a Cityscapes city"),
    ({"x": ()}, r"city_splits.x=\(\): give a non-empty tuple"),
    ({"x": "berlin"}, r"city_splits.x='berlin': give a non-empty tuple"),
])
def test_bad_named_city_splits(named, message):
  with pytest.raises(DataError, match=message) as error:
    cityscapes_meta.city_splits(2, named)
  assert "\n" not in str(error.value)


def test_official_city_lists():
  cities = [c for members in cityscapes_meta.OFFICIAL_CITIES.values() for c in members]
  assert len(cities) == len(set(cities)) == 18 + 3 + 6
  assert cityscapes_meta.OFFICIAL_CITIES["train"] == cityscapes_meta.TRAIN_CITIES


def test_same_seed_same_batches(prepared):
  manual_dir, tfds_dir = prepared

  def first_batches(seed):
    batches = cityscapes.dataset(manual_dir, "train", image_size=SMALL, batch_size=2,
                                 train=True, seed=seed, tfds_dir=tfds_dir)
    return list(batches.take(3).as_numpy_iterator())

  for a, b in zip(first_batches(7), first_batches(7)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_prepared_shards_need_no_zips(prepared, tmp_path):
  _, tfds_dir = prepared
  batches = cityscapes.dataset(tmp_path / "gone", "test", image_size=SMALL, batch_size=1,
                               train=False, tfds_dir=tfds_dir)
  assert [b["frame"][0] for b in batches.as_numpy_iterator()] == [b"berlin_000000_000019"]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "group2_train", "group0_validation", "group01_train"])
def test_unknown_split(prepared, split):
  with pytest.raises(DataError, match=f"split '{split}' is unknown; use one of: train, "
                                      "validation, test, group0_train, group1_train; "
                                      "a split of other cities goes in data.city_splits"):
    read_all(prepared, split)


def test_bad_groups_in_dataset(prepared):
  with pytest.raises(DataError, match=r"groups=0"):
    read_all(prepared, "train", groups=0)


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=f"{missing}: Cityscapes directory not found; create it "
                                      "and download leftImg8bit_trainvaltest.zip and "
                                      "gtFine_trainvaltest.zip from https://www.cityscapes"):
    cityscapes.dataset(missing, "train", batch_size=1, train=True, tfds_dir=tmp_path / "tfds")


@pytest.mark.parametrize("present, missing", [
    ((), "leftImg8bit_trainvaltest.zip"),
    (("leftImg8bit_trainvaltest.zip",), "gtFine_trainvaltest.zip"),
    (("gtFine_trainvaltest.zip",), "leftImg8bit_trainvaltest.zip"),
])
def test_missing_zip(tmp_path, present, missing):
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  for name in present:
    (manual_dir / name).write_bytes(b"")
  with pytest.raises(DataError) as error:
    cityscapes.dataset(manual_dir, "train", batch_size=1, train=True, tfds_dir=tmp_path / "tfds")
  message = str(error.value)
  assert message.startswith(f"{manual_dir / missing}: not found; download {missing} (")
  assert "https://www.cityscapes-dataset.com/downloads/" in message and "\n" not in message
