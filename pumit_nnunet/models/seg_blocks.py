"""Building blocks of the segmentation network: the SAC depth schedule, conv blocks, ViT neck and U-Net decoder.

Every feature map sits at an in-plane level ``n`` (in-plane size / 2**n). Following the SAC rule, depth is
halved going from level ``n`` to ``n + 1`` only once voxels are isotropic (``n >= aniso_d``), so the depth
downsampling factor at level ``n`` is ``2 ** max(n - aniso_d, 0)``; tokens sit at level 4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["depth_factor", "level_stride", "ConvNormAct", "ViTNeck", "UNetDecoder", "TOKEN_LEVEL", "DecoderConfig",
           "DECODER_PRESETS", "decoder_config", "run_segment", "CONV_INITS", "kaiming_fan_out_"]

#: in-plane level of the ViT tokens (16x16 in-plane patches)
TOKEN_LEVEL = 4
#: decoder conv initialisations (see :class:`DecoderConfig`)
CONV_INITS = ("default", "kaiming_fan_out")


@dataclass(frozen=True)
class DecoderConfig:
    """Options of the neck + U-Net decoder (none of them is part of the pre-trained ViT weights).

    Attributes:
        lateral_channels: channels of in-plane levels 2, 3, 4, 5 (1/4 .. 1/32) after the 1x1 laterals.
        fullres_channels: channels of levels 0 and 1 (the full-resolution branch).
        norm_affine: InstanceNorm with a learnt scale and shift (nnU-Net's choice, our default); the authors'
            MONAI "instance" norm has none (``False``, their recipe).
        conv_init: ``"default"`` (PyTorch's) or ``"kaiming_fan_out"``: the authors' ``init_common``, normal with
            std sqrt(2 / fan_out) and zero bias, which they applied to the laterals and the U-Net stages on the ViT
            pyramid (levels 2-4), not to the full-resolution branch or the heads.
        up_bias: the up-path transposed convs have a bias (the authors', MONAI's default). Ours have none by default
            (checkpoint compatibility): the conv + InstanceNorm after the concatenation cancels a per-channel
            constant everywhere except at the zero-padded borders, so the bias changes little.
    """

    lateral_channels: tuple[int, ...] = (128, 256, 512, 512)
    fullres_channels: tuple[int, ...] = (32, 64)
    norm_affine: bool = True
    conv_init: str = "default"
    up_bias: bool = False

    def __post_init__(self) -> None:
        if len(self.lateral_channels) != 4 or len(self.fullres_channels) != 2:
            raise ValueError(f"the decoder needs 4 lateral and 2 full-resolution widths, got {list(self.lateral_channels)} "
                             f"and {list(self.fullres_channels)}")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"conv_init must be one of {CONV_INITS}, got {self.conv_init!r}")

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels at pyramid levels 0 .. 5."""
        return (*self.fullres_channels, *self.lateral_channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON/plans-friendly dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: ``authors``: the widths of the PUMIT code (512-channel 3x3x3 convs at 1/16 and 1/32); ``lite``: nnU-Net's
#: widths (32, 64, 128, 256, then capped at 320), less than half the decoder's parameters
DECODER_PRESETS: dict[str, DecoderConfig] = {
    "authors": DecoderConfig(),
    "lite": DecoderConfig(lateral_channels=(128, 256, 320, 320)),
}


def decoder_config(spec: "str | dict[str, Any] | DecoderConfig" = "authors", **overrides: Any) -> DecoderConfig:
    """A decoder preset name (``authors``, ``lite``), a dict of :class:`DecoderConfig` fields or a config, with
    ``overrides`` (fields; ``None`` values are ignored) applied."""
    if isinstance(spec, str):
        if spec not in DECODER_PRESETS:
            raise ValueError(f"unknown decoder {spec!r}; choose one of {sorted(DECODER_PRESETS)} or give a dict")
        base = DECODER_PRESETS[spec]
    elif isinstance(spec, dict):
        unknown = set(spec) - set(DecoderConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown decoder config keys: {sorted(unknown)}")
        base = DecoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
    else:
        base = spec
    given = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items() if v is not None}
    return replace(base, **given)


def run_segment(module: Callable[..., Tensor], *inputs: Any, checkpointed: bool) -> Tensor:
    """``module(*inputs)``, as an activation-checkpointed segment when asked and autograd records: only the inputs
    are kept for backward and the segment is recomputed there (same outputs and gradients, less memory)."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False)
    return module(*inputs)


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


def kaiming_fan_out_(module: nn.Module) -> None:
    """The authors' ``init_common`` for every conv in ``module``: weight ~ N(0, 2 / fan_out) with
    ``fan_out = prod(kernel) * out_channels / groups``, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvNormAct(nn.Sequential):
    """Conv3d (no bias) + InstanceNorm3d (affine unless ``norm_affine=False``) + LeakyReLU, padded to keep the size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                 norm_affine: bool = True) -> None:
        padding = tuple(k // 2 for k in kernel)
        super().__init__(
            nn.Conv3d(in_channels, out_channels, tuple(kernel), tuple(stride), padding, bias=False),
            nn.InstanceNorm3d(out_channels, affine=norm_affine),
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
        #: run each branch as an activation-checkpointed segment (training memory; outputs unchanged)
        self.checkpointing = False

    def _branch(self, index: int, feature: Tensor) -> Tensor:
        return self.necks[index](self.norms[index](feature))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        return [run_segment(self._branch, i, f, checkpointed=self.checkpointing) for i, f in enumerate(features)]


class _UpStage(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, stride: Sequence[int], kernel: Sequence[int],
                 norm_affine: bool = True, up_bias: bool = False) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, tuple(stride), tuple(stride), bias=up_bias)
        self.convs = nn.Sequential(
            ConvNormAct(out_channels + skip_channels, out_channels, kernel, norm_affine=norm_affine),
            ConvNormAct(out_channels, out_channels, kernel, norm_affine=norm_affine),
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
        config: widths (and further options) of the decoder, see :class:`DecoderConfig`.
        deep_supervision: return the four heads' outputs instead of the full-resolution one only.
    """

    def __init__(self, embed_dim: int, in_channels: int, num_classes: int, aniso_d: int,
                 config: DecoderConfig = DecoderConfig(), deep_supervision: bool = True) -> None:
        super().__init__()
        self.deep_supervision = deep_supervision
        self.config = config
        lateral_channels = config.lateral_channels
        affine = config.norm_affine
        self.laterals = nn.ModuleList(ConvNormAct(embed_dim, c, (1, 1, 1), norm_affine=affine) for c in lateral_channels)
        c0, c1 = config.fullres_channels
        self.fullres = nn.ModuleList([
            nn.Sequential(ConvNormAct(in_channels, c0, _kernel(0, aniso_d), norm_affine=affine),
                          ConvNormAct(c0, c0, _kernel(0, aniso_d), norm_affine=affine)),
            nn.Sequential(ConvNormAct(c0, c1, _kernel(0, aniso_d), level_stride(0, aniso_d), norm_affine=affine),
                          ConvNormAct(c1, c1, _kernel(1, aniso_d), norm_affine=affine)),
        ])
        # up path from level 5 to level 0: (input channels, skip channels, output channels, level reached)
        channels = [c0, c1, *lateral_channels]
        self.stages = nn.ModuleList(
            _UpStage(channels[level + 1], channels[level], channels[level], level_stride(level, aniso_d),
                     _kernel(level, aniso_d), norm_affine=affine, up_bias=config.up_bias)
            for level in range(4, -1, -1)
        )
        if config.conv_init == "kaiming_fan_out":  # the authors' inner decoder only: laterals, stages to levels 4-2
            kaiming_fan_out_(self.laterals)
            for stage in self.stages[:3]:
                kaiming_fan_out_(stage)
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, 1) for c in channels[:4])
        #: run the full-resolution convs, laterals and up stages as activation-checkpointed segments
        self.checkpointing = False

    def forward(self, image: Tensor, pyramid: Sequence[Tensor]) -> Tensor | list[Tensor]:
        ckpt = self.checkpointing
        skips = [run_segment(self.fullres[0], image, checkpointed=ckpt)]
        skips.append(run_segment(self.fullres[1], skips[0], checkpointed=ckpt))
        skips += [run_segment(lateral, p, checkpointed=ckpt) for lateral, p in zip(self.laterals, pyramid)]
        x = skips[-1]
        outputs: list[Tensor] = []
        for stage, level in zip(self.stages, range(4, -1, -1)):
            x = run_segment(stage, x, skips[level], checkpointed=ckpt)
            if level < 4 and (self.deep_supervision or level == 0):
                outputs.append(self.heads[level](x))
        if not self.deep_supervision:
            return outputs[-1]
        return outputs[::-1]
