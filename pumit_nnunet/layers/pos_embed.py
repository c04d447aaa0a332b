"""Learnable 5D absolute position embedding resampling (area down, then trilinear to the exact grid)."""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["resample_pos_embed"]


def resample_pos_embed(pos_embed: Tensor, grid: Sequence[int]) -> Tensor:
    """Resample a ``(1, C, d, h, w)`` embedding to ``grid``: area-downsample the axes that are too large first
    (avoids aliasing), then interpolate trilinearly to the exact target. Identity when the grid already matches."""
    grid = tuple(int(g) for g in grid)
    if tuple(pos_embed.shape[2:]) == grid:
        return pos_embed
    shrunk = tuple(min(s, g) for s, g in zip(pos_embed.shape[2:], grid))
    if shrunk != tuple(pos_embed.shape[2:]):
        pos_embed = F.adaptive_avg_pool3d(pos_embed, shrunk)
    if shrunk != grid:
        pos_embed = F.interpolate(pos_embed, size=grid, mode="trilinear", align_corners=False)
    return pos_embed
