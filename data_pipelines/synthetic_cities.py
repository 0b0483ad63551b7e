"""Procedural street scenes written as the two Cityscapes downloads, so the demo runs the real
loader (TFDS's `cityscapes/semantic_segmentation` builder, then `cityscapes.train_ids`).

`generate` writes `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` in the official
layout: `leftImg8bit/{train,val,test}/<city>/<city>_<seq>_000019_leftImg8bit.png` and, beside
each, `gtFine/<split>/<city>/<id>_gtFine_labelIds.png` (Cityscapes labelIds, uint8) and a
`_gtFine_polygons.json` stub. Frames are small (default 128x256, the 1:2 aspect of 1024x2048);
the builder does not check the size and the loader resizes.

Every one of the 18 training cities has a character (`city_character`): an archetype (harbour,
dense centre, suburb, industrial, tram city, leafy old town) that sets its class mix (which
side blocks line the street, how many of each object a frame holds, tram tracks, bridges,
parking), and its own palette, light, weather and street layout (horizon, vanishing point,
bend, lanes, sidewalks, skyline). Experts trained on groups of cities therefore specialise,
and a gate has something to route on; a car still looks like a car everywhere. Validation and
in-distribution test frames borrow the training characters in turn (`_frame_character`); the
out-of-distribution cities are scenes no training city resembles: a snowy night (leverkusen),
an orange dust storm with buses and motorcycles (mainz), a sodium-lit tunnel with trains
(munich). Texture, shading and noise keep the task from being solvable pixel by pixel.

The characters are fixed tables; the seed drives only the scenes (placement, sizes, noise):
each city draws from its own stream, so the same seed gives byte-identical zips. The default
tree (18 x 12 + 3 x 10 + 6 x 10 = 306 frames at 128x256, 25 MB) takes 5-6 s on one CPU core
(measured on a shared 2-core machine: drawing and rendering ~10 ms a frame, PNG encoding
~5 ms); the tests' trees of 1-2 frames per city take under a second.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import types
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import DataError
from data_pipelines.cityscapes_meta import TRAIN_CITIES, VAL_CITIES
from data_pipelines.synthetic import _remove_abandoned_partials

# The official test cities (cityscapes_meta.TEST_CITIES), cut into in-distribution and OOD.
TEST_CITIES = ("berlin", "bielefeld", "bonn")
OOD_CITIES = ("leverkusen", "mainz", "munich")


class _L:
  """The Cityscapes labelIds drawn here (cityscapesScripts helpers/labels.py)."""
  EGO_VEHICLE, STATIC, DYNAMIC, GROUND, ROAD, SIDEWALK, PARKING = 1, 4, 5, 6, 7, 8, 9
  RAIL_TRACK, BUILDING, WALL, FENCE, GUARD_RAIL, BRIDGE, TUNNEL = 10, 11, 12, 13, 14, 15, 16
  POLE, POLEGROUP, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN = 17, 18, 19, 20, 21, 22
  SKY, PERSON, RIDER, CAR, TRUCK, BUS, CARAVAN, TRAILER = 23, 24, 25, 26, 27, 28, 29, 30
  TRAIN, MOTORCYCLE, BICYCLE = 31, 32, 33


# Every labelId `generate` can write: the 19 evaluated classes and 12 that Cityscapes ignores.
LABEL_IDS_USED: tuple[int, ...] = tuple(sorted(
    value for name, value in vars(_L).items() if name.isupper()))

_STAMP = "synthetic.json"
_README = ("Synthetic street scenes in the layout of the Cityscapes download, written by "
           "moe_jax's data_pipelines/synthetic_cities.py; not Cityscapes data.\n")
# Zip entries get one fixed time, so that the same seed writes byte-identical zips.
_ZIP_TIME = (2016, 1, 1, 0, 0, 0)
# Heights and widths are in metres; a height of _CAMERA_HEIGHT fills the rows from the horizon
# to the bottom edge at depth 1.
_CAMERA_HEIGHT = 2.4
_FAR, _NEAR = 0.04, 3.0  # depths of the far skyline and of the nearest side block
_BLOCKS = 6  # blocks per side of the street
_EGO_COLOUR = (35, 38, 45)

# Std of each labelId's fine noise in grey levels (foliage and gravel rough, sky smooth).
_TEXTURE = np.full(256, 7.0, np.float32)
_TEXTURE[[_L.VEGETATION]] = 30.0
_TEXTURE[[_L.TERRAIN, _L.GROUND, _L.RAIL_TRACK]] = 16.0
_TEXTURE[[_L.ROAD, _L.SIDEWALK, _L.PARKING, _L.BUILDING, _L.WALL]] = 10.0
_TEXTURE[[_L.SKY]] = 3.0

# Shared by every city, so that a car, a bus or a person looks alike everywhere.
_PAINT = ((190, 30, 30), (30, 60, 150), (215, 215, 215), (30, 30, 32), (125, 128, 132),
          (200, 170, 40), (55, 105, 70), (235, 235, 230))
_CLOTHES = ((40, 40, 60), (150, 30, 40), (60, 90, 150), (200, 180, 150), (80, 110, 60),
            (30, 30, 30), (220, 220, 220))
_SKIN = (200, 160, 130)
_GLASS = (55, 65, 78)
_SKIES = {"clear": (120, 170, 230), "overcast": (185, 188, 195), "haze": (200, 205, 215),
          "wet": (160, 165, 175), "night_snow": (14, 18, 38), "dust": (225, 160, 95),
          "tunnel": (255, 250, 235)}


@dataclasses.dataclass(frozen=True)
class CityCharacter:
  """How one city's frames look: its class mix, layout, palette, light and weather.

  Attributes:
    name: the city.
    archetype: "harbour", "dense", "suburban", "industrial", "tram" or "leafy" for the training
      cities; "night_snow", "dust" or "tunnel" for the out-of-distribution ones.
    weather: "clear", "overcast", "haze" (milky far field), "wet" (dark road that mirrors the
      street), or an OOD weather ("night_snow", "dust", "tunnel").
    gain: overall brightness factor.
    tint: (r, g, b) colour factors of the light.
    building, road, sidewalk: (r, g, b) base colours of facades, asphalt and pavement.
    horizon: row of the horizon as a fraction of the frame height (0 top, 1 bottom).
    vanish: column of the road's vanishing point as a fraction of the frame width.
    curve: sideways bend of the road at the horizon as a fraction of the width (0 straight).
    lanes: lanes of the road.
    lane_width: metres per lane.
    sidewalk_width: metres of each sidewalk.
    skyline: mean height of the buildings in metres (the camera is 2.4 m; see `_Street`).
    ego: height of the ego vehicle's bonnet at the bottom edge, fraction of the frame height.
    sides: {kind: share} of the blocks lining the street, by their area in the frame:
      "building", "trees" (terrain with trees), "lawn" (open terrain) or "yard" (gravel
      ground with stacked containers); every frame keeps close to these shares (`_kinds`).
    objects: {kind: mean count per frame} of the objects placed on the street: "car",
      "truck", "bus", "caravan", "trailer", "train", "motorcycle" (with a rider), "bicycle"
      (ridden or parked), "person", "pole" (a street lamp), "sign", "light" (traffic light),
      "polegroup", "static" (bins, benches), "dynamic" (carts, prams), "fence", "wall".
    features: {feature: probability per frame} of "tramway" (track in the road's middle),
      "siding" (a track beside one sidewalk), "parking" (a parking strip), "bridge",
      "guard_rail" and "cobble" (cobbled road).
  """
  name: str
  archetype: str
  weather: str
  gain: float
  tint: tuple[float, float, float]
  building: tuple[int, int, int]
  road: tuple[int, int, int]
  sidewalk: tuple[int, int, int]
  horizon: float
  vanish: float
  curve: float
  lanes: int
  lane_width: float
  sidewalk_width: float
  skyline: float
  ego: float
  sides: Mapping[str, float]
  objects: Mapping[str, float]
  features: Mapping[str, float]

  def __post_init__(self):
    for name in ("sides", "objects", "features"):  # read-only, like the rest
      object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))


def _table(text: str) -> dict[str, list]:
  """{first column: the other columns} of a whitespace-separated table under a header line;
  numbers become int or float."""
  def value(word):
    try:
      return int(word)
    except ValueError:
      try:
        return float(word)
      except ValueError:
        return word
  rows = [line.split() for line in text.strip().splitlines()[1:]]
  return {row[0]: [value(word) for word in row[1:]] for row in rows}


# Archetype: (objects per frame, features per frame).
_ARCHETYPES = {
    "harbour": (
        dict(car=2, truck=1, trailer=0.4, caravan=0.5, bus=0.3, person=1.2, bicycle=1.2,
             motorcycle=0.3, pole=2, sign=1.2, light=0.5, polegroup=0.3, fence=1.2, wall=0.3,
             static=1, dynamic=0.3),
        dict(bridge=0.5, parking=0.3, guard_rail=0.3, siding=0.15)),
    "dense": (
        dict(car=3, truck=0.3, bus=0.6, person=6, bicycle=1.2, motorcycle=0.6, pole=4, sign=2,
             light=3, polegroup=0.8, fence=0.3, wall=0.3, static=2, dynamic=1),
        dict(parking=0.3, bridge=0.1)),
    "suburban": (
        dict(car=4, truck=0.2, caravan=0.5, trailer=0.3, person=1, bicycle=1, motorcycle=0.3,
             pole=1.5, sign=1, light=0.3, polegroup=0.2, fence=1.5, wall=0.8, static=0.8,
             dynamic=0.5),
        dict(parking=0.7, guard_rail=0.1)),
    "industrial": (
        dict(car=1.5, truck=3, trailer=1.2, caravan=0.1, bus=0.1, train=0.6, person=0.4,
             bicycle=0.3, motorcycle=0.2, pole=2.5, sign=1.5, light=0.5, polegroup=0.5, fence=3,
             wall=2, static=1.5, dynamic=0.3),
        dict(siding=0.6, guard_rail=0.6, bridge=0.3, parking=0.2)),
    "tram": (
        dict(car=2, truck=0.3, bus=0.8, train=1.2, person=3.5, bicycle=1.5, motorcycle=0.4,
             pole=3.5, sign=1.2, light=2, polegroup=0.6, fence=0.4, wall=0.4, static=1,
             dynamic=0.6),
        dict(tramway=1, bridge=0.1, parking=0.1)),
    "leafy": (
        dict(car=1.2, bus=0.2, person=3, bicycle=3, motorcycle=0.6, pole=1.5, sign=0.8,
             light=0.6, polegroup=0.2, fence=0.8, wall=1.5, static=1, dynamic=1),
        dict(cobble=0.7, parking=0.2)),
    # Out of distribution.
    "night_snow": (
        dict(car=3, truck=1, person=0.5, pole=4, sign=1, light=1, fence=1, static=0.5),
        dict(parking=0.4, guard_rail=0.4)),
    "dust": (
        dict(car=1, bus=2, truck=1, motorcycle=4, bicycle=1, person=3, pole=1, sign=1,
             static=1, dynamic=1, wall=2),
        dict(tramway=0.3)),
    "tunnel": (
        dict(car=2, bus=1.5, train=1.5, motorcycle=2, truck=0.5, person=0.5, sign=1),
        dict(tramway=1)),
}

_SIDE_KINDS = ("building", "trees", "lawn", "yard")
# Each city's layout: archetype; horizon, vanishing point and bend (fractions of the frame);
# lanes and metres per lane; sidewalk width and skyline height (metres); ego bonnet height
# (fraction of the frame); shares of the side blocks (building, trees, lawn, yard).
_LAYOUTS = _table("""
city            archetype  horizon vanish curve lanes lane sidewalk skyline ego  bldg tree lawn yard
aachen          dense      0.42    0.50   0.00  1     3.5  4        24      0.07 0.85 0.15 0    0
bochum          industrial 0.43    0.50   0.05  3     3.75 1.5      12      0.00 0.5  0.05 0    0.45
bremen          harbour    0.40    0.48   0.10  2     3.5  3        10      0.06 0.35 0.15 0.3  0.2
cologne         dense      0.48    0.45   0.08  3     3.2  4.5      28      0.00 1    0    0    0
darmstadt       suburban   0.41    0.50   0.00  2     3.5  2        8       0.00 0.45 0.45 0.1  0
dusseldorf      harbour    0.46    0.53   0.00  3     3.5  4.5      20      0.00 0.6  0.3  0.1  0
erfurt          tram       0.45    0.50   0.07  4     3.25 2        15      0.06 0.75 0.25 0    0
hamburg         harbour    0.36    0.50   -0.12 4     3.5  2.5      8       0.08 0.2  0.1  0.3  0.4
hanover         industrial 0.37    0.46   -0.10 4     3.75 2        18      0.06 0.8  0.1  0    0.1
jena            leafy      0.37    0.53   0.10  1     3.5  2        11      0.00 0.2  0.7  0.1  0
krefeld         industrial 0.49    0.55   0.00  2     3.75 1.2      10      0.09 0.3  0.1  0.1  0.5
monchengladbach suburban   0.38    0.47   0.12  2     3.75 3        7       0.09 0.3  0.3  0.4  0
strasbourg      tram       0.47    0.54   0.00  2     3.5  4        18      0.00 0.55 0.45 0    0
stuttgart       dense      0.33    0.55   -0.15 3     3    2.5      14      0.05 0.6  0.4  0    0
tubingen        leafy      0.45    0.48   -0.12 1     3.25 2.5      9       0.07 0.6  0.4  0    0
ulm             suburban   0.50    0.52   -0.06 3     3.5  1.5      10      0.05 0.6  0.2  0.2  0
weimar          leafy      0.50    0.50   0.00  2     3    3        12      0.05 0.35 0.2  0.45 0
zurich          tram       0.35    0.47   -0.10 2     3    2.5      20      0.08 0.55 0.15 0.3  0
leverkusen      night_snow 0.42    0.50   0.05  2     3.5  2.5      12      0.06 0.5  0.3  0.2  0
mainz           dust       0.45    0.50   -0.05 2     3.5  3        9       0.00 0.6  0    0.4  0
munich          tunnel     0.44    0.50   0.06  2     3.5  1.2      0       0.05 1    0    0    0
""")

# Each city's look: weather; gain; tint (r g b); building, road and sidewalk colours (r g b).
_LOOKS = _table("""
city            weather    gain tint            building    road        sidewalk
aachen          clear      1.05 1.05 1.00 0.92  190 160 120 92  90  95  165 150 135
bochum          overcast   0.90 0.98 1.00 1.04  120 100 90  80  80  84  140 138 135
bremen          haze       1.00 0.97 1.00 1.05  160 80  60  95  95  100 150 150 150
cologne         clear      1.10 1.04 1.00 0.95  200 195 185 85  85  90  175 170 160
darmstadt       clear      1.00 1.00 1.02 0.98  230 220 200 100 100 104 185 180 170
dusseldorf      wet        0.95 0.96 1.00 1.06  170 175 185 70  72  78  150 150 155
erfurt          clear      1.00 1.06 1.00 0.90  210 180 130 96  94  90  170 160 140
hamburg         overcast   0.92 0.95 1.00 1.07  140 60  50  85  88  92  135 135 140
hanover         haze       1.00 1.00 1.00 1.00  150 150 145 105 105 105 160 158 150
jena            clear      1.08 1.02 1.04 0.94  220 200 170 100 96  92  180 170 155
krefeld         wet        0.88 0.97 1.00 1.03  110 90  80  65  66  70  125 122 120
monchengladbach clear      1.02 1.00 1.00 1.00  180 130 100 98  98  102 170 165 160
strasbourg      clear      1.06 1.06 1.00 0.94  200 150 150 90  90  92  175 165 155
stuttgart       haze       1.04 1.02 1.00 0.97  225 225 215 88  88  92  165 160 150
tubingen        overcast   0.96 1.00 1.02 1.00  215 190 150 110 100 90  155 150 140
ulm             clear      1.00 0.98 1.00 1.02  190 200 210 94  94  98  170 170 170
weimar          overcast   0.98 1.03 1.00 0.96  230 210 160 105 100 95  165 160 150
zurich          wet        0.97 0.98 1.00 1.04  210 205 195 75  76  80  160 160 160
leverkusen      night_snow 0.40 0.75 0.85 1.30  150 140 130 165 165 175 225 225 235
mainz           dust       1.15 1.18 0.95 0.68  215 160 100 175 140 100 200 165 120
munich          tunnel     0.60 1.35 0.85 0.40  170 170 160 80  80  80  140 140 140
""")


def city_character(city: str) -> CityCharacter:
  """The character of a training or out-of-distribution city (fixed; no seed involved).

  Raises:
    DataError: a validation or test city (their frames borrow the training cities' characters
      in turn, see `_frame_character`) or an unknown city.
  """
  if city not in _LAYOUTS:
    if city in VAL_CITIES + TEST_CITIES:
      raise DataError(f"{city!r} has no character of its own: frame i of the k-th city of its "
                      "split takes that of TRAIN_CITIES[(i + 6 k) % 18]")
    raise DataError(f"{city!r} is not a synthetic city; use one of: "
                    f"{', '.join(TRAIN_CITIES + OOD_CITIES)}")
  archetype, horizon, vanish, curve, lanes, lane_width, sidewalk_width, skyline, ego, \
      *shares = _LAYOUTS[city]
  weather, gain, *look = _LOOKS[city]
  tint, building, road, sidewalk = (tuple(look[i:i + 3]) for i in range(0, 12, 3))
  objects, features = _ARCHETYPES[archetype]
  return CityCharacter(
      name=city, archetype=archetype, weather=weather, gain=float(gain),
      tint=tuple(map(float, tint)), building=building, road=road, sidewalk=sidewalk,
      horizon=float(horizon), vanish=float(vanish), curve=float(curve), lanes=lanes,
      lane_width=float(lane_width), sidewalk_width=float(sidewalk_width),
      skyline=float(skyline), ego=float(ego),
      sides={kind: float(p) for kind, p in zip(_SIDE_KINDS, shares) if p},
      objects=objects, features=features)


def _frame_character(city: str, index: int) -> CityCharacter:
  """The character of frame `index` of `city`.

  A training or OOD city has its own. Frame i of the k-th city of VAL_CITIES or TEST_CITIES
  takes that of TRAIN_CITIES[(i + 6 k) % 18]: the three cities of a split start a third of
  the way apart, so ten frames per city cover all 18 training characters.
  """
  for cities in (VAL_CITIES, TEST_CITIES):
    if city in cities:
      offset = cities.index(city) * len(TRAIN_CITIES) // len(cities)
      return city_character(TRAIN_CITIES[(index + offset) % len(TRAIN_CITIES)])
  return city_character(city)


# ------------------------------------------------------------------------------------ drawing


class _Street:
  """One frame being drawn: the appearance and labelId canvases and the street's perspective.

  Depth d > 0 is inverse distance: the ground at depth d is image row
  `horizon + d * (height - horizon)` (d = 1 the bottom row, larger d below the frame). A point
  X metres beside the road's centre line lies in column `centre(d) + X * scale(d)`, and H
  metres above the ground `H * scale(d)` rows higher, where `scale(d)` (pixels per metre) makes
  the camera height, 2.4 m, fill the rows from the horizon to the bottom edge at d = 1.
  """

  def __init__(self, character: CityCharacter, size: Sequence[int], rng: np.random.Generator):
    self.c, self.rng = character, rng
    self.h, self.w = int(size[0]), int(size[1])
    self.image = Image.new("RGB", (self.w, self.h))
    self.label = Image.new("L", (self.w, self.h))
    self._draws = (ImageDraw.Draw(self.image), ImageDraw.Draw(self.label))
    self.horizon = self.h * (character.horizon + rng.uniform(-0.01, 0.01))
    self.vanish = self.w * (character.vanish + rng.uniform(-0.02, 0.02))
    self.bend = self.w * character.curve * rng.uniform(0.8, 1.2)
    self.half = character.lanes * character.lane_width * rng.uniform(0.95, 1.05) / 2
    self.lamps: list[tuple[float, float, float]] = []  # (x, y, radius), lit at night
    self._ground_rows = self.h - self.horizon
    self._metre = self._ground_rows / _CAMERA_HEIGHT  # pixels per metre at depth 1
    self._drift = self.w / 2 - self.vanish

  def row(self, d):
    return self.horizon + d * self._ground_rows

  def scale(self, d):
    return d * self._metre

  def col(self, lateral, d):
    """Column of lateral position `lateral` at depth `d` (floats or arrays)."""
    bend = np.maximum(0, 1 - d) ** 3 if isinstance(d, np.ndarray) else max(0.0, 1 - d) ** 3
    return self.vanish + self.bend * bend + (self._drift + lateral * self._metre) * d

  def jitter(self, rgb, amount: float = 12.0) -> np.ndarray:
    return np.asarray(rgb, np.float64) + self.rng.normal(0, amount, 3)

  def fill(self, kind: str, xy, label: int, colour) -> None:
    """Draws a "polygon", "rectangle" or "ellipse" of labelId `label` in `colour` (r, g, b)."""
    if kind != "polygon":  # PIL wants x0 <= x1 and y0 <= y1
      (x0, y0), (x1, y1) = xy
      xy = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
    else:
      xy = [(float(x), float(y)) for x, y in xy]
    colour = tuple(min(255, max(0, int(v))) for v in colour)
    for draw, value in zip(self._draws, (colour, label)):
      getattr(draw, kind)(xy, fill=value)

  def ground(self, x0: float, x1: float, label: int, colour, d0: float = 0.0,
             d1: float = 1.05) -> None:
    """Ground between lateral positions x0 and x1 (metres) from depth d0 to d1."""
    d = np.linspace(d0, d1, 16)
    y = self.row(d)
    self.fill("polygon", [*zip(self.col(x0, d), y), *zip(self.col(x1, d[::-1]), y[::-1])],
              label, colour)

  def outward(self, lateral: float, d0: float, d1: float, label: int, colour) -> None:
    """Ground from lateral position `lateral` out to the frame's edge on its side."""
    border = -1.0 if lateral < 0 else self.w + 1.0
    d = np.linspace(d0, d1, 12)
    y = self.row(d)
    self.fill("polygon", [*zip(np.clip(self.col(lateral, d), -1, self.w + 1), y),
                          (border, y[-1]), (border, y[0])], label, colour)

  def band(self, lateral: float, d0: float, d1: float, bottom: float, top: float, label: int,
           colour) -> None:
    """A vertical band along the road at `lateral`, `bottom`..`top` metres high (a wall)."""
    d = np.linspace(d0, d1, 12)
    x, y, s = self.col(lateral, d), self.row(d), self.scale(d)
    self.fill("polygon", [*zip(x, y - top * s), *zip(x[::-1], (y - bottom * s)[::-1])],
              label, colour)

  def upright(self, x0: float, x1: float, d: float, bottom: float, top: float, label: int,
              colour, kind: str = "rectangle") -> None:
    """An upright face across the road at depth d: lateral x0..x1, bottom..top metres."""
    y, s = self.row(d), self.scale(d)
    self.fill(kind, [(self.col(x0, d), y - bottom * s), (self.col(x1, d), y - top * s)],
              label, colour)


def _pick(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
  """One key of `weights`, drawn in proportion to its weight."""
  names = sorted(weights)
  p = np.array([weights[n] for n in names], np.float64)
  return names[rng.choice(len(names), p=p / p.sum())]


def _far_skyline(st: _Street) -> None:
  """Distant buildings and trees just above the horizon, across the whole width."""
  rng, c = st.rng, st.c
  edges = np.sort(rng.uniform(0, st.w, rng.integers(4, 9)))
  for x0, x1 in zip([0.0, *edges], [*edges, st.w]):
    kind = _pick(rng, c.sides)
    if kind == "building":
      height = c.skyline * rng.uniform(0.5, 1.3)
      st.fill("rectangle", [(x0, st.row(_FAR) - height * st.scale(_FAR)),
                            (x1, st.horizon + 1)], _L.BUILDING, st.jitter(c.building, 15))
    elif kind == "trees":
      top = st.horizon - rng.uniform(4, 10) * st.scale(_FAR)
      st.fill("ellipse", [(x0, top), (x1, st.horizon + 2 * (st.horizon - top))], _L.VEGETATION,
              st.jitter((70, 110, 50), 10))


def _kinds(rng: np.random.Generator, shares: Mapping[str, float],
           weights: np.ndarray) -> list[str]:
  """A kind for each side block, so that each frame's mix follows the city's `shares`.

  Blocks take their kinds largest first, each at random among the kinds whose unfilled share
  (of the summed `weights`) still holds half the block, in proportion to that share; so
  frames vary, but each stays close to the city's mix.
  """
  names = sorted(shares)
  left = np.array([shares[n] for n in names], np.float64)
  left *= weights.sum() / left.sum()
  kinds = [""] * len(weights)
  for i in np.argsort(-weights, kind="stable"):
    fits = np.where(left >= weights[i] / 2, left, 0.0)
    k = rng.choice(len(names), p=fits / fits.sum()) if fits.any() else int(np.argmax(left))
    left[k] -= weights[i]
    kinds[i] = names[k]
  return kinds


def _sides(st: _Street, outer: Sequence[float]) -> None:
  """The blocks lining both sides of the street beyond lateral positions `outer` (left,
  right), far to near: buildings, trees, lawns or yards as `_kinds` deals them."""
  blocks = []
  for side, lateral in zip((-1, 1), (-outer[0], outer[1])):
    # Depth at which this side leaves the frame; blocks nearer are hidden.
    depths = np.geomspace(_FAR, _NEAR, 64)
    cols = st.col(lateral, depths)
    outside = np.flatnonzero((cols < 0) | (cols > st.w))
    nearest = depths[outside[0]] if len(outside) else _NEAR
    # Blocks of about equal shares of the frame (a share grows as depth squared), so that
    # no single block decides a frame's mix: far blocks are long, near ones short.
    shares = np.cumsum(st.rng.uniform(0.5, 1.5, _BLOCKS))
    edges = np.sqrt(_FAR ** 2 + (nearest ** 2 - _FAR ** 2) * shares / shares[-1])
    for d0, d1 in zip([_FAR, *edges[:-1]], edges):
      if st.rng.random() < 0.2:  # a side street
        d0 += 0.25 * (d1 - d0)
      blocks.append((side, lateral, d0, d1))
  weights = np.array([d1 ** 2 - d0 ** 2 for *_, d0, d1 in blocks])  # ~ share of the frame
  for (side, lateral, d0, d1), kind in zip(blocks, _kinds(st.rng, st.c.sides, weights)):
    _block(st, side, lateral, d0, d1, kind)


def _block(st: _Street, side: int, x: float, d0: float, d1: float, kind: str) -> None:
  """One block of `kind` beside the street at lateral position x from depth d0 to d1."""
  rng, c = st.rng, st.c
  if kind == "building":
    height = c.skyline * rng.uniform(0.8, 1.2)
    d = np.linspace(d0, d1, 12)
    xs, ys = st.col(x, d), st.row(d)
    tops = ys - height * st.scale(d)
    border = -1.0 if side < 0 else st.w + 1.0
    st.fill("polygon", [*zip(xs, tops), (border, tops[-1]), (border, ys[-1]),
                        *zip(xs[::-1], ys[::-1])], _L.BUILDING, st.jitter(c.building, 18))
  elif kind in ("trees", "lawn"):
    st.outward(x, d0, d1, _L.TERRAIN, st.jitter((105, 140, 70), 8))
    for d in (np.sort(rng.uniform(d0, d1, rng.integers(1, 4))) if kind == "trees" else ()):
      lateral = x + side * rng.uniform(0.5, 3)
      height = rng.uniform(7, 11)
      st.upright(lateral - 0.2, lateral + 0.2, d, 0, height * 0.5, _L.VEGETATION,
                 st.jitter((80, 60, 40), 8))
      st.upright(lateral - height * 0.3, lateral + height * 0.3, d, height * 0.35, height,
                 _L.VEGETATION, st.jitter((60, 105, 45), 12), kind="ellipse")
  else:  # yard: gravel with stacked containers
    st.outward(x, d0, d1, _L.GROUND, st.jitter((125, 118, 105), 8))
    for d in np.sort(rng.uniform(d0, d1, rng.integers(1, 3))):
      lateral = x + side * rng.uniform(1, 4)
      st.upright(lateral - 1.3, lateral + 1.3, d, 0, 2.6 * rng.integers(1, 3), _L.STATIC,
                 st.jitter(_PAINT[rng.integers(len(_PAINT))], 10))


# Objects: each draws itself at lateral position x (metres) and depth d.


def _vehicle(st, x, d, label, width, height, colour, glass=0.35):
  st.upright(x - width / 2, x + width / 2, d, 0.25, height, label, colour)
  st.upright(x - width * 0.42, x + width * 0.42, d, height * (1 - glass), height * 0.95,
             label, st.jitter(_GLASS, 6))
  for wheel in (-1, 1):
    centre = x + wheel * (width / 2 - 0.3)
    st.upright(centre - 0.25, centre + 0.25, d, 0, 0.6, label, (25, 25, 25))
    st.upright(centre - 0.15, centre + 0.15, d, 0.55, 0.75, label, (200, 30, 25))  # tail light


def _car(st, x, d):
  _vehicle(st, x, d, _L.CAR, 1.8, 1.5, st.jitter(_PAINT[st.rng.integers(len(_PAINT))], 8))


def _truck(st, x, d):
  _vehicle(st, x, d, _L.TRUCK, 2.5, 3.6, st.jitter((200, 200, 195), 20), glass=0.2)


def _bus(st, x, d):
  _vehicle(st, x, d, _L.BUS, 2.55, 3.1, st.jitter((230, 200, 40), 10), glass=0.55)


def _caravan(st, x, d):
  _vehicle(st, x, d, _L.CARAVAN, 2.3, 2.7, st.jitter((235, 235, 225), 6), glass=0.3)


def _trailer(st, x, d):
  _vehicle(st, x, d, _L.TRAILER, 2.2, 1.6, st.jitter((140, 140, 145), 12), glass=0.0)


def _train(st, x, d):
  _vehicle(st, x, d, _L.TRAIN, 2.65, 3.5, st.jitter((210, 40, 40), 10), glass=0.45)
  st.upright(x - 0.6, x + 0.6, d, 3.5, 4.3, _L.TRAIN, (40, 40, 40))  # pantograph


def _person(st, x, d, label=_L.PERSON, bottom=0.0):
  clothes = st.jitter(_CLOTHES[st.rng.integers(len(_CLOTHES))], 10)
  if label == _L.PERSON:
    for leg in (-1, 1):
      st.upright(x + leg * 0.12 - 0.08, x + leg * 0.12 + 0.08, d, 0, 0.9, label, (35, 35, 45))
  st.upright(x - 0.25, x + 0.25, d, bottom + 0.85, bottom + 1.5, label, clothes, kind="ellipse")
  st.upright(x - 0.12, x + 0.12, d, bottom + 1.45, bottom + 1.75, label, _SKIN, kind="ellipse")


def _motorcycle(st, x, d):
  st.upright(x - 0.35, x + 0.35, d, 0, 1.1, _L.MOTORCYCLE, st.jitter((40, 40, 45), 8))
  st.upright(x - 0.15, x + 0.15, d, 0.6, 0.8, _L.MOTORCYCLE, (200, 30, 25))
  _person(st, x, d, label=_L.RIDER, bottom=0.3)


def _bicycle(st, x, d):
  ridden = abs(x) < st.half  # on the road: ridden; on the sidewalk: parked
  for wheel in (-0.55, 0.55):
    st.upright(x + wheel - 0.33, x + wheel + 0.33, d, 0, 0.66, _L.BICYCLE, (25, 25, 25),
               kind="ellipse")
  st.upright(x - 0.5, x + 0.5, d, 0.35, 0.8, _L.BICYCLE, st.jitter((180, 40, 40), 30))
  if ridden:
    _person(st, x, d, label=_L.RIDER, bottom=0.1)


def _pole(st, x, d, label=_L.POLE, height=None):
  height = height or st.rng.uniform(4, 7)
  st.upright(x - 0.1, x + 0.1, d, 0, height, label, st.jitter((115, 115, 120), 8))
  return height


def _lamp(st, x, d):
  height = _pole(st, x, d)
  st.upright(x - 0.35, x + 0.35, d, height - 0.25, height, _L.POLE, (90, 90, 95))
  st.lamps.append((st.col(x, d), st.row(d) - height * st.scale(d), 0.8 * st.scale(d) + 1))


def _sign(st, x, d):
  height = _pole(st, x, d, height=st.rng.uniform(2.2, 3.2))
  style = st.rng.integers(3)
  colour = ((200, 30, 30), (30, 70, 170), (240, 200, 30))[style]
  st.upright(x - 0.38, x + 0.38, d, height - 0.2, height + 0.55, _L.TRAFFIC_SIGN, colour,
             kind="ellipse" if style == 0 else "rectangle")
  st.upright(x - 0.2, x + 0.2, d, height - 0.02, height + 0.35, _L.TRAFFIC_SIGN, (235, 235, 235))


def _light(st, x, d):
  height = _pole(st, x, d, height=st.rng.uniform(3, 4.5))
  st.upright(x - 0.2, x + 0.2, d, height - 0.9, height, _L.TRAFFIC_LIGHT, (30, 30, 30))
  lit = st.rng.integers(3)
  for k, colour in enumerate(((230, 40, 30), (240, 190, 30), (40, 220, 90))):
    st.upright(x - 0.11, x + 0.11, d, height - 0.28 * k - 0.3, height - 0.28 * k - 0.08,
               _L.TRAFFIC_LIGHT, colour if k == lit else (60, 60, 60), kind="ellipse")


def _polegroup(st, x, d):
  height = st.rng.uniform(3, 5)
  for k in range(st.rng.integers(2, 4)):
    _pole(st, x + 0.35 * k, d, label=_L.POLEGROUP, height=height - 0.3 * k)
  st.upright(x - 0.3, x + 0.9, d, height - 1.1, height - 0.5, _L.TRAFFIC_SIGN, (235, 235, 235))


def _static(st, x, d):
  if st.rng.random() < 0.5:  # a bin
    st.upright(x - 0.3, x + 0.3, d, 0, 1.0, _L.STATIC, st.jitter((50, 90, 60), 10))
  else:  # a bench
    st.upright(x - 0.8, x + 0.8, d, 0.4, 0.9, _L.STATIC, st.jitter((110, 80, 50), 10))


def _dynamic(st, x, d):
  st.upright(x - 0.35, x + 0.35, d, 0.2, 1.0, _L.DYNAMIC, st.jitter((70, 70, 140), 20))
  st.upright(x - 0.3, x + 0.3, d, 0, 0.25, _L.DYNAMIC, (30, 30, 30))


_DRAW = {"car": _car, "truck": _truck, "bus": _bus, "caravan": _caravan, "trailer": _trailer,
         "train": _train, "motorcycle": _motorcycle, "bicycle": _bicycle, "person": _person,
         "pole": _lamp, "sign": _sign, "light": _light, "polegroup": _polegroup,
         "static": _static, "dynamic": _dynamic}
_ROAD_KINDS = ("car", "truck", "bus", "caravan", "trailer", "motorcycle")


def _place(st: _Street, kind: str, tracks: Sequence[float], curb: Sequence[float],
           walk: float) -> float | None:
  """Lateral position of a new `kind` object, or None where the frame has no place for it."""
  rng, side = st.rng, _side_sign(st.rng)
  if kind == "train":
    return float(rng.choice(tracks)) if tracks else None
  if kind == "bicycle" and rng.random() < 0.6:  # ridden along the road's edge
    return side * (st.half - 0.6)
  if kind in _ROAD_KINDS:
    return -st.half + st.c.lane_width * (rng.integers(st.c.lanes) + 0.5) + rng.normal(0, 0.2)
  if kind == "person" and rng.random() < 0.1:  # crossing
    return rng.uniform(-st.half, st.half)
  inner = curb[(side + 1) // 2]
  if kind in ("pole", "sign", "light", "polegroup"):
    return side * (inner + 0.4)
  return side * (inner + rng.uniform(0.4, max(0.5, walk - 0.4)))


def _side_sign(rng: np.random.Generator) -> int:
  """-1 (left) or +1 (right), evenly."""
  return 1 if rng.random() < 0.5 else -1


def _draw_street(st: _Street) -> None:
  """Draws the frame back to front: sky, far skyline, ground, side blocks, road and its
  markings and tracks, walls and fences, then the objects far to near, then the ego bonnet."""
  rng, c = st.rng, st.c
  has = {name: rng.random() < p for name, p in sorted(c.features.items())}
  sky = _SKIES[c.weather]
  st.fill("rectangle", [(0, 0), (st.w, st.h)], _L.SKY, st.jitter(sky, 6))
  if c.archetype != "tunnel":
    _far_skyline(st)
  st.fill("rectangle", [(0, st.horizon), (st.w, st.h)], _L.SIDEWALK, st.jitter(c.sidewalk, 6))
  walk = c.sidewalk_width * rng.uniform(0.8, 1.2)
  parking = [has.get("parking", False) and rng.random() < 0.6 for _ in (0, 1)]
  curb = [st.half + 2.4 * p for p in parking]  # inner edge of the left / right sidewalk
  siding = _side_sign(rng) if has.get("siding") else 0
  if c.archetype == "tunnel":
    _tunnel(st, walk)
  else:
    _sides(st, [curb[k] + walk + (4.5 if side == siding else 0)
                for k, side in enumerate((-1, 1))])
  road = st.jitter(c.road, 5) * (0.7 if c.weather == "wet" else 1)
  st.ground(-st.half, st.half, _L.ROAD, road)
  for k, side in enumerate((-1, 1)):
    if parking[k]:
      st.ground(side * st.half, side * curb[k], _L.PARKING, st.jitter((120, 115, 125), 6))
    st.ground(side * (curb[k] - 0.1), side * (curb[k] + 0.15), _L.SIDEWALK, (180, 180, 175))
  for boundary in -st.half + c.lane_width * np.arange(1, c.lanes):
    for start in np.arange(rng.uniform(0, 0.1), 1.0, 0.16):
      st.ground(boundary - 0.08, boundary + 0.08, _L.ROAD, (225, 225, 215),
                d0=start ** 2, d1=(start + 0.07) ** 2)
  tracks = []
  if has.get("tramway"):
    tracks.append(0.0)
  if siding:
    tracks.append(siding * (curb[(siding + 1) // 2] + walk + 2.2))
  for centre in tracks:
    st.ground(centre - 1.2, centre + 1.2, _L.RAIL_TRACK, st.jitter((110, 100, 90), 6))
    for rail in (-0.72, 0.72):
      st.ground(centre + rail - 0.05, centre + rail + 0.05, _L.RAIL_TRACK, (175, 175, 180))
  if has.get("guard_rail"):
    side = _side_sign(rng)
    d0 = rng.uniform(0.05, 0.3)
    st.band(side * (st.half + 0.3), d0, 1.5, 0.3, 0.8, _L.GUARD_RAIL, (170, 172, 178))
  for kind, wall in (("fence", _L.FENCE), ("wall", _L.WALL)):
    for _ in range(rng.poisson(c.objects.get(kind, 0))):
      side = _side_sign(rng)
      z0 = rng.uniform(2, 15)
      colour = (95, 100, 95) if wall == _L.FENCE else st.jitter((150, 140, 125), 15)
      st.band(side * (curb[(side + 1) // 2] + walk), 1 / z0, 1 / max(0.4, z0 - rng.uniform(2, 6)),
              0, rng.uniform(1, 2.2), wall, colour)
  items = []
  for kind in sorted(_DRAW):
    for _ in range(rng.poisson(c.objects.get(kind, 0))):
      lateral = _place(st, kind, tracks, curb, walk)
      if lateral is not None:
        items.append((1 / rng.uniform(1.6, 10), kind, lateral))
  if has.get("bridge"):
    items.append((rng.uniform(0.08, 0.3), "bridge", 0.0))
  for d, kind, lateral in sorted(items):  # far to near
    if kind == "bridge":
      _bridge(st, d, curb, walk)
    else:
      _DRAW[kind](st, lateral, d)
  if c.ego:
    height = c.ego * st.h * rng.uniform(0.9, 1.1)
    st.fill("ellipse", [(-0.15 * st.w, st.h - height), (1.15 * st.w, st.h + 2 * height)],
            _L.EGO_VEHICLE, _EGO_COLOUR)


def _bridge(st: _Street, d: float, curb: Sequence[float], walk: float) -> None:
  """A bridge crossing the street at depth d: deck and two piers."""
  colour = st.jitter((140, 135, 125), 8)
  y, s = st.row(d), st.scale(d)
  st.fill("rectangle", [(0, y - 8 * s), (st.w, y - 5.5 * s)], _L.BRIDGE, colour)
  for side, inner in zip((-1, 1), curb):
    x = side * (inner + walk * 0.5)
    st.upright(x - 0.6, x + 0.6, d, 0, 5.5, _L.BRIDGE, colour)


def _tunnel(st: _Street, walk: float) -> None:
  """Tunnel walls and ceiling over everything but the exit, far away at the vanishing point."""
  exit_depth = st.rng.uniform(0.06, 0.12)
  wall = st.half + walk
  sky = _SKIES["tunnel"]
  st.fill("rectangle", [(0, 0), (st.w, st.h)], _L.TUNNEL, st.jitter((120, 115, 105), 8))
  st.upright(-wall, wall, exit_depth, 0, 5, _L.SKY, sky)
  st.ground(-wall, wall, _L.SIDEWALK, st.jitter(st.c.sidewalk, 6), d0=exit_depth)
  for d in np.linspace(exit_depth, 1.2, 7)[1:]:  # ceiling lights
    st.upright(-0.8, 0.8, d, 4.8, 5.0, _L.TUNNEL, (255, 240, 200))


# ----------------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, size: Sequence[int], cell: int, std: float):
  """float32 [H, W] noise of std `std` that varies over about `cell` pixels."""
  h, w = size
  small = rng.normal(0, std, (h // cell + 2, w // cell + 2)).astype(np.float32)
  return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR))


@functools.lru_cache(maxsize=8)
def _patterns(h: int, w: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(rows int [H, 1], cols int [1, W], {name: bool [H, W]}) of the texture patterns: windows
  (buildings), a lattice (fences), tiles (sidewalks) and stones (cobbled roads)."""
  rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
  step = max(3, h // 24)
  masks = {
      "windows": (rows % (2 * step) < step) & (cols % (2 * step) < step),
      "lattice": ((rows + cols) % 4 == 0) | ((rows - cols) % 4 == 0),
      "tiles": (rows % (step + 2) == 0) | (cols % (2 * step + 2) == 0),
      "stones": ((rows // 2 + cols // 3) % 2).astype(bool),
  }
  return rows, cols, masks


def _render(character: CityCharacter, rng: np.random.Generator,
            size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Draws and renders one frame of `character`.

  Args:
    character: the city's look (`city_character`, `_frame_character`).
    rng: the scene's random stream (advanced).
    size: (height, width).

  Returns:
    (image uint8 [H, W, 3], label uint8 [H, W] Cityscapes labelIds from LABEL_IDS_USED).
  """
  st = _Street(character, size, rng)
  _draw_street(st)
  h, w = st.h, st.w
  label = np.asarray(st.label)
  image = np.asarray(st.image, np.float32)
  rows, cols, masks = _patterns(h, w)
  # Patterns that identify a class by more than its colour.
  pattern = np.ones((h, w), np.float32)
  for labels, mask, factor in ((_L.BUILDING, "windows", 0.5), (_L.FENCE, "lattice", 0.45),
                               (_L.SIDEWALK, "tiles", 0.85), (_L.ROAD, "stones", 0.72)):
    if labels != _L.ROAD or rng.random() < character.features.get("cobble", 0):
      pattern[(label == labels) & masks[mask]] = factor
  image *= pattern[..., None]
  texture = rng.standard_normal((h, w), np.float32)
  texture *= _TEXTURE[label]
  texture += _smooth_noise(rng, (h, w), 8, 10)
  image += texture[..., None]
  weather = character.weather
  ground = np.isin(label, (_L.ROAD, _L.SIDEWALK, _L.PARKING, _L.TERRAIN, _L.GROUND))
  if weather == "wet":  # the road mirrors what stands above it
    mirror = image[np.clip(2 * int(st.horizon) - rows[:, 0], 0, h - 1)]
    road = (label == _L.ROAD)[..., None]
    image = np.where(road, 0.65 * image + 0.35 * mirror, image)
  elif weather == "night_snow":  # snow on the ground
    image = np.where(ground[..., None], 0.4 * image + 0.6 * 235, image)
  # Light: brighter towards the bottom, the city's gain and tint.
  image *= np.linspace(0.92, 1.08, h, dtype=np.float32)[:, None, None] * (
      character.gain * np.asarray(character.tint, np.float32))
  if weather == "overcast":
    image = 0.85 * image + 0.15 * 120
  haze = {"haze": 0.35, "dust": 0.55}.get(weather, 0.0)
  if haze:
    colour = np.array((205, 150, 90) if weather == "dust" else (205, 205, 212), np.float32)
    far = np.exp(-np.abs(rows - st.horizon) / (0.3 * h))[..., None]
    amount = haze * (0.5 + 0.5 * far)
    image = (1 - amount) * image + amount * colour
  if weather == "night_snow":
    for x, y, radius in st.lamps:
      glow = np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * radius ** 2))
      image += 160 * glow[..., None] * np.array((1.0, 0.85, 0.55), np.float32)
    flakes = rng.random((h, w)) < 0.01
    image[flakes] = 230
  noise = rng.standard_normal(image.shape, np.float32)
  noise *= 3
  image += noise
  return np.clip(image, 0, 255, out=image).astype(np.uint8), label.copy()


# ------------------------------------------------------------------------------------ writing


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


def _put(archive: zipfile.ZipFile, name: str, data: bytes | str) -> None:
  info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
  info.external_attr = 0o644 << 16
  archive.writestr(info, data)


def _frames(train_frames: int, val_frames: int, test_frames: int):
  """[(split, city, frames)] in the zips' (sorted) order."""
  jobs = [("train", city, train_frames) for city in TRAIN_CITIES]
  jobs += [("val", city, val_frames) for city in VAL_CITIES]
  jobs += [("test", city, test_frames) for city in TEST_CITIES + OOD_CITIES]
  return sorted(jobs)


def _write_zips(folder: Path, jobs, size: Sequence[int], seed: int) -> None:
  cities = TRAIN_CITIES + VAL_CITIES + TEST_CITIES + OOD_CITIES
  with zipfile.ZipFile(folder / "leftImg8bit_trainvaltest.zip", "w") as images, \
       zipfile.ZipFile(folder / "gtFine_trainvaltest.zip", "w") as labels:
    _put(images, "README", _README)
    _put(labels, "README", _README)
    for split, city, count in jobs:
      rng = np.random.default_rng([seed, cities.index(city)])
      for index in range(count):
        image, label = _render(_frame_character(city, index), rng, size)
        frame = f"{city}_{index:06d}_000019"
        _put(images, f"leftImg8bit/{split}/{city}/{frame}_leftImg8bit.png", _png(image))
        gt = f"gtFine/{split}/{city}/{frame}_gtFine"
        _put(labels, f"{gt}_labelIds.png", _png(label))
        _put(labels, f"{gt}_polygons.json", json.dumps(
            {"imgHeight": int(size[0]), "imgWidth": int(size[1]), "objects": []}))


def generate(root: str | os.PathLike, *, train_frames: int = 12, val_frames: int = 10,
             test_frames: int = 10, image_size: Sequence[int] = (128, 256),
             seed: int = 0) -> Path:
  """Writes synthetic cities as the two Cityscapes zips; a no-op if `root` already holds them.

  Writes `<root>/leftImg8bit_trainvaltest.zip` and `<root>/gtFine_trainvaltest.zip` in the
  official layout (see the module docstring) and the stamp `<root>/synthetic.json`. The
  "train" split holds the 18 training cities (`cityscapes_meta.TRAIN_CITIES`), "val" holds
  VAL_CITIES and "test" holds TEST_CITIES and OOD_CITIES, all labelled. The tree is written to
  a temporary sibling `<root>.partial-<pid>` and renamed when complete, so an interrupted run
  never leaves a tree that looks finished; the next run removes a killed run's sibling.

  Args:
    root: output directory (must not exist, or hold a tree from the same arguments).
    train_frames: frames per training city.
    val_frames: frames per validation city.
    test_frames: frames per test city and per OOD city.
    image_size: (height, width) of the frames; Cityscapes' are 1024x2048.
    seed: seed of the scenes (the cities' characters do not depend on it).

  Returns:
    `root` as a Path.

  Raises:
    DataError: `root` holds something else; a frame count below 1 or a size below 16x32.
  """
  root = Path(root)
  params = {"layout": "cityscapes", "train_frames": train_frames, "val_frames": val_frames,
            "test_frames": test_frames, "image_size": [int(v) for v in image_size],
            "seed": seed}
  if min(train_frames, val_frames, test_frames) < 1 or len(image_size) != 2 or \
     image_size[0] < 16 or image_size[1] < 32:
    raise DataError(f"synthetic cities {params}: give at least one frame per city and an "
                    "image_size (height, width) of at least (16, 32)")
  stamp = root / _STAMP
  if root.exists():
    if not (stamp.is_file() and json.loads(stamp.read_text()) == params):
      raise DataError(f"{root} exists but is not a synthetic Cityscapes tree made with "
                      f"{params}; delete it or choose another data dir.")
    return root
  _remove_abandoned_partials(root)
  partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    _write_zips(partial, _frames(train_frames, val_frames, test_frames), image_size, seed)
    (partial / _STAMP).write_text(json.dumps(params))
    os.replace(partial, root)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return root
