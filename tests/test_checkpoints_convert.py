"""Pure conversion functions, each against a reference computation (property tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.checkpoints.convert import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    adapt_in_channels,
    fit_kernel_depth,
    fold_input_normalisation,
    inflate_kernel_depth,
    rename_timm_eva,
    resize_kernel_2d,
    split_eva_pos_embed,
    sum_share_channels,
)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _kernel(seed: int, out: int, cin: int, kd: int, k: int = 4) -> torch.Tensor:
    return torch.randn(out, cin, kd, k, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@SETTINGS
@given(seed=st.integers(0, 10_000), log_group=st.integers(0, 2))
def test_fit_kernel_depth_shrink_is_sac_on_thick_voxels(seed, log_group):
    """Sum-pooled taps on a thick voxel equal the full kernel on the voxel replicated into thin slices."""
    group = 2 ** log_group
    weight = _kernel(seed, 3, 2, 4)
    thick = torch.randn(1, 2, 4 // group, 4, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    reduced = fit_kernel_depth(weight, 4 // group)
    expected = F.conv3d(thick.repeat_interleave(group, dim=2), weight, stride=4)
    torch.testing.assert_close(F.conv3d(thick, reduced, stride=(4 // group, 4, 4)), expected)


@SETTINGS
@given(seed=st.integers(0, 10_000), log_group=st.integers(1, 2))
def test_fit_kernel_depth_grow_inverts_shrink(seed, log_group):
    small = _kernel(seed, 3, 2, 4 // 2 ** log_group)
    torch.testing.assert_close(fit_kernel_depth(fit_kernel_depth(small, 4), small.shape[2]), small)


def test_fit_kernel_depth_refuses_incompatible_depths():
    with pytest.raises(ValueError, match="cannot fit"):
        fit_kernel_depth(_kernel(0, 2, 1, 3), 2)


@SETTINGS
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 4))
def test_sum_share_equals_replicated_grey_input(seed, channels):
    weight = _kernel(seed, 5, 3, 2)
    grey = torch.randn(1, 1, 2, 4, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    shared = sum_share_channels(weight, channels)
    expected = F.conv3d(grey.repeat(1, 3, 1, 1, 1), weight)
    torch.testing.assert_close(F.conv3d(grey.repeat(1, channels, 1, 1, 1), shared), expected)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_fold_input_normalisation_equals_normalising_the_input(seed):
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _kernel(seed, 5, 3, 2), torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.rand(2, 3, 2, 4, 4, generator=gen, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1, 1)
    folded_w, folded_b = fold_input_normalisation(weight, bias, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(F.conv3d(x, folded_w, folded_b), F.conv3d((x - mean) / std, weight, bias))


def test_adapt_in_channels_modes():
    weight, bias = _kernel(0, 4, 3, 2), torch.zeros(4, dtype=torch.float64)
    same_w, same_b, note = adapt_in_channels(weight, bias, 3, "sum")
    assert note is None and same_w is weight
    grey_w, _, note = adapt_in_channels(weight, bias, 1, "sum")
    assert grey_w.shape[1] == 1 and "summed" in note
    fold_w, fold_b, note = adapt_in_channels(weight, bias, 2, "imagenet-fold")
    assert fold_w.shape[1] == 2 and fold_b.abs().sum() > 0 and "folded" in note
    with pytest.raises(ValueError, match="channel mode"):
        adapt_in_channels(weight, bias, 1, "average")


def test_inflate_then_collapse_returns_the_2d_kernel():
    weight = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    inflated = inflate_kernel_depth(weight, 16)
    assert inflated.shape == (4, 3, 16, 16, 16)
    torch.testing.assert_close(fit_kernel_depth(inflated, 1)[:, :, 0], weight)


def test_resize_kernel_2d_is_bicubic_without_magnitude_correction():
    weight = torch.randn(4, 3, 14, 14)
    expected = F.interpolate(weight.reshape(12, 1, 14, 14), size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resize_kernel_2d(weight, 16), expected.reshape(4, 3, 16, 16))
    assert resize_kernel_2d(weight, 14) is weight


@pytest.mark.parametrize("cls_index", [0, 1])
def test_split_eva_pos_embed(cls_index):
    pos = torch.randn(1, 1 + 3 * 3, 4)
    cls, grid = split_eva_pos_embed(pos, cls_index)
    torch.testing.assert_close(cls, pos[:, cls_index : cls_index + 1])
    assert grid.shape == (1, 4, 1, 3, 3)
    # token (h=1, w=2) is the patch entry 1 * 3 + 2, row-major like EVA's flattening
    torch.testing.assert_close(grid[0, :, 0, 1, 2], pos[0, 1 + 5])
    no_cls, grid = split_eva_pos_embed(pos[:, 1:], cls_index)
    assert no_cls is None and grid.shape == (1, 4, 1, 3, 3)
    with pytest.raises(ValueError, match="square"):
        split_eva_pos_embed(torch.randn(1, 7, 4))


def test_rename_timm_eva_table():
    state = {
        "blocks.0.mlp.fc1_g.weight": torch.zeros(1), "blocks.0.mlp.fc1_x.bias": torch.zeros(1),
        "blocks.0.mlp.norm.weight": torch.zeros(1), "blocks.0.mlp.fc2.weight": torch.zeros(1),
        "blocks.0.attn.q_proj.bias": torch.zeros(1), "blocks.0.attn.v_proj.bias": torch.zeros(1),
        "blocks.0.norm1.weight": torch.zeros(1), "fc_norm.weight": torch.zeros(1),
        "blocks.1.attn.qkv.weight": torch.arange(6.0).reshape(6, 1), "blocks.1.attn.k_bias": torch.zeros(2),
    }
    renamed, converted = rename_timm_eva(state)
    assert set(renamed) == {
        "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.bias", "blocks.0.mlp.ffn_ln.weight", "blocks.0.mlp.w3.weight",
        "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.norm1.weight", "norm.weight",
        "blocks.1.attn.q_proj.weight", "blocks.1.attn.k_proj.weight", "blocks.1.attn.v_proj.weight",
    }
    torch.testing.assert_close(renamed["blocks.1.attn.k_proj.weight"], torch.tensor([[2.0], [3.0]]))
    assert "blocks.0.norm1.weight" not in converted and converted["norm.weight"].startswith("renamed")
