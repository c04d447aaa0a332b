"""Equivalences after loading converted weights, exact to float tolerance.

(a) the adaptive SAC ViT on aniso_d = 2 input == the converted fixed (4, 16, 16)-patch ViT;
(b) the channel conversion == replicating a grey input to RGB (and, folded, == ImageNet-normalised RGB);
(c) on a single slice, our ViT with weights converted from timm's EVA-02 reproduces timm's features.

timm's EVA RoPE (``RotaryEmbeddingCat``, ``rope_type='cat'``) is EVA-02's formula: in-plane frequencies
``10000 ** (-j / (head_dim / 4))`` (== ``-2j / half``), integer token positions with ``grid_offset=0``,
``grid_indexing='ij'`` (first half rotates by the row, second by the column), cos/sin interleave-repeated
(pair ``j`` = channels ``2j, 2j + 1``), CLS not rotated. The one convention that differs from PUMIT is
``ref_feat_shape``: timm's ``eva02_*_patch14`` models set (16, 16), which rescales positions to
``i * 16 / grid`` on other grids (EVA-02's fine-tuning interpolation); PUMIT uses plain integer positions. With
``ref_feat_shape=None`` (or equal to the grid) both are identical, which the table test below checks directly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from timm.layers.pos_embed_sincos import build_rotary_pos_embed
from timm.models.eva import Eva

from pumit_nnunet.checkpoints.convert import IMAGENET_MEAN, IMAGENET_STD
from pumit_nnunet.checkpoints.load import load_vit_weights
from pumit_nnunet.checkpoints.samples import eva02_original_checkpoint, randomise_, released_pumit_checkpoint
from pumit_nnunet.layers.rope import rope_angles
from pumit_nnunet.models.vit import UniversalViT, ViTConfig

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1), mask_token=True)


def _features(vit: UniversalViT, x: torch.Tensor, aniso_d: int) -> list[torch.Tensor]:
    """Every block's output and the normed output, computed in float64 so that only real differences show."""
    vit = vit.double()
    with torch.no_grad():
        out = [*vit.forward_features(x.double(), aniso_d), vit(x.double(), aniso_d)]
    vit.float()
    return out


def _assert_all_close(ours: list[torch.Tensor], reference: list[torch.Tensor], **tol) -> None:
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture(scope="module")
def source_vit() -> UniversalViT:
    torch.manual_seed(0)
    return randomise_(UniversalViT(SMALL), seed=1).eval()


@pytest.mark.parametrize("pos_embed_shape", [(5, 10, 10), (2, 2, 2)])
def test_a_adaptive_equals_converted_fixed_patch(source_vit, pos_embed_shape):
    ckpt = released_pumit_checkpoint(source_vit.state_dict())
    fixed = UniversalViT(replace(SMALL, patch_depth=4, mask_token=False, pos_embed_shape=pos_embed_shape)).eval()
    report = load_vit_weights(fixed, ckpt, log=None)
    assert report.complete and "mim_head.2.weight" in report.skipped and "mask_token" in report.skipped
    assert "SAC sum-pooling" in report.converted["patch_embed.proj.weight"]
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(2))  # aniso_d 2: token depth 4
    _assert_all_close(_features(fixed, x, 2), _features(source_vit, x, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2])
def test_b_sum_mode_equals_grey_replicated_to_rgb(source_vit, channels):
    target = UniversalViT(replace(SMALL, in_channels=channels, patch_depth=4)).eval()
    report = load_vit_weights(target, source_vit.state_dict(), log=None)
    assert "summed and shared" in report.converted["patch_embed.proj.bias"] or channels != 3
    grey = torch.randn(1, 1, 8, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = _features(source_vit, grey.repeat(1, 3, 1, 1, 1), 2)
    _assert_all_close(_features(target, grey.repeat(1, channels, 1, 1, 1), 2), expected, rtol=1e-6, atol=1e-6)


def test_b_imagenet_fold_equals_normalised_rgb(source_vit):
    target = UniversalViT(replace(SMALL, in_channels=1)).eval()
    load_vit_weights(target, source_vit.state_dict(), channel_mode="imagenet-fold", log=None)
    unit = torch.rand(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(4))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    expected = _features(source_vit, (unit.repeat(1, 3, 1, 1, 1) - mean) / std, 0)
    _assert_all_close(_features(target, unit, 0), expected, rtol=1e-5, atol=1e-5)  # folded weights are stored in float32


def _timm_eva(img: int = 48) -> Eva:
    """EVA-02 MIM settings at small size with a 16-pixel patch (timm's LayerNorm eps is 1e-6)."""
    eva = Eva(img_size=img, patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=8 / 3,
              swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=None, num_classes=0)
    return randomise_(eva, seed=5).eval()


def _timm_block_outputs(eva: Eva, image: torch.Tensor) -> list[torch.Tensor]:
    eva = eva.double()
    with torch.no_grad():
        x, rope = eva._pos_embed(eva.patch_embed(image.double()))
        outputs = []
        for block in eva.blocks:
            x = block(x, rope=rope)
            outputs.append(x)
        return [*outputs, eva.fc_norm(x)]  # EVA-02's final norm is timm's fc_norm (global_pool='avg')


@pytest.mark.parametrize("patch_depth", [None, 1])
def test_c_timm_eva02_single_slice_reproduces_timm(patch_depth):
    eva = _timm_eva()
    config = replace(SMALL, norm_eps=1e-6, mask_token=False, patch_depth=patch_depth, pos_embed_shape=(5, 3, 3))
    ours = UniversalViT(config).eval()
    report = load_vit_weights(ours, eva.state_dict(), log=None)
    assert report.format == "timm-eva02" and report.complete
    assert report.converted["cls_token"] == "EVA CLS position embedding (index 0) folded in"
    image = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    _assert_all_close(_features(ours, image[:, :, None], 5), _timm_block_outputs(eva, image), rtol=1e-6, atol=1e-6)


def test_c_rope_tables_equal_timm_eva_rope():
    grid = (3, 5)
    sin, cos = build_rotary_pos_embed(grid, dim=32, temperature=10000.0, in_pixels=False, ref_feat_shape=None)
    angles = rope_angles((1, *grid), 32).float()
    torch.testing.assert_close(angles.sin(), sin, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(angles.cos(), cos, rtol=1e-6, atol=1e-6)


def test_eva02_original_file_conversion(source_vit):
    state = source_vit.state_dict()
    ckpt = eva02_original_checkpoint(state, head_dim=32)
    for index in (0, 1):
        target = UniversalViT(replace(SMALL, in_channels=1, patch_depth=2, pos_embed_shape=(4, 8, 8))).eval()
        report = load_vit_weights(target, ckpt, eva_cls_pos_index=index, log=None)
        assert report.format == "eva02" and report.complete and not report.initialised
        assert {"lm_head.weight", "rope.freqs_cos", "blocks.1.attn.rope.freqs_sin"} <= set(report.skipped)
        module = ckpt["module"]
        torch.testing.assert_close(target.cls_token.data, module["cls_token"] + module["pos_embed"][:, index : index + 1])
        torch.testing.assert_close(target.mask_token.data, module["mask_token"])
        # bicubic 14 -> 16, average over 16 depth taps, summed in groups of 8, RGB summed
        kernel = torch.nn.functional.interpolate(module["patch_embed.proj.weight"], size=(16, 16), mode="bicubic")
        expected = (kernel.sum(1, keepdim=True) / 2).unsqueeze(2).repeat(1, 1, 2, 1, 1)
        torch.testing.assert_close(target.patch_embed.proj.weight.data, expected)
