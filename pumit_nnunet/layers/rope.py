"""Additive 3D rotary position embedding (RoPE), compatible with EVA-02's 2D RoPE.

Each head's channels are split into two halves of ``head_dim // 2``; each half has ``head_dim // 4`` rotary
pairs laid out interleaved (pair ``j`` = channels ``2j, 2j+1``). The first half rotates by the row (h), the
second by the column (w), both with EVA-02's frequencies ``base_hw ** (-2j / half)``. The depth angle, with its
own base (2333) and odd exponents ``-(2j + 1) / half``, is *added* onto both halves, so no channel is reserved for
depth and a single slice (d = 0) reduces exactly to EVA-02's 2D RoPE. Positions are integer token indices.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["rope_frequencies", "rope_angles", "rotate_pairs", "apply_rope", "AdditiveRope3d"]

DEFAULT_ROPE_BASES = (2333.0, 10000.0, 10000.0)


def rope_frequencies(head_dim: int, bases: Sequence[float] = DEFAULT_ROPE_BASES) -> tuple[Tensor, Tensor]:
    """Return ``(depth_freqs, inplane_freqs)``, each of ``head_dim // 4`` values (float64)."""
    if head_dim % 4:
        raise ValueError(f"additive 3D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    j = torch.arange(half // 2, dtype=torch.float64)
    base_d, base_h, base_w = (float(b) for b in bases)
    if base_h != base_w:
        raise ValueError("in-plane RoPE bases must be equal (EVA-02 compatibility)")
    inplane = base_h ** (-2 * j / half)
    depth = base_d ** (-(2 * j + 1) / half)
    return depth, inplane


def rope_angles(grid: Sequence[int], head_dim: int, bases: Sequence[float] = DEFAULT_ROPE_BASES) -> Tensor:
    """Rotation angle per token and channel: ``(D*H*W, head_dim)``, tokens flattened D -> H -> W, float64.

    Channel ``c`` of the first half belongs to pair ``c // 2`` (interleaved), the same for the second half.
    """
    d_size, h_size, w_size = (int(g) for g in grid)
    depth_freqs, inplane_freqs = rope_frequencies(head_dim, bases)
    d, h, w = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64) for n in (d_size, h_size, w_size)), indexing="ij"
    )
    d, h, w = (t.reshape(-1, 1) for t in (d, h, w))
    depth_term = d * depth_freqs
    first = h * inplane_freqs + depth_term
    second = w * inplane_freqs + depth_term
    # interleaved repeat: each pair's angle covers its two channels
    return torch.cat([first, second], dim=1).repeat_interleave(2, dim=1)


def rotate_pairs(x: Tensor) -> Tensor:
    """Map each adjacent channel pair ``(a, b) -> (-b, a)`` (EVA-02's interleaved ``rotate_half``)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (..., L, head_dim) by angles whose cos/sin are broadcastable to it."""
    return x * cos + rotate_pairs(x) * sin


class AdditiveRope3d(nn.Module):
    """Additive 3D RoPE for a token grid; holds no state-dict entries (tables are computed and cached).

    Args:
        head_dim: channels per attention head (divisible by 4).
        bases: ``(depth, h, w)`` bases; PUMIT uses ``(2333, 10000, 10000)``.
    """

    def __init__(self, head_dim: int, bases: Sequence[float] = DEFAULT_ROPE_BASES) -> None:
        super().__init__()
        rope_frequencies(head_dim, bases)  # validate eagerly
        self.head_dim = head_dim
        self.bases = tuple(float(b) for b in bases)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def cos_sin(self, grid: Sequence[int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos`` and ``sin`` tables, each ``(D*H*W, head_dim)``; cached per grid, device and dtype."""
        key = (tuple(int(g) for g in grid), device, dtype)
        if key not in self._cache:
            angles = rope_angles(key[0], self.head_dim, self.bases)
            self._cache[key] = (angles.cos().to(device, dtype), angles.sin().to(device, dtype))
        return self._cache[key]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, bases={self.bases}"
