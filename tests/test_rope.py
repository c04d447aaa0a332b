"""Additive 3D RoPE: relativity, the EVA-02 2D special case, the depth term, and no state-dict entries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.layers.attention import EvaAttention
from pumit_nnunet.layers.rope import AdditiveRope3d, apply_rope, rope_angles


def _rotated(vec: torch.Tensor, position: tuple[int, int, int], grid=(6, 7, 7)) -> torch.Tensor:
    angles = rope_angles(grid, vec.shape[-1])
    d, h, w = position
    index = (d * grid[1] + h) * grid[2] + w
    return apply_rope(vec, angles[index].cos(), angles[index].sin())


positions = st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 3))


@given(positions, positions, st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_attention_score_depends_only_on_relative_position(a, b, shift, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 64, generator=g, dtype=torch.float64)
    a2 = tuple(x + s for x, s in zip(a, shift))
    b2 = tuple(x + s for x, s in zip(b, shift))
    score = _rotated(q, a) @ _rotated(k, b)
    shifted = _rotated(q, a2) @ _rotated(k, b2)
    torch.testing.assert_close(score, shifted, rtol=1e-9, atol=1e-9)


def _eva02_2d_angles(grid_hw: int, head_dim: int) -> torch.Tensor:
    """EVA-02's VisionRotaryEmbeddingFast, written from its published formula: per axis
    ``t * 10000 ** (-arange(0, half, 2) / half)``, each value repeated twice (interleaved), rows then columns
    concatenated along channels."""
    half = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float64)[: half // 2] / half))
    t = torch.arange(grid_hw, dtype=torch.float64)
    per_axis = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)
    rows = per_axis[:, None, :].expand(grid_hw, grid_hw, half)
    cols = per_axis[None, :, :].expand(grid_hw, grid_hw, half)
    return torch.cat([rows, cols], dim=-1).reshape(-1, head_dim)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_single_slice_reduces_to_eva02_2d_rope(head_dim: int) -> None:
    torch.testing.assert_close(rope_angles((1, 16, 16), head_dim), _eva02_2d_angles(16, head_dim), rtol=1e-12, atol=1e-12)


def test_depth_angle_is_added_to_both_halves_with_odd_exponents() -> None:
    angles = rope_angles((4, 1, 1), 64)
    j = torch.arange(16, dtype=torch.float64)
    depth_freqs = 2333.0 ** (-(2 * j + 1) / 32)
    for d in range(4):
        expected_pairs = (d * depth_freqs).repeat(2)  # same depth angle on the h half and the w half
        torch.testing.assert_close(angles[d, ::2], expected_pairs)
        torch.testing.assert_close(angles[d, 1::2], expected_pairs)


def test_rope_has_no_state_and_cls_is_not_rotated() -> None:
    rope = AdditiveRope3d(32)
    assert dict(rope.state_dict()) == {}
    torch.manual_seed(0)
    attn = EvaAttention(64, 2)
    x = torch.randn(1, 1 + 8, 64)
    cos, sin = rope.cos_sin((2, 2, 2), x.device, torch.float32)
    with_rope = attn(x, (cos, sin))
    # a one-token sequence (CLS alone) attends to itself only: the output equals v -> proj, whatever the rope
    torch.testing.assert_close(attn(x[:, :1], (cos[:0], sin[:0])), attn(x[:, :1], None))
    assert not torch.allclose(with_rope, attn(x, None))


def test_rope_rejects_bad_head_dim() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        AdditiveRope3d(30)
