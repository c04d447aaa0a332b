"""SAC: the reduced kernel on a thick voxel equals the full kernel on its 2**p replicated thin slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.anisotropy import aniso_d_from_spacing, token_depth
from pumit_nnunet.layers.sac import (
    SpatialSequential,
    SpatiallyAdaptiveConv3d,
    SpatiallyAdaptiveConvTranspose3d,
    adaptive_down_params,
    reduce_depth_kernel,
)


@pytest.fixture
def float64():
    """Exactness checks run in float64 (float32 summation order would blur 'exactly')."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _thin(x: torch.Tensor, p: int) -> torch.Tensor:
    """Replicate every depth voxel into 2**p thin slices."""
    return x.repeat_interleave(2 ** p, dim=2)


@given(st.integers(1, 4).map(lambda k: 2 ** k), st.integers(0, 4), st.integers(1, 3))
@settings(max_examples=30, deadline=None)
def test_reduce_depth_kernel_sums_groups(kd_pow: int, group_pow: int, seed: int) -> None:
    group = 2 ** min(group_pow, kd_pow.bit_length() - 1)
    weight = torch.randn(3, 2, kd_pow, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reduced = reduce_depth_kernel(weight, group)
    assert reduced.shape[2] == kd_pow // group
    for i in range(kd_pow // group):
        torch.testing.assert_close(reduced[:, :, i], weight[:, :, i * group:(i + 1) * group].sum(2))
    # sum pooling preserves the total weight (the response to a constant input)
    torch.testing.assert_close(reduced.sum(2), weight.sum(2))


@pytest.mark.parametrize("aniso_d", range(6))
@pytest.mark.parametrize("stride", [2, 4, 16])
def test_down_variant_equals_full_kernel_on_replicated_slices(aniso_d: int, stride: int, float64) -> None:
    torch.manual_seed(aniso_d * 31 + stride)
    conv = SpatiallyAdaptiveConv3d(2, 3, stride, stride=stride)
    p = aniso_d  # level 0: every pending halving is still to come
    depth_stride, _ = adaptive_down_params(stride, stride, p)
    depth = 2 * depth_stride
    thick = torch.randn(2, 2, depth, 2 * stride, 2 * stride)
    reduced = conv(thick, aniso_d, 0)
    full = F.conv3d(_thin(thick, p), conv.weight, conv.bias, stride)
    if 2 ** p > stride:  # a voxel thicker than the kernel yields 2**p / stride identical thin outputs: keep one
        full = full[:, :, :: 2 ** p // stride]
    torch.testing.assert_close(reduced, full, rtol=1e-10, atol=1e-10)
    assert reduced.shape[2:] == (depth // depth_stride, 2, 2)


@pytest.mark.parametrize("aniso_d", range(6))
def test_patch_embed_depth_matches_table(aniso_d: int) -> None:
    conv = SpatiallyAdaptiveConv3d(1, 4, 16, stride=16)
    weight, stride, _ = conv.effective_weight(aniso_d)
    assert stride[0] == token_depth(16, aniso_d) == weight.shape[2]
    assert stride[1:] == (16, 16)


@pytest.mark.parametrize("aniso_d", range(1, 6))
def test_3x3_variant_equals_full_kernel_inside_thick_voxels(aniso_d: int, float64) -> None:
    """A 3x3x3 stride-1 conv collapses to 1x3x3 while voxels are thick; on the replicated thin slices the
    full kernel gives the same result wherever all three taps fall inside one thick voxel."""
    torch.manual_seed(aniso_d)
    conv = SpatiallyAdaptiveConv3d(2, 3, 3, stride=1, padding=1)
    thick = torch.randn(1, 2, 3, 5, 5)
    reduced = conv(thick, aniso_d, 0)
    p = aniso_d
    full = F.conv3d(_thin(thick, p), conv.weight, conv.bias, 1, 1)
    if p >= 2:  # interior thin slices of each thick voxel
        interior = full[:, :, 1::2 ** p][:, :, : thick.shape[2]]
        torch.testing.assert_close(reduced, interior, rtol=1e-10, atol=1e-10)
    # a depth-constant input: every thin slice away from the volume border sees three equal taps
    constant = thick[:, :, :1].expand(-1, -1, 3, -1, -1)
    full_c = F.conv3d(_thin(constant, p), conv.weight, conv.bias, 1, 1)
    torch.testing.assert_close(conv(constant, aniso_d, 0)[:, :, 1], full_c[:, :, full_c.shape[2] // 2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aniso_d", range(6))
@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_up_variant_equals_sum_of_full_kernel_thin_outputs(aniso_d: int, level: int, float64) -> None:
    torch.manual_seed(level * 7 + aniso_d)
    up = SpatiallyAdaptiveConvTranspose3d(3, 2, stride=2 ** min(level, 2))
    x = torch.randn(1, 3, 2, 3, 3)
    out = up(x, aniso_d, level)
    full = F.conv_transpose3d(x, up.weight, None, up.stride)
    group = full.shape[2] // out.shape[2]
    # a thick output voxel stands for ``group`` thin ones: its response is their sum (bias added once)
    pooled = full.unflatten(2, (out.shape[2], group)).sum(3) + up.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(out, pooled, rtol=1e-10, atol=1e-10)
    expected_depth_stride = min(2 ** max(level - aniso_d, 0), up.stride[0])
    assert out.shape[2] == 2 * expected_depth_stride


def test_spatial_sequential_tracks_level() -> None:
    seq = SpatialSequential(
        SpatiallyAdaptiveConv3d(1, 4, 4, stride=4), torch.nn.GELU(), SpatiallyAdaptiveConv3d(4, 4, 2, stride=2),
        SpatiallyAdaptiveConvTranspose3d(4, 4, stride=2),
    )
    assert seq.level_change == 2
    out = seq(torch.randn(1, 1, 2, 32, 32), 4)  # aniso_d 4: depth never downsampled, never upsampled
    assert out.shape == (1, 4, 2, 8, 8)
    out = seq(torch.randn(1, 1, 16, 32, 32), 0)
    assert out.shape == (1, 4, 4, 8, 8)


@pytest.mark.parametrize("spacing,expected", [
    ((1.0, 1.0, 1.0), 0), ((1.9, 1.0, 1.0), 0), ((2.0, 1.0, 1.0), 1), ((5.0, 0.57, 0.57), 3),
    ((6.5, 0.78, 0.78), 3), ((3.0, 2.0, 2.0), 0), ((0.5, 1.0, 1.0), 0), ((1e8, 0.1, 0.1), 5), ((20.0, 0.6, 0.7), 5),
])
def test_aniso_d_from_spacing(spacing, expected) -> None:
    assert aniso_d_from_spacing(spacing) == expected


def test_aniso_d_rejects_bad_spacing() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        aniso_d_from_spacing((1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        aniso_d_from_spacing((1.0, 0.0, 1.0))


def test_invalid_reductions_are_rejected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SpatiallyAdaptiveConv3d(1, 1, 3, stride=3)
    with pytest.raises(ValueError, match="cannot collapse"):
        adaptive_down_params(5, 4, 3)
    with pytest.raises(ValueError, match="kernel == stride"):
        adaptive_down_params(3, 4, 1)
