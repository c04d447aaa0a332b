"""Degree of anisotropy (DA, ``aniso_d``): the one integer that drives every spatially adaptive layer.

A volume's axis 0 is its depth axis (the possibly coarser one), axes 1 and 2 are in-plane. The degree of
anisotropy is ``floor(log2(clip(depth spacing / in-plane spacing, 1, 32)))``: 0 for (quasi-)isotropic
voxels, 5 for 2D images (which are stored with a huge depth spacing so that they clip to 5).
"""

from __future__ import annotations

import math
from typing import Sequence

MAX_ANISO_D = 5
#: depth spacing given to 2D images so that they land at ``aniso_d == MAX_ANISO_D``
SPACING_2D_DEPTH = 1e8


def aniso_d_from_spacing(spacing: Sequence[float], scale_depth: float = 1.0, scale_inplane: float = 1.0) -> int:
    """Return ``aniso_d`` for a (depth, h, w) spacing, optionally under scale augmentation factors.

    ``scale_*`` multiply the spacing as the pre-training sampler's scale augmentation does (a crop that is
    resized by ``1/scale`` has ``scale`` times the spacing).
    """
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 entries (depth, h, w), got {tuple(spacing)}")
    sp_d, sp_h, sp_w = (float(s) for s in spacing)
    if min(sp_d, sp_h, sp_w) <= 0 or not all(math.isfinite(s) for s in (sp_h, sp_w)):
        raise ValueError(f"spacing must be positive and finite in-plane, got {tuple(spacing)}")
    ratio = sp_d * scale_depth / (min(sp_h, sp_w) * scale_inplane)
    ratio = min(max(ratio, 1.0), float(2 ** MAX_ANISO_D))
    # int(r).bit_length() - 1 == floor(log2(r)) for r >= 1 without floating-point log surprises
    return int(ratio).bit_length() - 1


def token_depth(patch_size: int, aniso_d: int) -> int:
    """Depth extent (voxels) of a ``patch_size``-cube SAC patch at ``aniso_d``: ``max(patch_size >> aniso_d, 1)``."""
    if aniso_d < 0:
        raise ValueError(f"aniso_d must be >= 0, got {aniso_d}")
    return max(patch_size >> aniso_d, 1)
