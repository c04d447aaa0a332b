"""SAC patch discriminator of the tokenizer's adversarial loss (the authors' patch discriminator, with
spatially adaptive convs so that one set of weights judges 2D images and volumes of any spacing)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pumit_nnunet.layers.sac import SpatiallyAdaptiveConv3d, SpatialSequential
from pumit_nnunet.plain import from_plain, to_plain

__all__ = ["DiscriminatorConfig", "PatchDiscriminator"]


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of the patch discriminator.

    Args:
        in_channels: image channels.
        layer_channels: channels of the stride-2 SAC 3x3 convs.
        num_post_convs: stride-1 SAC 3x3 convs after them.
        norm_groups: GroupNorm groups (16 in the original).
    """

    in_channels: int = 3
    layer_channels: tuple[int, ...] = (128, 256, 512)
    num_post_convs: int = 1
    norm_groups: int = 16

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True) -> "DiscriminatorConfig":
        return from_plain(cls, data, strict=strict, what="discriminator config")


def _block(c_in: int, c_out: int, stride: int, groups: int) -> list[nn.Module]:
    return [SpatiallyAdaptiveConv3d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU()]


class PatchDiscriminator(nn.Module):
    """SAC conv stack (stride-2 3x3 convs, GroupNorm, LeakyReLU) ending in a 3x3 conv to one logit per patch.

    Every conv is spatially adaptive, so thick-slice volumes and 2D images are judged with the same weights.

    Args:
        config: sizes (see :class:`DiscriminatorConfig`).
    """

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for c_out in config.layer_channels:
            layers += _block(c_in, c_out, 2, config.norm_groups)
            c_in = c_out
        for _ in range(config.num_post_convs):
            layers += _block(c_in, c_in, 1, config.norm_groups)
        layers.append(SpatiallyAdaptiveConv3d(c_in, 1, 3, padding=1))
        self.layers = SpatialSequential(*layers)

    def forward(self, x: Tensor, aniso_d: int) -> Tensor:
        """Patch logits ``(B, 1, d', h', w')`` for images ``(B, C, D, H, W)`` in [-1, 1]."""
        return self.layers(x, aniso_d, 0)
