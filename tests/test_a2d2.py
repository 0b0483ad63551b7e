"""A2D2 labels, split lists, the TFDS builder and dataset() on a generated tree."""

import json
import logging
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import DataError, a2d2, a2d2_meta


def hex_rgb(colour):
  return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


# ----------------------------------------------------------------------------- labels


def test_class_names_are_the_38_reference_classes():
  assert len(a2d2_meta.CLASS_NAMES) == 38 == a2d2_meta.NUM_CLASSES
  assert a2d2_meta.CLASS_NAMES[0] == "Car" and a2d2_meta.CLASS_NAMES[33] == "RD normal street"
  assert a2d2_meta.CLASS_NAMES[-1] == "Rain dirt"


def test_every_one_of_the_55_colours_maps_to_its_class():
  class_list = a2d2_meta.REFERENCE_CLASS_LIST
  assert len(class_list) == 55
  rgb = np.array([[hex_rgb(c) for c in class_list]], np.uint8)  # [1, 55, 3]
  ids = a2d2.decode_label(rgb, class_list)[0]
  for colour_id, name in zip(ids, class_list.values()):
    base = name.rsplit(" ", 1)[0] if name[-1].isdigit() else name
    assert a2d2_meta.CLASS_NAMES[colour_id] == base, name
  # The 17 extra colours (Car 2-4, ...) keep their class: the reference turned them into Car.
  assert np.count_nonzero(ids == a2d2_meta.CLASS_NAMES.index("Car")) == 4
  assert sorted(set(ids.tolist())) == list(range(38))


def test_unknown_colour_is_ignored_and_alpha_is_dropped():
  class_list = a2d2_meta.REFERENCE_CLASS_LIST
  rgba = np.array([[[255, 0, 0, 0], [1, 2, 3, 255], [135, 206, 255, 7]]], np.uint8)
  np.testing.assert_array_equal(a2d2.decode_label(rgba, class_list), [[0, 255, 34]])


def test_class_id_drops_the_instance_number_only():
  assert a2d2_meta.class_id("Car 3") == 0
  assert a2d2_meta.class_id("Obstacles / trash") == 17
  assert a2d2_meta.class_id("Painted driv. instr.") == 30


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"red": "Car 1"}', "is not a '#rrggbb' colour"),
    ('{"#ff0000": "Spaceship 1"}', "'Spaceship 1' (colour #ff0000) is not an A2D2 class"),
    ('{"#ff0000": "Car 1", "#00ff00": "Sky", "#ff0000": "Bicycle 1"}',
     "colour #ff0000 is listed twice, as 'Car 1' and as 'Bicycle 1'"),
    ('{"#FF0000": "Car 1", "#ff0000": "Bicycle 1"}',
     "colour #FF0000 (again as #ff0000) is listed twice, as 'Car 1' and as 'Bicycle 1'"),
])
def test_malformed_class_list(tmp_path, content, message):
  path = tmp_path / "class_list.json"
  path.write_text(content)
  with pytest.raises(DataError, match=str(path)) as error:
    a2d2.read_class_list(path)
  assert message in str(error.value)


def test_class_list_repeating_a_colour_with_the_same_name_is_read_once(tmp_path):
  """JSON keeps only the last of two equal keys; a repeat that changes nothing is harmless."""
  path = tmp_path / "class_list.json"
  path.write_text('{"#FF0000": "Car 1", "#87ceff": "Sky", "#ff0000": "Car 1"}')
  assert a2d2.read_class_list(path) == {"#ff0000": "Car 1", "#87ceff": "Sky"}


def test_missing_class_list(tmp_path):
  with pytest.raises(DataError, match="class_list.json not found"):
    a2d2.read_class_list(tmp_path / "class_list.json")


# ----------------------------------------------------------------------------- splits


def test_reference_split_lists_are_packaged_with_their_sizes():
  files = a2d2.split_files()
  sizes = {name: len(a2d2.parse_split_list(path)) for name, path in files.items()}
  assert sizes == {"highway_train": 6132, "highway_val": 876, "highway_test": 1421,
                   "urban_train": 6132, "urban_val": 876, "urban_test": 1421,
                   "ambiguous_test": 1421}
  highway_test = a2d2.parse_split_list(files["highway_test"])
  assert {f.seq for f in highway_test} == {"20181108084007"}


def test_parse_split_list_reads_label_and_camera_names(tmp_path):
  path = tmp_path / "mine.txt"
  path.write_text("highway/train_val/GT/20181204135952_label_frontcenter_000094929.png\n\n"
                  "x/20180807145028_camera_frontcenter_000000091.png\n")
  first, second = a2d2.parse_split_list(path)
  assert (first.seq, first.frame, first.recording) == ("20181204135952", "000094929",
                                                       "20181204_135952")
  assert first.label_path(tmp_path).as_posix().endswith(
      "20181204_135952/label/cam_front_center/20181204135952_label_frontcenter_000094929.png")
  assert second.camera_path(tmp_path).as_posix().endswith(
      "20180807_145028/camera/cam_front_center/20180807145028_camera_frontcenter_000000091.png")


def test_parse_split_list_errors(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  with pytest.raises(DataError, match="empty.txt is empty"):
    a2d2.parse_split_list(empty)
  bad = tmp_path / "bad.txt"
  bad.write_text("not_a_frame.png\n")
  with pytest.raises(DataError, match="bad.txt:1: 'not_a_frame.png' names no A2D2 frame"):
    a2d2.parse_split_list(bad)


def test_split_list_with_crlf_bom_blank_lines_and_trailing_spaces(a2d2_root, tmp_path):
  """A list saved on Windows (UTF-8 with BOM, CRLF) reads as the clean one."""
  clean = a2d2_root / "splits" / "urban_val.txt"
  lines = ["", *[line + "  \t" for line in clean.read_text().splitlines()], "   ", ""]
  messy = tmp_path / "messy.txt"
  messy.write_bytes("\ufeff".encode() + "\r\n".join(lines).encode())
  assert a2d2.parse_split_list(messy) == a2d2.parse_split_list(clean)
  messy.write_bytes("\ufeffnot_a_frame.png\r\n".encode())
  with pytest.raises(DataError, match="messy.txt:1: 'not_a_frame.png' names no A2D2 frame"):
    a2d2.parse_split_list(messy)
  messy.write_text(clean.read_text(), encoding="utf-16")  # Notepad's "Unicode"
  with pytest.raises(DataError, match="split list .*messy.txt is not UTF-8 text"):
    a2d2.parse_split_list(messy)


def test_domains_follow_split_prefixes():
  assert [a2d2.domain_of(n) for n in ("highway_train", "urban_test", "ambiguous_test",
                                      "mine")] == [0, 1, 2, -1]


# ----------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def make_dataset(root, split, tfds_dir, **kwargs):
  kwargs.setdefault("image_size", (32, 48))
  kwargs.setdefault("batch_size", 4)
  kwargs.setdefault("train", False)
  return a2d2.dataset(root, split, split_dir=root / "splits", tfds_dir=tfds_dir, **kwargs)


def test_dataset_shapes_dtypes_and_domains(a2d2_root, tfds_dir):
  batches = list(make_dataset(a2d2_root, "all_test", tfds_dir).as_numpy_iterator())
  assert [b["image"].shape[0] for b in batches] == [4, 4]
  batch = batches[0]
  assert batch["image"].shape == (4, 32, 48, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4, 32, 48) and batch["label"].dtype == np.uint8
  assert batch["domain"].dtype == np.int32 and batch["frame"].dtype == object
  domains = np.concatenate([b["domain"] for b in batches])
  assert sorted(domains.tolist()) == [0] * 4 + [1] * 4
  labels = np.concatenate([b["label"] for b in batches])
  assert labels.max() < a2d2_meta.NUM_CLASSES  # the generator only paints listed colours


def test_ambiguous_split_has_domain_2_and_frame_names(a2d2_root, tfds_dir):
  batch = next(make_dataset(a2d2_root, "ambiguous_test", tfds_dir).as_numpy_iterator())
  assert set(batch["domain"].tolist()) == {2}
  assert all(f.decode().startswith("20190103100000_") for f in batch["frame"])


def test_stored_labels_equal_decoded_png_resized(a2d2_root, tfds_dir):
  """At the native size the stream returns exactly decode_label of the PNG on disk."""
  batch = next(make_dataset(a2d2_root, "highway_val", tfds_dir, image_size=(48, 80),
                            batch_size=3).as_numpy_iterator())
  class_list = a2d2.read_class_list(a2d2_root / "class_list.json")
  for frame, label, image in zip(batch["frame"], batch["label"], batch["image"]):
    seq, number = frame.decode().split("_")
    f = a2d2.Frame(seq, number)
    rgb = np.asarray(Image.open(f.label_path(a2d2_root)))
    np.testing.assert_array_equal(label, a2d2.decode_label(rgb, class_list))
    np.testing.assert_array_equal(image, np.asarray(Image.open(f.camera_path(a2d2_root))))


def test_train_stream_is_deterministic_and_repeats(a2d2_root, tfds_dir):
  def first_batches(seed):
    ds = make_dataset(a2d2_root, "highway_train", tfds_dir, train=True, seed=seed)
    return [b for _, b in zip(range(5), ds.as_numpy_iterator())]  # 20 > 8 frames: repeats
  a, b, c = first_batches(1), first_batches(1), first_batches(2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("start", [4, 20, 36])
def test_train_stream_opened_at_start_continues_the_full_stream(a2d2_root, tfds_dir, start):
  """Resuming: all_train (16 frames in two TFDS splits, so several files) opened at element
  `start` equals the full stream from there on, across epochs, reshuffles and flips."""
  full = make_dataset(a2d2_root, "all_train", tfds_dir, train=True, seed=3)
  full = [b for _, b in zip(range(12), full.as_numpy_iterator())]  # 3 epochs of 4 batches
  resumed = make_dataset(a2d2_root, "all_train", tfds_dir, train=True, seed=3, start=start)
  resumed = [b for _, b in zip(range(12 - start // 4), resumed.as_numpy_iterator())]
  for x, y in zip(full[start // 4:], resumed, strict=True):
    np.testing.assert_array_equal(x["frame"], y["frame"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  epochs = [np.concatenate([b["frame"] for b in full[i:i + 4]]) for i in (0, 4, 8)]
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every frame once per epoch
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_flip_applies_to_image_and_label_together(a2d2_root, tfds_dir):
  reference = {f: (i, l) for b in make_dataset(a2d2_root, "highway_train", tfds_dir,
                                               batch_size=8).as_numpy_iterator()
               for f, i, l in zip(b["frame"], b["image"], b["label"])}
  train = make_dataset(a2d2_root, "highway_train", tfds_dir, train=True, batch_size=8)
  flipped = kept = 0
  for batch in [b for _, b in zip(range(4), train.as_numpy_iterator())]:
    for frame, image, label in zip(batch["frame"], batch["image"], batch["label"]):
      ref_image, ref_label = reference[frame]
      if np.array_equal(image, ref_image):
        np.testing.assert_array_equal(label, ref_label)
        kept += 1
      else:
        np.testing.assert_array_equal(image, ref_image[:, ::-1])
        np.testing.assert_array_equal(label, ref_label[:, ::-1])
        flipped += 1
  assert flipped > 0 and kept > 0


def test_unknown_split_lists_the_valid_ones(a2d2_root, tfds_dir):
  with pytest.raises(DataError, match="unknown A2D2 split 'motorway_test'; valid: "
                     "all_test, all_train, all_val, ambiguous_test"):
    make_dataset(a2d2_root, "motorway_test", tfds_dir)


def test_own_list_files(a2d2_root, tmp_path):
  lists = tmp_path / "lists"
  lists.mkdir()
  lines = (a2d2_root / "splits" / "urban_val.txt").read_text().splitlines()
  (lists / "mine.txt").write_text("\n".join(lines[:2]) + "\n")
  batch = next(a2d2.dataset(a2d2_root, "mine", image_size=(16, 16), batch_size=8,
                            train=False, split_dir=lists, tfds_dir=tmp_path / "tfds")
               .as_numpy_iterator())
  assert batch["image"].shape == (2, 16, 16, 3)
  assert batch["domain"].tolist() == [-1, -1]


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def broken_root(a2d2_root, tmp_path):
  """A private copy of the generated tree that a test may damage."""
  root = tmp_path / "raw"
  shutil.copytree(a2d2_root, root)
  return root


def prepare_fails(root, tmp_path, message, split_dir=None):
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(DataError, match=message):
    a2d2.prepare(root, split_dir=split_dir or root / "splits", tfds_dir=tfds_dir)
  # Nothing that a later run could take for a finished dataset.
  assert not list(tfds_dir.glob("**/dataset_info.json"))
  assert not list(tfds_dir.glob("**/*.tfrecord*"))


def test_missing_data_dir_suggests_the_synthetic_preset(tmp_path):
  prepare_fails(tmp_path / "nowhere", tmp_path, r"does not exist.*configs/a2d2.py:synthetic",
                split_dir=a2d2.REFERENCE_SPLIT_DIR)


def test_empty_data_dir(tmp_path):
  (tmp_path / "empty").mkdir()
  prepare_fails(tmp_path / "empty", tmp_path, "is empty", split_dir=a2d2.REFERENCE_SPLIT_DIR)


def test_missing_class_list_in_root(broken_root, tmp_path):
  (broken_root / "class_list.json").unlink()
  prepare_fails(broken_root, tmp_path, "class_list.json not found")


def test_split_list_naming_missing_frames(broken_root, tmp_path):
  missing = a2d2.parse_split_list(broken_root / "splits" / "urban_test.txt")[:2]
  for frame in missing:
    frame.camera_path(broken_root).unlink()
  prepare_fails(broken_root, tmp_path, rf"2 frames of the split lists .* are not under "
                rf"{broken_root} \(first: .*{missing[0].seq}_label_frontcenter_{missing[0].frame}")


def test_reference_lists_on_a_tree_without_those_frames(a2d2_root, tmp_path):
  prepare_fails(a2d2_root, tmp_path, r"18279 frames of the split lists", 
                split_dir=a2d2.REFERENCE_SPLIT_DIR)


def test_empty_split_list(broken_root, tmp_path):
  (broken_root / "splits" / "urban_val.txt").write_text("")
  prepare_fails(broken_root, tmp_path, "urban_val.txt is empty")


def test_truncated_label_png(broken_root, tmp_path):
  frame = a2d2.parse_split_list(broken_root / "splits" / "highway_val.txt")[1]
  path = frame.label_path(broken_root)
  path.write_bytes(path.read_bytes()[:200])
  prepare_fails(broken_root, tmp_path, f"unreadable or truncated PNG {path}")


def test_truncated_camera_png(broken_root, tmp_path):
  frame = a2d2.parse_split_list(broken_root / "splits" / "urban_train.txt")[3]
  path = frame.camera_path(broken_root)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  prepare_fails(broken_root, tmp_path, f"unreadable or truncated PNG {path}")


def test_image_label_size_mismatch(broken_root, tmp_path):
  frame = a2d2.parse_split_list(broken_root / "splits" / "highway_test.txt")[0]
  path = frame.camera_path(broken_root)
  Image.open(path).resize((40, 24)).save(path)
  prepare_fails(broken_root, tmp_path, f"size mismatch: {path} is 40x24 but .* is 80x48")


def frames_of(root, split):
  return a2d2.parse_split_list(root / "splits" / f"{split}.txt")


def own_lists(tmp_path, **lists):
  """A split_dir holding `<name>.txt` for each name=frames given."""
  split_dir = tmp_path / "lists"
  split_dir.mkdir()
  for name, frames in lists.items():
    (split_dir / f"{name}.txt").write_text(
        "".join(f"{f.seq}_label_frontcenter_{f.frame}.png\n" for f in frames))
  return split_dir


def stream_own_list(root, tmp_path, frames):
  """{frame key: (image, label)} of `frames` streamed as one list at their native size."""
  batch = next(a2d2.dataset(root, "mine", image_size=(48, 80), batch_size=len(frames),
                            train=False, split_dir=own_lists(tmp_path, mine=frames),
                            tfds_dir=tmp_path / "tfds").as_numpy_iterator())
  return {k.decode(): (i, l) for k, i, l in zip(batch["frame"], batch["image"], batch["label"])}


def test_camera_pngs_of_other_modes_stream_as_rgb(broken_root, tmp_path):
  """Grey, grey + alpha, RGBA, palette and 16-bit (grey and RGB) camera PNGs stream as uint8
  RGB; 16-bit values are scaled to 0-255 (v / 257), not wrapped or cut to their low byte."""
  frames = frames_of(broken_root, "highway_train")[:6]
  rng = np.random.default_rng(0)
  expected = {}
  for frame, mode in zip(frames, ["L", "LA", "RGBA", "P", "I;16", "RGB;16"]):
    path = frame.camera_path(broken_root)
    rgb = np.asarray(Image.open(path))
    if mode.endswith(";16"):  # PIL writes no 16-bit RGB PNG; TensorFlow writes both
      wide = rng.integers(0, 2**16, (*rgb.shape[:2], 1 if mode == "I;16" else 3), np.uint16)
      path.write_bytes(tf.io.encode_png(wide).numpy())
      expected[frame.key] = np.broadcast_to(wide / 257, rgb.shape)
    else:
      image = Image.fromarray(rgb).convert(mode)
      image.save(path)
      expected[frame.key] = np.asarray(image.convert("RGB"))
  assert Image.open(frames[4].camera_path(broken_root)).mode == "I;16"
  streamed = stream_own_list(broken_root, tmp_path, frames)
  for key, (image, _) in streamed.items():
    assert image.dtype == np.uint8 and image.shape == (48, 80, 3)
    np.testing.assert_allclose(image, expected[key], atol=1, err_msg=key)


def test_palette_label_decodes_like_the_rgb_one(broken_root, tmp_path):
  frames = frames_of(broken_root, "urban_val")[:2]
  class_list = a2d2.read_class_list(broken_root / "class_list.json")
  expected = {}
  for frame in frames:
    path = frame.label_path(broken_root)
    rgb = np.asarray(Image.open(path))
    expected[frame.key] = a2d2.decode_label(rgb, class_list)
    colours, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    palette = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), "P")
    palette.putpalette(colours.astype(np.uint8).tobytes())
    palette.save(path)
    assert Image.open(path).mode == "P"
  for key, (_, label) in stream_own_list(broken_root, tmp_path, frames).items():
    np.testing.assert_array_equal(label, expected[key])


def test_split_list_naming_a_frame_twice(broken_root, tmp_path):
  """Once by its label and once by its camera file name: TFDS would stop on the key."""
  path = broken_root / "splits" / "urban_val.txt"
  first = a2d2.parse_split_list(path)[0]
  with path.open("a") as lines:
    lines.write(f"elsewhere/{first.seq}_camera_frontcenter_{first.frame}.png\n")
  prepare_fails(broken_root, tmp_path, rf"^split list {path}:4 names frame {first.key} again "
                r"\(first on line 1\); remove the duplicate line\.$")


def test_split_whose_labels_are_all_unknown_colours(broken_root, tmp_path):
  """Labels that are not A2D2 colour codes fail their split instead of training on nothing."""
  for frame in frames_of(broken_root, "highway_val"):
    path = frame.label_path(broken_root)
    Image.new("RGB", Image.open(path).size, (1, 2, 3)).save(path)
  prepare_fails(broken_root, tmp_path,
                rf"^A2D2 split highway_val \({broken_root}/splits/highway_val.txt\): all 11520 "
                rf"label pixels have colours not in {broken_root}/class_list.json; .*A2D2's RGB "
                r"colour codes")


def test_share_of_ignored_label_pixels_is_noted_per_split(broken_root, tmp_path, caplog):
  clean, painted = frames_of(broken_root, "urban_train")[:2]
  path = painted.label_path(broken_root)
  label = np.array(Image.open(path))
  label[:24] = (1, 2, 3)  # half of one of two labels: 25 % of the split
  Image.fromarray(label).save(path)
  caplog.set_level(logging.INFO, logger="data_pipelines.a2d2")
  split_dir = own_lists(tmp_path, clean=[clean], mixed=[clean, painted])
  builder = a2d2.prepare(broken_root, split_dir=split_dir, tfds_dir=tmp_path / "tfds")
  assert a2d2.num_examples("mixed", builder) == 2
  notes = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == a2d2.__name__]
  class_list = broken_root / "class_list.json"
  assert notes == [
      ("INFO", f"A2D2 split clean ({split_dir}/clean.txt): 0.0% of 3840 label pixels have "
               f"colours not in {class_list} (ignored)."),
      ("WARNING", f"A2D2 split mixed ({split_dir}/mixed.txt): 25.0% of 7680 label pixels have "
                  f"colours not in {class_list} (ignored); more than 1% suggests a "
                  "class_list.json that is not A2D2's or labels that are not its colour codes.")]


@pytest.mark.parametrize("mode", ["L", "LA", "I;16"])
def test_grayscale_label_png(broken_root, tmp_path, mode):
  frame = frames_of(broken_root, "ambiguous_test")[1]
  path = frame.label_path(broken_root)
  Image.open(path).convert(mode).save(path)
  prepare_fails(broken_root, tmp_path, rf"^label PNG {path} is grayscale \(mode {mode}\); "
                r"A2D2 labels are RGB colour codes \(class_list.json\)")


def test_failed_prepare_then_fixed_tree_prepares(broken_root, tmp_path):
  class_list = broken_root / "class_list.json"
  good = class_list.read_text()
  class_list.write_text("{")
  prepare_fails(broken_root, tmp_path, "not valid JSON")
  class_list.write_text(good)
  builder = a2d2.prepare(broken_root, split_dir=broken_root / "splits",
                         tfds_dir=tmp_path / "tfds")
  assert a2d2.num_examples("all_train", builder) == 16
  assert json.loads(class_list.read_text()) == a2d2_meta.REFERENCE_CLASS_LIST
