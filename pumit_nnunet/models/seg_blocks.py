"""Building blocks of the segmentation network: the SAC depth schedule, conv blocks, ViT neck and U-Net decoder.

Every feature map sits at an in-plane level ``n`` (in-plane size / 2**n). Following the SAC rule, depth is
halved going from level ``n`` to ``n + 1`` only once voxels are isotropic (``n >= aniso_d``), so the depth
downsampling factor at level ``n`` is ``2 ** max(n - aniso_d, 0)``; tokens sit at level 4.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["depth_factor", "level_stride", "ConvNormAct", "ViTNeck", "UNetDecoder", "TOKEN_LEVEL"]

#: in-plane level of the ViT tokens (16x16 in-plane patches)
TOKEN_LEVEL = 4


def depth_factor(level: int, aniso_d: int) -> int:
    """Depth downsampling factor of a feature map at in-plane ``level``: ``2 ** max(level - aniso_d, 0)``."""
    return 2 ** max(level - aniso_d, 0)


def level_stride(level: int, aniso_d: int) -> tuple[int, int, int]:
    """(D, H, W) stride between level ``level`` and ``level + 1``."""
    return (depth_factor(level + 1, aniso_d) // depth_factor(level, aniso_d), 2, 2)


def _kernel(level: int, aniso_d: int) -> tuple[int, int, int]:
    # while voxels are still thick (level < aniso_d), a 3x3x3 kernel would mix far-apart slices: use 1x3x3 (SAC's 3x3
    # variant). The authors' full-resolution branch always used 1x3x3 (their patch depth 4 means aniso_d 2 there);
    # we follow the SAC rule instead, so isotropic data (aniso_d 0) gets 3x3x3 from full resolution on.
    return (1, 3, 3) if level < aniso_d else (3, 3, 3)


class ConvNormAct(nn.Sequential):
    """Conv3d (no bias) + InstanceNorm3d (affine) + LeakyReLU, padded to keep the size (at stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)) -> None:
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride), padding, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class ViTNeck(nn.Module):
    """Turns four ViT block outputs (token level 4) into a pyramid at in-plane levels 2, 3, 4 and 5.

    Each map is InstanceNorm-ed, then level 2 gets two transposed convs (with IN + GELU between), level 3 one,
    level 4 none and level 5 a max-pool; depth strides follow :func:`level_stride`.
    """

    def __init__(self, embed_dim: int, aniso_d: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.InstanceNorm3d(embed_dim, affine=True) for _ in range(4))
        s3, s2 = level_stride(3, aniso_d), level_stride(2, aniso_d)
        self.necks = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose3d(embed_dim, embed_dim, s3, s3),
                nn.InstanceNorm3d(embed_dim, affine=True),
                nn.GELU(),
                nn.ConvTranspose3d(embed_dim, embed_dim, s2, s2),
            ),
            nn.ConvTranspose3d(embed_dim, embed_dim, s3, s3),
            nn.Identity(),
            nn.MaxPool3d(level_stride(4, aniso_d), level_stride(4, aniso_d)),
        ])

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [neck(norm(f)) for f, norm, neck in zip(features, self.norms, self.necks)]


class _UpStage(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, stride: Sequence[int], kernel: Sequence[int]) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, tuple(stride), tuple(stride), bias=False)
        self.convs = nn.Sequential(
            ConvNormAct(out_channels + skip_channels, out_channels, kernel), ConvNormAct(out_channels, out_channels, kernel)
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNetDecoder(nn.Module):
    """Plain-conv U-Net decoder with laterals on the neck pyramid, a full-resolution branch on the input image,
    and segmentation heads at levels 0-3 (deep supervision, highest resolution first).

    Args:
        embed_dim: ViT width (neck channels).
        in_channels: input image channels (for the full-resolution branch).
        num_classes: segmentation heads' outputs.
        aniso_d: degree of anisotropy of the plan.
        lateral_channels: channels of levels 2, 3, 4, 5 after the 1x1 laterals.
        fullres_channels: channels of levels 0 and 1 (the full-resolution branch).
        deep_supervision: return the four heads' outputs instead of the full-resolution one only.
    """

    def __init__(self, embed_dim: int, in_channels: int, num_classes: int, aniso_d: int,
                 lateral_channels: Sequence[int] = (128, 256, 512, 512), fullres_channels: Sequence[int] = (32, 64),
                 deep_supervision: bool = True) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.laterals = nn.ModuleList(ConvNormAct(embed_dim, c, (1, 1, 1)) for c in lateral_channels)
        c0, c1 = fullres_channels
        self.fullres = nn.ModuleList([
            nn.Sequential(ConvNormAct(in_channels, c0, _kernel(0, aniso_d)), ConvNormAct(c0, c0, _kernel(0, aniso_d))),
            nn.Sequential(
                ConvNormAct(c0, c1, _kernel(0, aniso_d), level_stride(0, aniso_d)), ConvNormAct(c1, c1, _kernel(1, aniso_d))
            ),
        ])
        # up path from level 5 to level 0: (input channels, skip channels, output channels, level reached)
        channels = [c0, c1, *lateral_channels]
        self.stages = nn.ModuleList(
            _UpStage(channels[level + 1], channels[level], channels[level], level_stride(level, aniso_d), _kernel(level, aniso_d))
            for level in range(4, -1, -1)
        )
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in channels[:4])

    def forward(self, image: Tensor, pyramid: Sequence[Tensor]) -> Tensor | list[Tensor]:
        skips = [self.fullres[0](image)]
        skips.append(self.fullres[1](skips[0]))
        skips += [lateral(p) for lateral, p in zip(self.laterals, pyramid)]
        x = skips[-1]
        outputs: list[Tensor] = []
        for stage, level in zip(self.stages, range(4, -1, -1)):
            x = stage(x, skips[level])
            if level < 4 and (self.deep_supervision or level == 0):
                outputs.append(self.heads[level](x))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]
