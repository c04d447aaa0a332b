"""Pure per-image preprocessing (§5.1, §5.3): foreground crop, in-plane resize, statistics, [0, 1] scaling.

Everything works on depth-first ``(C, D, H, W)`` arrays. The stored form is quantised: ``q = round(x * levels)``
with ``levels`` chosen so that one level is at most one unit of an integer source (at most 4095 levels, i.e.
finer than float16 above 0.25), stored as uint8 when ``levels <= 255`` and uint16 otherwise; ``x = q / levels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    """Crop ``(C, D, H, W)`` to voxels above 0 (natural images) or above the 0.5th percentile in every channel."""
    if natural:
        mask = (array > 0).any(axis=0)
    else:
        mask = np.ones(array.shape[1:], dtype=bool)
        for channel in array:
            mask &= channel > percentiles_above_min(channel)[0]
    return array[(slice(None), *foreground_bbox(mask))]


def resize_inplane(array: np.ndarray, spacing: tuple[float, float, float], max_size: int = MAX_INPLANE
                   ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Shrink the shorter in-plane side to ``max_size`` when larger (area interpolation); spacing follows."""
    import torch
    import torch.nn.functional as F

    c, d, h, w = array.shape
    if min(h, w) <= max_size:
        return array, spacing
    ratio = max_size / min(h, w)
    size = (max(round(h * ratio), 1), max(round(w * ratio), 1))
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).reshape(1, c * d, h, w)
    resized = F.interpolate(tensor, size=size, mode="area").reshape(c, d, *size).numpy()
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
        raise ValueError(f"constant image: intensity range [{low}, {high}] is empty")
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
    array = crop_foreground(array, natural)
    array, spacing = resize_inplane(array, spacing)
    stats = intensity_stats(array)
    if natural:
        low, high, levels = 0.0, 255.0, NATURAL_LEVELS
    else:
        low, high = stats.p0_5, stats.p99_5
        levels = choose_levels(low, high, integer_source)
    return Preprocessed(quantise(array, low, high, levels), spacing, levels, stats)
