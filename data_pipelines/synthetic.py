"""Procedural driving scenes written in the A2D2 layout, so the demo runs the real loader.

Three domains, as in the paper's split:
- highway: wide multi-lane road, solid and dashed lines, sidebars, nature, sky, cars,
  trucks, traffic signs, gantries, cones;
- urban: narrow road (asphalt or cobblestone), curbs, sidewalks, buildings with windows,
  zebra crossings, pedestrians, bicycles, poles, traffic signals, parked cars, bins;
- ambiguous (out of distribution, test only): the two mixed (buildings on one side,
  nature on the other, a road of either width) under other light and weather (dusk,
  fog, rain dirt on the lens).

The same class looks alike in every domain (a car is a car), so an expert trained on one
domain transfers what it saw; the classes it never saw it cannot predict, so it is
clearly worse on the other domain. Textures, noise, perspective, lighting and random
layout keep the task from being solvable pixel by pixel.

Each label uses the A2D2 colours, instances picking among their class's colours
("Car 1".."Car 4"), so all 55 colours occur. Generation is deterministic per seed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import DataError
from data_pipelines.a2d2_meta import CLASS_NAMES, REFERENCE_CLASS_LIST, class_id

# Class id -> the A2D2 label colours of that class (instances choose one).
_LABEL_COLOURS = [[] for _ in CLASS_NAMES]
for _hex, _name in REFERENCE_CLASS_LIST.items():
  _LABEL_COLOURS[class_id(_name)].append(tuple(int(_hex[i:i + 2], 16) for i in (1, 3, 5)))
_C = {name: i for i, name in enumerate(CLASS_NAMES)}

# How strongly each class is textured (std of its fine noise, in grey levels).
_TEXTURE = np.full(len(CLASS_NAMES), 6.0, np.float32)
_TEXTURE[[_C["Nature object"], _C["Drivable cobblestone"], _C["Animals"]]] = 28.0
_TEXTURE[[_C["Sky"], _C["Solid line"], _C["Dashed line"], _C["Zebra crossing"]]] = 3.0
_TEXTURE[[_C["RD normal street"], _C["Sidewalk"], _C["Buildings"]]] = 10.0

# Recording timestamps of the generated tree (A2D2 names recordings by start time).
_RECORDINGS = {"highway": "20190101100000", "urban": "20190102100000",
               "ambiguous": "20190103100000"}
_PARTS = {"train": "train_val", "val": "train_val", "test": "test"}


class _Scene:
  """Three aligned canvases: appearance (RGB), class id and label colour."""

  def __init__(self, height: int, width: int, rng: np.random.Generator):
    self.h, self.w, self.rng = height, width, rng
    self.image = Image.new("RGB", (width, height))
    self.classes = Image.new("L", (width, height))
    self.label = Image.new("RGB", (width, height))
    self._draw = [ImageDraw.Draw(c) for c in (self.image, self.classes, self.label)]

  def shape(self, kind: str, xy, name: str, colour) -> None:
    """Draws a polygon / rectangle / ellipse of class `name` with appearance `colour`."""
    cls = _C[name]
    label_colour = _LABEL_COLOURS[cls][self.rng.integers(len(_LABEL_COLOURS[cls]))]
    colour = tuple(int(np.clip(c, 0, 255)) for c in colour)
    for draw, fill in zip(self._draw, (colour, cls, label_colour)):
      getattr(draw, kind)(xy, fill=fill)

  def jitter(self, rgb, amount: float = 20.0):
    return np.asarray(rgb, np.float32) + self.rng.normal(0, amount, 3)

  def render(self, gain: float, haze: float, tint) -> tuple[np.ndarray, np.ndarray]:
    """Adds texture, shading and lighting; returns (uint8 [H,W,3] image, RGB label)."""
    rng, h, w = self.rng, self.h, self.w
    classes = np.asarray(self.classes)
    image = np.asarray(self.image, np.float32)
    fine = rng.normal(0, 1, (h, w, 1)) * _TEXTURE[classes][..., None]
    # Patterns that identify a class by more than its colour: windows on buildings,
    # a stone grid on cobblestone.
    rows, cols = np.mgrid[:h, :w]
    step = max(4, h // 16)
    windows = (rows % step < step // 2) & (cols % step < step // 2)
    stones = ((rows // 3 + cols // 3) % 2).astype(bool)
    image = image * np.where(
        ((classes == _C["Buildings"]) & windows) |
        ((classes == _C["Drivable cobblestone"]) & stones), 0.55, 1.0)[..., None]
    coarse = rng.normal(0, 12, (h // 8 + 2, w // 8 + 2, 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    shading = np.linspace(0.9, 1.1, h, dtype=np.float32)[:, None, None]
    image = (image + fine + coarse) * shading * gain * np.asarray(tint, np.float32)
    image = (1 - haze) * image + haze * 190.0
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(self.label)


def _ground(scene: _Scene, horizon: float, vanish: float, half_width: float):
  """Perspective helper: x of lateral position `f` (-1, 1 = road edges) at image row y."""
  def x(f: float, y: float) -> float:
    depth = (y - horizon) / (scene.h - horizon)
    return vanish + f * half_width * depth
  return x


def _lane_strip(scene, x, horizon, f0, f1, name, colour, y0=None, y1=None):
  y0 = horizon if y0 is None else y0
  y1 = scene.h if y1 is None else y1
  scene.shape("polygon", [(x(f0, y0), y0), (x(f1, y0), y0), (x(f1, y1), y1), (x(f0, y1), y1)],
              name, colour)


def _vehicle(scene, x, horizon, f, depth, name, colour, aspect=0.75, scale=0.5):
  """A box vehicle on the road at lateral position f and depth in (0, 1]."""
  y = horizon + depth * (scene.h - horizon)
  half = max(1.0, (x(1, y) - x(0, y)) * scale * 0.5)
  cx, height = x(f, y), 2 * half * aspect
  scene.shape("rectangle", [cx - half, y - height, cx + half, y], name, colour)
  glass = scene.jitter((60, 70, 80), 10)
  scene.shape("rectangle", [cx - half * 0.7, y - height * 0.9, cx + half * 0.7, y - height * 0.6],
              name, glass)
  scene.shape("rectangle", [cx - half, y - height * 0.15, cx + half, y], name, (25, 25, 25))


def _pole_with(scene, x_pole, y_base, height, head, head_colour, pole_name="Poles"):
  width = max(1.0, height * 0.04)
  scene.shape("rectangle", [x_pole - width, y_base - height, x_pole + width, y_base],
              pole_name, scene.jitter((120, 120, 125), 8))
  size = height * 0.22
  scene.shape("rectangle", [x_pole - size, y_base - height - size, x_pole + size,
                            y_base - height + size * 0.4], head, head_colour)


def _sky_and_horizon(scene, horizon):
  scene.shape("rectangle", [0, 0, scene.w, horizon], "Sky", scene.jitter((150, 185, 225), 12))


def _nature(scene, horizon, x0, x1):
  rng = scene.rng
  scene.shape("rectangle", [x0, horizon, x1, scene.h], "Nature object",
              scene.jitter((70, 120, 55), 10))
  xs = np.linspace(x0, x1, rng.integers(4, 9))
  tops = horizon - rng.uniform(0.02, 0.2, len(xs)) * scene.h
  scene.shape("polygon", [(x0, horizon)] + list(zip(xs, tops)) + [(x1, horizon)],
              "Nature object", scene.jitter((50, 95, 45), 10))


def _facade(scene, x, horizon, side, edge):
  """Buildings on one side (-1 left, +1 right) from lateral position `edge` out to the
  image border, under a stepped roof line; windows come from `render`'s texture."""
  rng, h = scene.rng, scene.h
  border = 0 if side < 0 else scene.w
  far = x(side * edge, horizon)
  xs = np.linspace(far, border, rng.integers(2, 6))
  roofs = rng.uniform(0.0, 0.7, len(xs)) * horizon
  roof_line = [p for x0, x1, r in zip(xs, xs[1:], roofs) for p in ((x0, r), (x1, r))]
  wall = scene.jitter(rng.choice([(190, 170, 140), (150, 90, 70), (160, 160, 165)]), 15)
  scene.shape("polygon", [(far, horizon)] + roof_line + [(border, h), (x(side * edge, h), h)],
              "Buildings", wall)


def _highway_side(scene, x, horizon, side):
  """Guard rail, signs, gantry and cones on one side (-1 left, +1 right) of a highway."""
  rng = scene.rng
  _lane_strip(scene, x, horizon, side * 1.04, side * 1.12, "Sidebars",
              scene.jitter((175, 178, 185), 6), y0=horizon, y1=scene.h)
  if rng.random() < 0.7:
    y = horizon + rng.uniform(0.15, 0.6) * (scene.h - horizon)
    _pole_with(scene, x(side * 1.35, y), y, (y - horizon) * 1.4 + 4, "Traffic sign",
               scene.jitter(rng.choice([(30, 70, 170), (30, 120, 60)]), 10))
  if rng.random() < 0.25:
    y = horizon + rng.uniform(0.3, 0.9) * (scene.h - horizon)
    size = (y - horizon) * 0.08 + 1
    scene.shape("polygon", [(x(side * 0.93, y) - size, y), (x(side * 0.93, y) + size, y),
                            (x(side * 0.93, y), y - 3 * size)], "Traffic guide obj.",
                (240, 110, 30))


def _highway(scene: _Scene, horizon: float, mixed_side: int = 0):
  """A highway; with mixed_side = +-1, that side gets buildings instead of nature."""
  rng, h, w = scene.rng, scene.h, scene.w
  vanish = w * rng.uniform(0.4, 0.6)
  x = _ground(scene, horizon, vanish, w * rng.uniform(0.5, 0.75))
  _sky_and_horizon(scene, horizon)
  _nature(scene, horizon, 0, w)
  if mixed_side:
    _facade(scene, x, horizon, mixed_side, 1.3)
  _lane_strip(scene, x, horizon, -1.02, 1.02, "RD normal street", scene.jitter((95, 95, 100), 8))
  for side in (-1, 1):
    _lane_strip(scene, x, horizon, side * 0.96, side * 1.0, "Solid line", (235, 235, 225))
    if side != mixed_side:
      _highway_side(scene, x, horizon, side)
  lanes = rng.integers(2, 5)
  dash = rng.uniform(0.05, 0.1)
  for boundary in np.linspace(-1, 1, lanes + 1)[1:-1]:
    for start in np.arange(rng.uniform(0, 2 * dash), 1.0, 2 * dash):
      y0, y1 = horizon + start * (h - horizon), horizon + (start + dash) * (h - horizon)
      _lane_strip(scene, x, horizon, boundary - 0.015, boundary + 0.015, "Dashed line",
                  (235, 235, 225), y0=y0, y1=y1)
  if rng.random() < 0.3:
    y = horizon + rng.uniform(0.5, 0.9) * (h - horizon)
    f = rng.uniform(-0.8, 0.6)
    _lane_strip(scene, x, horizon, f, f + 0.12, "Painted driv. instr.", (230, 230, 220),
                y0=y, y1=y + 0.06 * h)
  if rng.random() < 0.2:
    y = horizon + 0.15 * (h - horizon)
    scene.shape("rectangle", [x(-1.1, y), y - 0.22 * h, x(1.1, y), y - 0.16 * h],
                "Electronic traffic", (25, 25, 30))
  if rng.random() < 0.2:
    y = horizon + rng.uniform(0.5, 0.95) * (h - horizon)
    scene.shape("polygon", [(x(0.2, y), y), (x(0.95, y), y), (x(0.95, y) , y - 0.05 * h)],
                "RD restricted area", (200, 200, 190))
  vehicles = [("Car", 0.75, 0.45)] * 5 + [("Truck", 1.3, 0.6)] * 2 + [
      ("Utility vehicle", 1.0, 0.5), ("Small vehicles", 1.6, 0.18), ("Tractor", 1.0, 0.45)]
  lane_centres = np.linspace(-1, 1, 2 * lanes + 1)[1::2]
  for depth in np.sort(rng.uniform(0.15, 0.95, rng.integers(1, 5))):
    name, aspect, scale = vehicles[rng.integers(len(vehicles))]
    colour = scene.jitter(rng.integers(30, 230, 3), 5)
    _vehicle(scene, x, horizon, rng.choice(lane_centres), depth, name, colour, aspect, scale)
  if rng.random() < 0.05:
    y = horizon + rng.uniform(0.2, 0.6) * (h - horizon)
    cx = x(rng.choice([-1.6, 1.6]), y)
    size = (y - horizon) * 0.12 + 1
    scene.shape("ellipse", [cx - 2 * size, y - 1.5 * size, cx + 2 * size, y], "Animals",
                (120, 90, 60))


def _urban(scene: _Scene, horizon: float, mixed_side: int = 0):
  """An urban street; with mixed_side = +-1, that side gets nature instead of buildings."""
  rng, h, w = scene.rng, scene.h, scene.w
  vanish = w * rng.uniform(0.4, 0.6)
  x = _ground(scene, horizon, vanish, w * rng.uniform(0.25, 0.4))
  _sky_and_horizon(scene, horizon)
  scene.shape("rectangle", [0, horizon, w, h], "Sidewalk", scene.jitter((150, 145, 140), 8))
  for side in (-1, 1):
    if side == mixed_side:
      _nature(scene, horizon, *sorted((x(side * 1.1, horizon), 0 if side < 0 else w)))
    else:
      _facade(scene, x, horizon, side, 2.4)
  cobble = rng.random() < 0.3
  road = "Drivable cobblestone" if cobble else "RD normal street"
  _lane_strip(scene, x, horizon, -1.0, 1.0, road,
              scene.jitter((120, 105, 95) if cobble else (85, 85, 92), 8))
  for side in (-1, 1):
    _lane_strip(scene, x, horizon, side * 1.0, side * 1.08, "Curbstone",
                scene.jitter((175, 175, 170), 6))
  for start in np.arange(0.0, 1.0, 0.16):
    _lane_strip(scene, x, horizon, -0.02, 0.02, "Dashed line", (225, 225, 215),
                y0=horizon + start * (h - horizon), y1=horizon + (start + 0.07) * (h - horizon))
  if rng.random() < 0.6:
    top = horizon + rng.uniform(0.35, 0.7) * (h - horizon)
    bottom = top + 0.08 * (h - horizon) * (1 + (top - horizon) / (h - horizon))
    stripes = np.linspace(-0.95, 0.95, 9)
    for left, right in zip(stripes[::2], stripes[1::2]):
      _lane_strip(scene, x, horizon, left, right, "Zebra crossing", (235, 235, 230),
                  y0=top, y1=bottom)
  extras = [("Speed bumper", (200, 190, 60)), ("Slow drive area", (150, 150, 140)),
            ("Parking area", (110, 110, 120)), ("Non-drivable street", (105, 100, 95))]
  if rng.random() < 0.35:
    name, colour = extras[rng.integers(len(extras))]
    y = horizon + rng.uniform(0.4, 0.85) * (h - horizon)
    f0, f1 = (-0.95, 0.95) if name in ("Speed bumper", "Slow drive area") else (1.1, 1.9)
    _lane_strip(scene, x, horizon, f0, f1, name, scene.jitter(colour, 6), y0=y,
                y1=y + 0.05 * h)
  for depth in np.sort(rng.uniform(0.2, 0.95, rng.integers(0, 3))):
    colour = scene.jitter(rng.integers(30, 230, 3), 5)
    _vehicle(scene, x, horizon, rng.choice([-0.6, 0.6]), depth, "Car", colour, 0.75, 0.7)
  for _ in range(rng.integers(1, 5)):
    y = horizon + rng.uniform(0.2, 0.95) * (h - horizon)
    size = (y - horizon) * rng.uniform(0.08, 0.12) + 1
    cx = x(rng.choice([-1, 1]) * rng.uniform(1.2, 2.0), y)
    kind = rng.random()
    if kind < 0.55:
      scene.shape("ellipse", [cx - size * 0.5, y - 3.5 * size, cx + size * 0.5, y],
                  "Pedestrian", scene.jitter(rng.integers(20, 220, 3), 5))
      scene.shape("ellipse", [cx - size * 0.35, y - 4.2 * size, cx + size * 0.35, y - 3.4 * size],
                  "Pedestrian", (200, 160, 130))
    elif kind < 0.8:
      for wheel in (-1, 1):
        scene.shape("ellipse", [cx + wheel * size - size * 0.7, y - 1.4 * size,
                                cx + wheel * size + size * 0.7, y], "Bicycle", (30, 30, 30))
      scene.shape("polygon", [(cx - size, y - 0.7 * size), (cx, y - 2 * size),
                              (cx + size, y - 0.7 * size)], "Bicycle",
                  scene.jitter((180, 40, 40), 30))
    elif kind < 0.9:
      scene.shape("rectangle", [cx - size * 0.6, y - 1.6 * size, cx + size * 0.6, y],
                  "Obstacles / trash", scene.jitter((60, 80, 60), 10))
    else:
      scene.shape("rectangle", [cx - size * 3, y - 2.2 * size, cx + size * 3, y],
                  "Grid structure", scene.jitter((90, 90, 95), 6))
  for side in (-1, 1):
    if rng.random() < 0.7:
      y = horizon + rng.uniform(0.3, 0.8) * (h - horizon)
      signal = rng.random() < 0.6
      _pole_with(scene, x(side * 1.2, y), y, (y - horizon) * 1.6 + 4,
                 "Traffic signal" if signal else "Irrelevant signs",
                 (35, 35, 35) if signal else scene.jitter((170, 170, 175), 10),
                 pole_name="Signal corpus" if signal else "Poles")
  if rng.random() < 0.2:
    y = horizon + rng.uniform(0.4, 0.9) * (h - horizon)
    _lane_strip(scene, x, horizon, 0.3, 0.9, "Road blocks", (220, 60, 50), y0=y - 0.04 * h, y1=y)


def _draw_scene(domain: str, height: int, width: int, rng: np.random.Generator):
  scene = _Scene(height, width, rng)
  gain, haze, tint = rng.uniform(0.85, 1.15), 0.0, rng.uniform(0.92, 1.08, 3)
  if domain == "highway":
    _highway(scene, rng.uniform(0.38, 0.5) * height)
  elif domain == "urban":
    _urban(scene, rng.uniform(0.3, 0.45) * height)
  else:
    # Out of distribution: the two domains mixed, under other light and weather.
    side = rng.choice([-1, 1])
    builder = _highway if rng.random() < 0.5 else _urban
    builder(scene, rng.uniform(0.3, 0.5) * height, mixed_side=side)
    weather = rng.integers(3)
    if weather == 0:    # dusk
      gain, tint = rng.uniform(0.35, 0.6), (0.9, 0.85, 1.15)
    elif weather == 1:  # fog
      haze = rng.uniform(0.35, 0.6)
    else:               # dirt and blur on the lens
      for _ in range(rng.integers(1, 4)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.15) * height
        scene.shape("ellipse", [cx - r, cy - r, cx + r, cy + r],
                    "Rain dirt" if rng.random() < 0.6 else "Blurred area", (110, 105, 95))
  if rng.random() < 0.4:
    scene.shape("ellipse", [-0.1 * width, 0.9 * height, 1.1 * width, 1.3 * height], "Ego car",
                scene.jitter((40, 40, 50), 8))
  return scene.render(gain, haze, tint)


def _write_split(root: Path, splits_dir: Path, domain: str, part: str, count: int,
                 first_frame: int, rng: np.random.Generator, size: Sequence[int]) -> None:
  seq = _RECORDINGS[domain]
  recording = root / f"{seq[:8]}_{seq[8:]}"
  lines = []
  for number in range(first_frame, first_frame + count):
    frame = f"{number:09d}"
    image, label = _draw_scene(domain, size[0], size[1], rng)
    for kind, array in (("camera", image), ("label", label)):
      folder = recording / kind / "cam_front_center"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(array).save(folder / f"{seq}_{kind}_frontcenter_{frame}.png",
                                  compress_level=1)
    lines.append(f"{domain}/{_PARTS[part]}/GT/{seq}_label_frontcenter_{frame}.png")
  (splits_dir / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")


def _remove_abandoned_partials(root: Path) -> None:
  """Deletes `<root>.partial-<pid>` trees whose process is gone (killed mid-write)."""
  for partial in root.parent.glob(root.name + ".partial-*"):
    pid = partial.name.rsplit("-", 1)[-1]
    if pid.isdigit() and not _running(int(pid)):
      shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def generate(root: str | os.PathLike, *, num_train: int = 200, num_val: int = 30,
             num_test: int = 60, image_size: Sequence[int] = (120, 192), seed: int = 0) -> Path:
  """Writes a synthetic A2D2 tree; a no-op if `root` already holds the same one.

  Writes `<root>/class_list.json` (the real 55 colours), the recordings in the A2D2 layout,
  and split lists in the reference format under `<root>/splits/` (highway_{train,val,test},
  urban_{train,val,test}, ambiguous_test). The tree is written to a temporary sibling and
  renamed when complete, so an interrupted run never leaves a tree that looks finished.

  Args:
    root: output directory (must not exist, or hold a tree from the same arguments).
    num_train, num_val, num_test: frames per domain and split (ambiguous: test only).
    image_size: (height, width) of the frames.
    seed: generation seed.

  Returns:
    `root` as a Path.
  """
  root = Path(root)
  params = {"num_train": num_train, "num_val": num_val, "num_test": num_test,
            "image_size": list(image_size), "seed": seed}
  stamp = root / "synthetic.json"
  if root.exists():
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
      return root
    raise DataError(f"{root} exists but is not a synthetic tree made with {params}; "
                    "delete it or choose another data dir.")
  _remove_abandoned_partials(root)
  partial = root.with_name(root.name + f".partial-{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  splits_dir = partial / "splits"
  splits_dir.mkdir(parents=True)
  (partial / "class_list.json").write_text(json.dumps(REFERENCE_CLASS_LIST, indent=1))
  rng_root = np.random.SeedSequence(seed)
  jobs = [(d, p, n) for d in ("highway", "urban") for p, n in
          (("train", num_train), ("val", num_val), ("test", num_test))]
  jobs.append(("ambiguous", "test", num_test))
  first_frame = {}
  for (domain, part, count), child in zip(jobs, rng_root.spawn(len(jobs))):
    start = first_frame.get(domain, 0)
    _write_split(partial, splits_dir, domain, part, count, start,
                 np.random.default_rng(child), image_size)
    first_frame[domain] = start + count
  stamp_tmp = partial / "synthetic.json"
  stamp_tmp.write_text(json.dumps(params))
  os.replace(partial, root)
  return root
