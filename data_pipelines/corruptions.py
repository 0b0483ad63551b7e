"""ImageNet-C corruptions (Hendrycks & Dietterich, 2019) for robustness evaluation.

Every corruption maps a uint8 [H, W, 3] image of any size to a uint8 [H, W, 3] image at a
severity 1..5, using numpy, scipy.ndimage and PIL only. The `imagecorruptions` package is not
used: it breaks on numpy 2 and current scikit-image.

The severity constants are ImageNet-C's own. They were tuned for 224x224 images, so blur radii,
the pixelate factor's box sizes and the fog's feature sizes mean something different on other
image sizes; they are deliberately not rescaled, so that numbers stay comparable with the
literature.

Where this module differs from the reference code:
  * Outputs are rounded to the nearest integer, not truncated, so that identity-like cases
    (a constant image under `contrast`) map exactly onto themselves.
  * `motion_blur` uses the line kernel that `imagecorruptions` re-implemented from
    ImageMagick's motion blur (the reference calls Wand), applied by convolution.
  * `fog`'s plasma fractal is the smallest power of two covering the image, cropped to it
    (256 for 224x224 inputs, as in the reference).
  * `pixelate` shrinks each side by the factor of the image's own size instead of 224.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import scipy.ndimage
from PIL import Image

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _to_unit(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float64 [H, W, 3] in [0, 1]."""
  return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """float [H, W, 3] on the [0, 1] scale -> uint8 [H, W, 3], clipped and rounded."""
  return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _correlate(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
  """Correlates every channel with one odd-sized kernel (what cv2.filter2D does).

  FFT rather than scipy.ndimage.correlate because motion-blur kernels reach 81x81, which is
  slow as a direct sum on 912x912 images.

  Args:
    x: float [H, W, C].
    kernel: float [kh, kw], both odd; its centre is aligned with the output pixel.
    pad_mode: `np.pad` mode for the border: "reflect" is OpenCV's default BORDER_REFLECT_101,
      "edge" replicates the border pixel.

  Returns:
    float [H, W, C].
  """
  kh, kw = kernel.shape
  padded = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode=pad_mode)
  shape = padded.shape[:2]
  # Correlation is convolution with the flipped kernel. The padded size leaves room for the
  # kernel's full support, so the circular wrap-around only touches the discarded margin.
  spectrum = np.fft.rfft2(padded, s=shape, axes=(0, 1))
  spectrum *= np.fft.rfft2(kernel[::-1, ::-1], s=shape)[..., None]
  full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
  return full[kh - 1:, kw - 1:]


def _opencv_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
  """cv2.getGaussianKernel(size, sigma) for sigma > 0: float [size], sums to 1."""
  offsets = np.arange(size) - (size - 1) / 2
  weights = np.exp(-offsets**2 / (2 * sigma**2))
  return weights / weights.sum()


def _disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
  """ImageNet-C's anti-aliased disk for defocus blur: float [k, k] with k = max(17, 2r+1).

  The reference smooths the hard disk with cv2.GaussianBlur (3x3 up to radius 8, 5x5 above),
  reproduced here with the same reflect-101 border. Like the reference, the result is not
  renormalised: for radius >= 8 the disk touches the border, the reflection adds mass and the
  kernel sums to about 1.01, brightening the image by about 1%.
  """
  half = max(8, radius)
  offsets = np.arange(-half, half + 1)
  y, x = np.meshgrid(offsets, offsets, indexing="ij")
  disk = (x**2 + y**2 <= radius**2).astype(np.float64)
  disk /= disk.sum()
  gauss = _opencv_gaussian_kernel(3 if radius <= 8 else 5, alias_blur)
  return _correlate(disk[..., None], np.outer(gauss, gauss), "reflect")[..., 0]


def _motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
  """One-sided Gaussian-weighted line of 2r+1 taps at `angle_deg`: float [4r+1, 4r+1].

  Tap i samples the pixel i steps back along the angle, as ImageMagick's motion blur does,
  with weight exp(-i^2 / (2 sigma^2)), normalised to sum to 1.
  """
  width = 2 * radius + 1
  steps = np.arange(width)
  weights = np.exp(-steps**2 / (2 * sigma**2))
  weights /= weights.sum()
  angle = np.deg2rad(angle_deg)
  dy = -np.ceil(steps * np.sin(angle) - 0.5).astype(int)
  dx = -np.ceil(steps * np.cos(angle) - 0.5).astype(int)
  centre = width - 1
  kernel = np.zeros((2 * width - 1, 2 * width - 1))
  # Output pixel p averages input pixels p - (dy, dx); in correlation terms that is the kernel
  # entry at centre - (dy, dx). add.at because rounding may send two taps to one entry.
  np.add.at(kernel, (centre - dy, centre - dx), weights)
  return kernel


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
  """ImageNet-C's diamond-square plasma fractal: float [size, size] in [0, 1].

  Args:
    size: a power of two.
    decay: factor by which the random displacement shrinks at each finer level.
    rng: source of the displacements.
  """
  fractal = np.zeros((size, size))
  step = size
  wibble = 100.0

  def wibbled_mean(corner_sum):
    # `wibble * uniform(-wibble, wibble)` squares the amplitude; kept, since the reference's
    # fog appearance depends on it.
    return corner_sum / 4 + wibble * rng.uniform(-wibble, wibble, corner_sum.shape)

  while step >= 2:
    half = step // 2
    corners = fractal[0::step, 0::step]
    square_sum = corners + np.roll(corners, -1, axis=0)
    square_sum += np.roll(square_sum, -1, axis=1)
    fractal[half::step, half::step] = wibbled_mean(square_sum)

    centres = fractal[half::step, half::step]
    row_sum = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
    fractal[0::step, half::step] = wibbled_mean(row_sum)
    column_sum = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
    fractal[half::step, 0::step] = wibbled_mean(column_sum)

    step = half
    wibble /= decay
  fractal -= fractal.min()
  return fractal / fractal.max()


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Adds N(0, c^2) noise on the [0, 1] scale. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  c = [0.08, 0.12, 0.18, 0.26, 0.38][severity - 1]
  x = _to_unit(image)
  return _to_uint8(x + rng.normal(scale=c, size=x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Poisson noise with c photons at full scale. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  c = [60, 25, 12, 5, 3][severity - 1]
  return _to_uint8(rng.poisson(_to_unit(image) * c) / c)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Salt-and-pepper noise: a fraction `amount` of the values becomes 0 or 255 (half each).

  Values are chosen independently per channel, like skimage's random_noise(mode="s&p").
  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
  flipped = rng.random(image.shape) <= amount
  salt = rng.random(image.shape) <= 0.5
  out = image.copy()
  out[flipped & salt] = 255
  out[flipped & ~salt] = 0
  return out


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Convolves with an anti-aliased disk of radius r px. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  del rng
  radius, alias_blur = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][severity - 1]
  return _to_uint8(_correlate(_to_unit(image), _disk_kernel(radius, alias_blur), "reflect"))


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Blurs along a line at a uniform random angle in [-45, 45] degrees.

  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][severity - 1]
  kernel = _motion_kernel(radius, sigma, rng.uniform(-45, 45))
  return _to_uint8(_correlate(_to_unit(image), kernel, "edge"))


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Gaussian blur with sigma c px, border replicated. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  del rng
  sigma = [1, 2, 3, 4, 6][severity - 1]
  # skimage.filters.gaussian, which the reference calls, is this scipy call.
  return _to_uint8(scipy.ndimage.gaussian_filter(_to_unit(image), sigma=(sigma, sigma, 0),
                                                 mode="nearest", truncate=4.0))


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Adds a plasma-fractal haze, then rescales to the image's former maximum.

  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
  height, width = image.shape[:2]
  size = 1 << max(1, (max(height, width) - 1).bit_length())
  haze = _plasma_fractal(size, decay, rng)[:height, :width, None]
  x = _to_unit(image)
  peak = x.max()
  return _to_uint8((x + strength * haze) * peak / (peak + strength))


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Adds c to the HSV value channel (clipped to 1), keeping hue and saturation.

  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  del rng
  c = [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
  x = _to_unit(image)
  value = x.max(axis=-1, keepdims=True)
  new_value = np.minimum(value + c, 1.0)
  # With hue and saturation fixed, HSV->RGB is linear in the value, so the HSV round trip of
  # the reference reduces to scaling. Black has saturation 0 and becomes grey.
  scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
  return _to_uint8(np.where(value > 0, x * scale, new_value))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Scales each channel's deviations from its spatial mean by c.

  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  del rng
  c = [0.4, 0.3, 0.2, 0.1, 0.05][severity - 1]
  x = _to_unit(image)
  mean = x.mean(axis=(0, 1), keepdims=True)
  return _to_uint8((x - mean) * c + mean)


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Round trip through PIL's JPEG encoder at quality q. uint8 [H, W, 3] -> uint8 [H, W, 3]."""
  del rng
  quality = [25, 18, 15, 10, 7][severity - 1]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  buffer.seek(0)
  with Image.open(buffer) as decoded:
    return np.asarray(decoded.convert("RGB"))


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
  """Box-downsamples each side by factor c, then box-upsamples back.

  uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  del rng
  c = [0.6, 0.5, 0.4, 0.3, 0.25][severity - 1]
  height, width = image.shape[:2]
  small = (max(1, int(width * c)), max(1, int(height * c)))
  pil = Image.fromarray(image).resize(small, Image.Resampling.BOX)
  return np.asarray(pil.resize((width, height), Image.Resampling.BOX))


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "gaussian_blur": gaussian_blur,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "jpeg_compression": jpeg_compression,
    "pixelate": pixelate,
}


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
  """Applies one named corruption; the same seed gives the same output.

  Args:
    image: uint8 [H, W, 3], any H, W >= 1.
    name: a key of `CORRUPTIONS`.
    severity: 1 (mild) .. 5 (strong).
    seed: seed of the corruption's random draws (ignored by deterministic corruptions).

  Returns:
    uint8 [H, W, 3].

  Raises:
    ValueError: unknown name, severity outside 1..5, or image not uint8 [H, W, 3].
  """
  if name not in CORRUPTIONS:
    raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
  if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
      or not 1 <= severity <= 5:
    raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(f"image must be uint8 [H, W, 3] with H, W >= 1, got {image.dtype} "
                     f"{list(image.shape)}")
  return CORRUPTIONS[name](image, int(severity), np.random.default_rng(seed))
