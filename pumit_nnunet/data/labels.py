"""Label maps derived from the registered scans: pure numpy functions, reproducible to the voxel.

The derived labels are threshold or atlas labels, not expert ones; each dataset's ``description`` says which rule
made it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SOFT_TISSUE_HU", "BONE_HU", "ct_tissue_classes", "tissue_argmax", "brain_mask", "ball"]

#: HU thresholds of the CT tissue classes (the InVesalius presets the old head-CT labels used)
SOFT_TISSUE_HU, BONE_HU = -142, 226


def ct_tissue_classes(hu: np.ndarray) -> np.ndarray:
    """0 background (air, lung), 1 soft tissue (``SOFT_TISSUE_HU`` <= HU < ``BONE_HU``), 2 bone (HU >= ``BONE_HU``)."""
    hu = np.asarray(hu)
    return ((hu >= SOFT_TISSUE_HU).astype(np.uint8) + (hu >= BONE_HU).astype(np.uint8)).astype(np.uint8)


def tissue_argmax(*probabilities: np.ndarray, scale: int = 255) -> np.ndarray:
    """Label ``k`` (1-based) where map ``k`` is the most probable class, 0 where the rest (``scale - sum``) wins.

    Maps are integer probabilities in ``[0, scale]`` (MNI152's uint8 maps); ties go to the lower label."""
    stack = np.stack([np.asarray(p, dtype=np.int32) for p in probabilities])
    rest = np.clip(scale - stack.sum(0), 0, None)
    return np.argmax(np.concatenate([rest[None], stack]), axis=0).astype(np.uint8)


def ball(radius: int) -> np.ndarray:
    """A 3D ball structuring element of ``radius`` voxels."""
    grid = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
    return z * z + y * y + x * x <= radius * radius


def brain_mask(grey: np.ndarray, white: np.ndarray, scale: int = 255, radius: int = 3) -> np.ndarray:
    """``fill_holes(closing_radius(grey + white >= scale / 2))``: the template's brain (uint8 0/1).

    The closing bridges the sulci so the mask is one smooth solid, as a brain-extraction mask is."""
    from scipy import ndimage

    tissue = (np.asarray(grey, np.int32) + np.asarray(white, np.int32)) * 2 >= scale
    pad = radius + 1  # closing near the array border would otherwise erode what touches it
    closed = ndimage.binary_closing(np.pad(tissue, pad), structure=ball(radius))[pad:-pad, pad:-pad, pad:-pad]
    return ndimage.binary_fill_holes(closed).astype(np.uint8)
