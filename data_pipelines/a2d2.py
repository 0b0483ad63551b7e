"""A2D2 semantic segmentation (camera_lidar_semantic, front centre camera) on tf.data.

Raw layout (the A2D2 download, or `synthetic.generate`):

    <root>/class_list.json                                   hex colour -> "Car 1", 55 entries
    <root>/<YYYYMMDD_hhmmss>/camera/cam_front_center/<seq>_camera_frontcenter_<frame>.png
    <root>/<YYYYMMDD_hhmmss>/label/cam_front_center/<seq>_label_frontcenter_<frame>.png

Splits are list files in the reference format (one frame per line, e.g.
`highway/train_val/GT/20181204135952_label_frontcenter_000094929.png`; only the file name
matters). The reference work's highway / urban / ambiguous lists ship in `splits/a2d2/`.

`A2D2Segmentation` is a TFDS builder whose manual dir is the A2D2 root: it decodes every
RGB label once into class ids and writes shards; `dataset()` streams them. The classes,
domains and union splits are in `a2d2_meta`, which imports without TensorFlow.

Deliberate difference from the reference code: its `encode_segmap` maps only the first
colour of each class and turns the other 17 colours (Car 2-4, Bicycle 2-4, ...) into "Car".
Here every one of the 55 colours maps to its class, and unknown colours map to 255 (ignored).
Preparing a split logs the share of its label pixels that were ignored (see
`check_ignored_share`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import IGNORE_LABEL, DataError
from data_pipelines.a2d2_meta import CLASS_NAMES, COMBINED_SPLITS, DOMAINS, class_id

if TYPE_CHECKING:  # TensorFlow loads with the first stream (`dataset`): a prepared split's
  import tensorflow as tf  # sizes are read without it, ~5 s sooner (the data stage)

# Every set of split lists is its own BuilderConfig by design (named by the lists' hash);
# TFDS warns "Using custom data configuration" each time one is opened. Silence only that.
logging.getLogger("absl").addFilter(
    lambda record: "Using custom data configuration" not in record.getMessage())
_log = logging.getLogger(__name__)

REFERENCE_SPLIT_DIR = Path(__file__).parent / "splits" / "a2d2"

_FRAME_RE = re.compile(r"(\d{14})_(?:label|camera)_frontcenter_(\d+)\.png$")
_HEX_RE = re.compile(r"^#[0-9a-fA-F]{6}$")

# Above this share of ignored label pixels a split's note is a warning (see
# `check_ignored_share`).
IGNORED_SHARE_WARNING = 0.01


# ----------------------------------------------------------------------------- labels


def read_class_list(path: str | os.PathLike) -> dict[str, str]:
  """Reads A2D2's class_list.json: {"#rrggbb": "Car 1", ...}, colours in lower case.

  A colour listed twice under the same name (also as "#FF0000" and "#ff0000") is read once.

  Raises:
    DataError: the file is missing, is not JSON, or holds a key that is not a colour, a
      name that is not an A2D2 class, or one colour under two names.
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path} not found: every A2D2 root holds class_list.json "
                    "(it comes with the camera_lidar_semantic download).")
  try:
    # Objects decode to tuples of (key, value) pairs, so that a repeated key is seen (a
    # dict would keep the last one only); arrays stay lists.
    pairs = json.loads(path.read_text(), object_pairs_hook=tuple)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path} is not valid JSON ({e}); restore it from the A2D2 download.") from e
  if not isinstance(pairs, tuple) or not pairs:
    raise DataError(f"{path} must be a JSON object mapping '#rrggbb' to class names.")
  class_list, spelling = {}, {}
  for colour, name in pairs:
    if not _HEX_RE.match(colour):
      raise DataError(f"{path}: key {colour!r} is not a '#rrggbb' colour.")
    try:
      class_id(str(name))
    except ValueError:
      raise DataError(f"{path}: {name!r} (colour {colour}) is not an A2D2 class; "
                      f"expected one of {', '.join(CLASS_NAMES)}.") from None
    key = colour.lower()
    first = spelling.setdefault(key, colour)
    if class_list.setdefault(key, name) != name:
      where = colour if first == colour else f"{first} (again as {colour})"
      raise DataError(f"{path}: colour {where} is listed twice, as {class_list[key]!r} and as "
                      f"{name!r}; keep the right one (A2D2's class_list.json lists each colour "
                      "once).")
  return class_list


def _colour_keys(rgb: np.ndarray) -> np.ndarray:
  rgb = rgb.astype(np.int32)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def label_lookup(class_list: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
  """Sorted colour keys (int32 [N], 0xRRGGBB) and their class ids (uint8 [N])."""
  keys = np.array([int(colour[1:], 16) for colour in class_list], np.int32)
  ids = np.array([class_id(name) for name in class_list.values()], np.uint8)
  order = np.argsort(keys)
  return keys[order], ids[order]


def decode_label(rgb: np.ndarray, class_list: dict[str, str]) -> np.ndarray:
  """Maps an RGB-coded A2D2 label to class ids.

  Args:
    rgb: uint8 [H, W, 3] or [H, W, 4] (some A2D2 label PNGs are RGBA; alpha is ignored).
    class_list: as returned by `read_class_list`.

  Returns:
    uint8 [H, W]: the class id of every pixel, 255 where the colour is not in the list.
  """
  return _map_colours(rgb, label_lookup(class_list))


def _map_colours(rgb: np.ndarray, lookup: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  keys, ids = lookup
  pixel_keys = _colour_keys(rgb[..., :3])
  position = np.clip(np.searchsorted(keys, pixel_keys), 0, len(keys) - 1)
  return np.where(keys[position] == pixel_keys, ids[position], IGNORE_LABEL).astype(np.uint8)


# ----------------------------------------------------------------------------- splits


@dataclasses.dataclass(frozen=True)
class Frame:
  """One front-centre frame: recording timestamp `seq` (14 digits) and frame number."""
  seq: str
  frame: str

  @property
  def recording(self) -> str:
    return f"{self.seq[:8]}_{self.seq[8:]}"

  @property
  def key(self) -> str:
    return f"{self.seq}_{self.frame}"

  def camera_path(self, root: Path) -> Path:
    return (root / self.recording / "camera" / "cam_front_center" /
            f"{self.seq}_camera_frontcenter_{self.frame}.png")

  def label_path(self, root: Path) -> Path:
    return (root / self.recording / "label" / "cam_front_center" /
            f"{self.seq}_label_frontcenter_{self.frame}.png")


def parse_split_list(path: str | os.PathLike) -> list[Frame]:
  """Reads a split list: one label (or camera) file name per line, any leading folders.

  Blank lines, spaces around a name, CRLF line ends and a UTF-8 byte order mark are fine.

  Raises:
    DataError: the file is missing, empty, has a line that names no A2D2 frame, or names a
      frame twice (by its label or its camera file: TFDS refuses repeated keys).
  """
  path = Path(path)
  if not path.is_file():
    raise DataError(f"split list {path} not found.")
  try:
    text = path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"split list {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    "save it as UTF-8, one frame per line.") from None
  first_line = {}  # frame -> number of the line naming it, in the list's order
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    match = _FRAME_RE.search(line)
    if match is None:
      raise DataError(f"{path}:{number}: {line!r} names no A2D2 frame; expected e.g. "
                      "'highway/train_val/GT/20181204135952_label_frontcenter_000094929.png'.")
    frame = Frame(*match.groups())
    if first_line.setdefault(frame, number) != number:
      raise DataError(f"split list {path}:{number} names frame {frame.key} again (first on "
                      f"line {first_line[frame]}); remove the duplicate line.")
  if not first_line:
    raise DataError(f"split list {path} is empty: give it at least one frame.")
  return list(first_line)


def split_files(split_dir: str | os.PathLike | None = None) -> dict[str, Path]:
  """The split lists of a directory ({name}.txt -> name), default the reference lists."""
  split_dir = Path(split_dir) if split_dir else REFERENCE_SPLIT_DIR
  files = {p.stem: p for p in sorted(split_dir.glob("*.txt"))}
  if not files:
    raise DataError(f"no split lists (*.txt) in {split_dir}; point data.split_dir at a "
                    "directory of lists such as data_pipelines/splits/a2d2.")
  return files


def domain_of(split_name: str) -> int:
  """Domain id of a split from its prefix: highway_* 0, urban_* 1, ambiguous_* 2, other -1."""
  prefix = split_name.split("_")[0]
  return DOMAINS.index(prefix) if prefix in DOMAINS else -1


# ----------------------------------------------------------------------------- builder


def _checked_example(frame: Frame, root: Path, lookup: tuple[np.ndarray, np.ndarray],
                     domain: int) -> dict:
  """Reads one frame's label (decoded to ids once, here) and checks its camera image."""
  camera, label = frame.camera_path(root), frame.label_path(root)
  rgb = _read_png(label, lambda image: _label_colours(image, label))
  # verify() walks every chunk and its checksum: it catches a truncated camera image
  # without decoding it (the stream decodes it every epoch anyway).
  camera_size = _read_png(camera, lambda image: (image.size, image.verify())[0])
  if (rgb.shape[1], rgb.shape[0]) != camera_size:
    raise DataError(f"size mismatch: {camera} is {camera_size[0]}x{camera_size[1]} but "
                    f"{label} is {rgb.shape[1]}x{rgb.shape[0]}; re-extract both files.")
  return {"image": os.fspath(camera), "label": _map_colours(rgb, lookup)[..., None],
          "domain": domain, "frame": frame.key}


def _label_colours(image: Image.Image, path: Path) -> np.ndarray:
  """uint8 [H, W, 3]: the colours of an RGB(A) or palette label; refuses a grey one.

  Camera images may be of any PNG mode (the stream decodes them to RGB, 16 bits scaled to
  8), but a grey label cannot hold A2D2's colour code.
  """
  if not {"R", "P"} & set(image.getbands()):
    raise DataError(f"label PNG {path} is grayscale (mode {image.mode}); A2D2 labels are RGB "
                    "colour codes (class_list.json), so grey levels or class ids cannot be "
                    "read: use the label PNG of the A2D2 download.")
  return np.asarray(image.convert("RGB"))


def _read_png(path: Path, read: Callable):
  try:
    with Image.open(path) as image:
      return read(image)
  except (OSError, SyntaxError) as e:
    raise DataError(f"unreadable or truncated PNG {path} ({e}); re-extract it from the "
                    "A2D2 archive or drop the frame from the split list.") from e


def _ordered_parallel_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
  """`map(fn, items)` on a thread pool, in order, with at most 2*workers results in flight.

  PIL decoding releases the GIL, so threads help; the bound keeps memory at a few frames
  (Executor.map would submit, and hold the results of, the whole split at once).
  """
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


@dataclasses.dataclass(eq=False)
class A2D2Config(tfds.core.BuilderConfig):
  """A set of split lists. The config name is a digest of their contents, so changed lists
  are written as a new dataset instead of silently reusing shards of the old ones."""
  split_dir: str = ""


def builder_config(split_dir: str | os.PathLike | None = None) -> A2D2Config:
  """The builder config for the lists in `split_dir` (default: the reference lists)."""
  files = split_files(split_dir)
  digest = hashlib.sha1()
  for name, path in files.items():
    digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
  prefix = "reference" if split_dir is None else "lists"
  return A2D2Config(name=f"{prefix}_{digest.hexdigest()[:10]}", version="1.0.0",
                    split_dir=os.fspath(split_dir or REFERENCE_SPLIT_DIR))


class A2D2Segmentation(tfds.core.GeneratorBasedBuilder):
  """A2D2 front-centre semantic segmentation, labels stored as class ids (PNG)."""

  name = "a2d2_segmentation"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download A2D2's camera_lidar_semantic archive from https://www.a2d2.audi/ and extract "
      "it; the manual dir is the folder holding class_list.json and the recording folders.")
  BUILDER_CONFIGS = [builder_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.Image(shape=(None, None, 1)),
        "domain": np.int32,
        "frame": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    check_root(root)
    lookup = label_lookup(read_class_list(root / "class_list.json"))
    files = split_files(self.builder_config.split_dir)
    splits = {name: parse_split_list(path) for name, path in files.items()}
    missing = [frame.label_path(root) for frames in splits.values() for frame in frames
               if not (frame.label_path(root).is_file() and frame.camera_path(root).is_file())]
    if missing:
      shown = ", ".join(os.fspath(p) for p in missing[:3])
      raise DataError(f"{len(missing)} frames of the split lists in "
                      f"{self.builder_config.split_dir} are not under {root} (first: {shown}); "
                      "complete the A2D2 download or pass data.split_dir with your own lists.")
    return {name: self._generate_examples(name, files[name], frames, root, lookup)
            for name, frames in splits.items()}

  def _generate_examples(self, split, list_path, frames, root, lookup):
    """Yields the split's checked frames, then notes (or refuses) its ignored pixels."""
    domain = domain_of(split)

    def example(frame):
      return frame.key, _checked_example(frame, root, lookup, domain)

    ignored = pixels = 0
    for key, checked in _ordered_parallel_map(example, frames, workers=os.cpu_count() or 2):
      ignored += np.count_nonzero(checked["label"] == IGNORE_LABEL)
      pixels += checked["label"].size
      yield key, checked
    check_ignored_share(split, list_path, root / "class_list.json", ignored, pixels)


def check_ignored_share(split: str, list_path: Path, class_list_path: Path, ignored: int,
                        pixels: int) -> None:
  """Notes the share of a split's label pixels whose colour is not in class_list.json.

  One INFO line per split; above `IGNORED_SHARE_WARNING` (1 %) a WARNING instead: A2D2
  labels every pixel with one of the 55 listed colours, so a larger share points at a
  class_list.json that lacks colours or at labels that are not A2D2's.

  Raises:
    DataError: every pixel is ignored: nothing of the split would be trained or scored.
  """
  where = f"A2D2 split {split} ({list_path})"
  if ignored == pixels:
    raise DataError(f"{where}: all {pixels} label pixels have colours not in "
                    f"{class_list_path}; either that file is not A2D2's or the labels are not "
                    "A2D2's RGB colour codes: restore them from the A2D2 download.")
  note = (f"{where}: {ignored / pixels:.1%} of {pixels} label pixels have colours not in "
          f"{class_list_path} (ignored)")
  if ignored / pixels > IGNORED_SHARE_WARNING:
    _log.warning("%s; more than %s suggests a class_list.json that is not A2D2's or labels "
                 "that are not its colour codes.", note, f"{IGNORED_SHARE_WARNING:.0%}")
  else:
    _log.info("%s.", note)


def check_root(root: str | os.PathLike) -> None:
  """Raises DataError unless `root` looks like an A2D2 camera_lidar_semantic root."""
  root = Path(root)
  if not root.is_dir():
    raise DataError(f"A2D2 data dir {root} does not exist; set --config.data.data_dir to the "
                    "extracted camera_lidar_semantic folder, or run the demo on generated "
                    "data with --config configs/a2d2.py:synthetic.")
  if not any(root.iterdir()):
    raise DataError(f"A2D2 data dir {root} is empty; extract camera_lidar_semantic into it, "
                    "or use --config configs/a2d2.py:synthetic.")
  read_class_list(root / "class_list.json")


def prepare(data_dir: str | os.PathLike, *, split_dir: str | os.PathLike | None = None,
            tfds_dir: str | os.PathLike | None = None) -> A2D2Segmentation:
  """Writes the TFDS shards once (a no-op when they exist) and returns the builder.

  Args:
    data_dir: the A2D2 root (TFDS manual dir).
    split_dir: directory of split lists, default the reference lists.
    tfds_dir: where TFDS keeps prepared datasets, default its own (~/tensorflow_datasets).
      A failed preparation leaves nothing there (TFDS writes to a temporary folder and
      renames it when complete).
  """
  config = builder_config(split_dir)
  if config.name == A2D2Segmentation.BUILDER_CONFIGS[0].name:
    config = config.name  # TFDS refuses a second instance of a registered config.
  builder = A2D2Segmentation(config=config,
                             data_dir=None if tfds_dir is None else os.fspath(tfds_dir))
  if not builder.is_prepared():
    check_root(data_dir)
    from data_pipelines import transforms  # noqa: F401  (hides the GPUs before TFDS loads TF)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir)))
  return builder


def resolve_split(split: str, builder: A2D2Segmentation) -> str:
  """A named split ("urban_test", "all_train", ...) as a TFDS split expression."""
  expression = COMBINED_SPLITS.get(split, split)
  known = set(builder.info.splits.keys())
  unknown = [part for part in expression.split("+") if part not in known]
  if unknown:
    valid = sorted(known | {name for name, expr in COMBINED_SPLITS.items()
                            if set(expr.split("+")) <= known})
    raise DataError(f"unknown A2D2 split {split!r}; valid: {', '.join(valid)}.")
  return expression


def num_examples(split: str, builder: A2D2Segmentation) -> int:
  """Number of frames in a named split."""
  return sum(builder.info.splits[part].num_examples
             for part in resolve_split(split, builder).split("+"))


def dataset(data_dir: str | os.PathLike, split: str, *, image_size: Sequence[int] = (912, 912),
            batch_size: int, train: bool, seed: int = 0,
            split_dir: str | os.PathLike | None = None,
            tfds_dir: str | os.PathLike | None = None, shuffle_buffer: int = 512, start: int = 0,
            drop_remainder: bool | None = None,
            process: tuple[int, int] = (0, 1)) -> tf.data.Dataset:
  """Batches of an A2D2 split, prepared on first use.

  Args:
    data_dir: the A2D2 root (see module docstring).
    split: "highway_train", "urban_val", "all_test", "ambiguous_test", ... or the name of
      a list in `split_dir`.
    image_size: (height, width) after resizing (bilinear image, nearest label); the
      paper's 912x912 by default. The frames are squashed, not cropped, as in the paper.
    batch_size: images per batch.
    train: shuffle (seeded), repeat forever and flip; otherwise one ordered pass.
    seed: shuffling and flip seed.
    split_dir, tfds_dir: see `prepare`.
    shuffle_buffer: frames in the shuffle buffer (encoded bytes).
    start: the index of the first frame: training skips to it (resume); an evaluation pass
      numbers its frames from it (for `process`).
    drop_remainder: default True when training, False otherwise.
    process: this process's rows of each global batch (`transforms.stream`).

  Returns:
    Dataset of {"image": uint8 [B,H,W,3], "label": uint8 [B,H,W] (class ids, 255 ignore),
    "domain": int32 [B], "frame": string [B] ("<seq>_<frame>")}.
  """
  from data_pipelines import transforms  # TensorFlow
  builder = prepare(data_dir, split_dir=split_dir, tfds_dir=tfds_dir)
  examples = builder.as_dataset(
      split=resolve_split(split, builder), shuffle_files=train,
      read_config=transforms.read_config(seed, train),
      decoders={"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()})
  return transforms.stream(examples, image_size=image_size, batch_size=batch_size,
                           train=train, seed=seed, shuffle_buffer=shuffle_buffer, start=start,
                           drop_remainder=drop_remainder, process=process)
