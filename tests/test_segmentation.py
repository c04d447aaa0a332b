"""PumitSegNet: nnU-Net's output contract for every degree of anisotropy, 2D and 3D, 1-4 input channels."""

from __future__ import annotations

import pytest
import torch

from pumit_nnunet.models.segmentation import PumitSegNet, deep_supervision_scales, patch_divisor

SLIM = dict(vit="T", lateral_channels=(16, 16, 32, 32), fullres_channels=(8, 8))


def _patch(aniso_d: int) -> list[int]:
    return [patch_divisor(aniso_d)[0] * 2 if aniso_d < 5 else 2, 64, 64]


@pytest.mark.parametrize("aniso_d", range(6))
@pytest.mark.parametrize("channels", [1, 4])
def test_3d_deep_supervision_shapes_follow_the_scales(aniso_d: int, channels: int) -> None:
    patch = _patch(aniso_d)
    net = PumitSegNet(channels, 3, True, patch_size=patch, aniso_d=aniso_d, **SLIM)
    outputs = net(torch.randn(2, channels, *patch))
    assert isinstance(outputs, list) and len(outputs) == 4
    for out, scale in zip(outputs, deep_supervision_scales(3, aniso_d)):
        assert out.shape == (2, 3, *(round(p * s) for p, s in zip(patch, scale)))
    assert net.backbone.patch_embed.proj.weight.shape[1:] == (channels, max(16 >> aniso_d, 1), 16, 16)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_2d_configuration(channels: int) -> None:
    net = PumitSegNet(channels, 2, True, patch_size=[64, 96], **SLIM)
    outputs = net(torch.randn(2, channels, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 64, 96), (2, 2, 32, 48), (2, 2, 16, 24), (2, 2, 8, 12)]
    net.deep_supervision = False
    assert net(torch.randn(1, channels, 64, 96)).shape == (1, 2, 64, 96)


def test_gradients_reach_every_parameter() -> None:
    net = PumitSegNet(1, 2, True, patch_size=[8, 64, 64], aniso_d=2, **SLIM)
    sum(o.square().mean() for o in net(torch.randn(2, 1, 8, 64, 64))).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_inference_mode_returns_logits_of_the_input_size() -> None:
    net = PumitSegNet(1, 4, False, patch_size=[16, 64, 64], aniso_d=1, **SLIM).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 64, 64))
    assert out.shape == (1, 4, 16, 64, 64)


@pytest.mark.parametrize("patch,aniso_d,message", [
    ([16, 8, 8], 0, "smaller than one token"),
    ([16, 48, 64], 2, "divisible by"),
    ([10, 64, 64], 1, "divisible by"),
])
def test_bad_patches_fail_clearly(patch, aniso_d, message) -> None:
    with pytest.raises(ValueError, match=message):
        PumitSegNet(1, 2, True, patch_size=patch, aniso_d=aniso_d, **SLIM)


def test_unknown_size_fails_clearly() -> None:
    with pytest.raises(ValueError, match="unknown ViT size"):
        PumitSegNet(1, 2, True, patch_size=[32, 64, 64], vit="XL")
