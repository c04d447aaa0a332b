"""Pure per-image preprocessing (the authors' corpus preparation): foreground crop, in-plane resize, statistics, [0, 1] scaling.

Everything works on depth-first ``(C, D, H, W)`` arrays. The stored form is quantised: ``q = round(x * levels)``
with ``levels`` chosen so that one level is at most one unit of an integer source (at most 4095 levels, i.e.
finer than float16 above 0.25), stored as uint8 when ``levels <= 255`` and uint16 otherwise; ``x = q / levels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pumit_nnunet.errors import DataError

MAX_INPLANE = 512
PERCENTILES = (0.5, 99.5)
MAX_LEVELS = 4095
NATURAL_LEVELS = 255


@dataclass(frozen=True)
class IntensityStats:
    """Statistics of one image before scaling (percentiles over voxels above the minimum, as the original)."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    p0_5: float
    p99_5: float


def percentiles_above_min(array: np.ndarray, q: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """Percentiles over the voxels strictly above the minimum (the background of most scans is the minimum)."""
    flat = array.reshape(-1)
    lowest = flat.min()
    above = flat[flat > lowest]
    if above.size == 0:
        return float(lowest), float(lowest)
    low, high = np.percentile(above, q)
    return float(low), float(high)


def foreground_bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a boolean ``(D, H, W)`` mask as slices; the whole array when the mask is empty."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, mask.shape[axis]))
    return tuple(slices)


def crop_foreground(array: np.ndarray, natural: bool) -> np.ndarray:
    """Crop ``(C, D, H, W)`` to voxels where every channel is above 0 (natural images) or above its own 0.5th
    percentile (scans): the authors' ``ValueBasedCropper`` takes ``all`` over channels (``process.py``)."""
    mask = np.ones(array.shape[1:], dtype=bool)
    for channel in array:
        mask &= channel > (0 if natural else percentiles_above_min(channel)[0])
    return array[(slice(None), *foreground_bbox(mask))]


def antialias_sigma(in_size: int, out_size: int) -> float:
    """skimage's (and MONAI ``Resize(anti_aliasing=True)``'s) Gaussian sigma for a downscale: max(0, (f - 1) / 2)."""
    return max(0.0, (in_size / out_size - 1.0) / 2.0)


def _gaussian_area(tensor, size: tuple[int, int]):
    """MONAI's erf-integrated Gaussian (truncated at 4 sigma, zero padding) in-plane, then area interpolation:
    what the authors' ``mt.Resize(..., anti_aliasing=True)`` does to the two in-plane axes (depth is not resized)."""
    import torch.nn.functional as F
    from monai.networks.layers.simplelayers import GaussianFilter

    sigma = [antialias_sigma(n, m) for n, m in zip(tensor.shape[2:], size)]
    smoothed = GaussianFilter(2, sigma).to(tensor.dtype)(tensor) if max(sigma) > 0 else tensor
    return F.interpolate(smoothed, size=size, mode="area")


def resize_inplane(array: np.ndarray, spacing: tuple[float, float, float], max_size: int = MAX_INPLANE,
                   natural: bool = False) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Shrink the shorter in-plane side to ``max_size`` when larger; spacing follows.

    Scans: Gaussian anti-aliasing then area, at ``round(side * r)`` (``process.py`` ``process_image``). Natural
    images: torchvision's ``Resize(512, antialias=True)`` (bilinear with antialiasing, long side ``int(512 * l / s)``),
    as the authors' ``NaturalImageLoaderMixin``."""
    import torch
    import torch.nn.functional as F

    c, d, h, w = array.shape
    if min(h, w) <= max_size:
        return array, spacing
    ratio = max_size / min(h, w)
    if natural:
        size = (max_size, int(max_size * w / h)) if h <= w else (int(max_size * h / w), max_size)
    else:
        size = (max(round(h * ratio), 1), max(round(w * ratio), 1))
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(c * d, 1, h, w)
    if natural:
        resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    else:
        resized = _gaussian_area(tensor, size)
    resized = resized.reshape(c, d, *size).numpy()
    return resized, (spacing[0], spacing[1] * h / size[0], spacing[2] * w / size[1])


def intensity_stats(array: np.ndarray) -> IntensityStats:
    low, high = percentiles_above_min(array)
    values = array.astype(np.float64, copy=False)
    return IntensityStats(float(values.mean()), float(np.median(values)), float(values.std()),
                          float(values.min()), float(values.max()), low, high)


def choose_levels(low: float, high: float, integer_source: bool) -> int:
    """Quantisation levels: one per source unit for integer data (between 255 and 4095), else 4095."""
    if not integer_source:
        return MAX_LEVELS
    return int(np.clip(round(high - low), NATURAL_LEVELS, MAX_LEVELS))


def quantise(array: np.ndarray, low: float, high: float, levels: int) -> np.ndarray:
    """Scale ``[low, high]`` to ``[0, 1]`` (clipped) and store ``round(x * levels)`` in the smallest uint type."""
    if not high > low:
        raise DataError(f"constant image: intensity range [{low}, {high}] is empty")
    x = (array.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    q = np.rint(np.clip(x, 0.0, 1.0) * levels)
    return q.astype(np.uint8 if levels <= NATURAL_LEVELS else np.uint16)


def dequantise(q: np.ndarray, levels: int) -> np.ndarray:
    return q.astype(np.float32) / np.float32(levels)


@dataclass
class Preprocessed:
    """The stored form of one image and what the manifest records about it."""

    data: np.ndarray  # (C, D, H, W) uint8/uint16
    spacing: tuple[float, float, float]
    levels: int
    stats: IntensityStats


def preprocess_image(array: np.ndarray, spacing: tuple[float, float, float], natural: bool) -> Preprocessed:
    """Crop, resize, measure and quantise one ``(C, D, H, W)`` image (natural: 0-255 -> [0, 1])."""
    integer_source = np.issubdtype(array.dtype, np.integer)
    if natural:  # the authors crop on "any channel > 0" when loading, resize, then crop on "all channels > 0"
        array = array[(slice(None), *foreground_bbox((array > 0).any(axis=0)))]
        array, spacing = resize_inplane(array, spacing, natural=True)
        array = crop_foreground(array, natural)
    else:
        array = crop_foreground(array, natural)
        array, spacing = resize_inplane(array, spacing)
    stats = intensity_stats(array)
    if natural:
        low, high, levels = 0.0, 255.0, NATURAL_LEVELS
    else:
        low, high = stats.p0_5, stats.p99_5
        levels = choose_levels(low, high, integer_source)
    return Preprocessed(quantise(array, low, high, levels), spacing, levels, stats)
