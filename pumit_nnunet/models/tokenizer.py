"""The universal visual tokenizer (paper: SPAD-VT): a SAC conv encoder, soft tokens, and a SAC conv decoder.

One set of 3D weights tokenizes 2D images and volumes of any spacing: every conv is spatially adaptive, so the
latent grid is always 1/16 in-plane and ``1/(16 / 2**aniso_d)`` in depth (depth 1 for 2D). There are no residual
blocks and no attention, as in the authors' tokenizer; state-dict names equal the original's
(``encoder.{0,1.1,3,...}``, ``quantize.{proj,embedding}``, ``decoder.{0,...,8}``).

Inputs are 3-channel in [-1, 1]; :func:`tokenizer_input` maps the loaders' [0, 1] grey or RGB crops there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import Tensor, nn

from pumit_nnunet.layers.quantize import SoftTokenQuantizer
from pumit_nnunet.plain import from_plain, to_plain
from pumit_nnunet.layers.sac import (
    SpatialModule,
    SpatiallyAdaptiveConv3d,
    SpatiallyAdaptiveConvTranspose3d,
    SpatialSequential,
)

__all__ = [
    "TokenizerConfig",
    "TOKENIZER_PRESETS",
    "tokenizer_config",
    "tokenizer_input",
    "LayerNormNd",
    "AdaptiveTransposedConvUpsample",
    "TokenizerOutput",
    "UniversalTokenizer",
]


@dataclass(frozen=True)
class TokenizerConfig:
    """Sizes of the tokenizer; stored in every checkpoint (``to_dict``/``from_dict``).

    Args:
        in_channels: image channels (3: grey is replicated to RGB).
        start_stride: stride of the first down conv (4); two stride-2 convs follow, total 16.
        down_channels: encoder channels after each down conv.
        up_channels: decoder channels, listed from the output side (the decoder runs them in reverse).
        num_embeddings: codebook size K.
        embedding_dim: codebook vector size.
        norm_groups: GroupNorm groups of the 3x3 conv blocks.
    """

    in_channels: int = 3
    start_stride: int = 4
    down_channels: tuple[int, ...] = (128, 256, 512)
    up_channels: tuple[int, ...] = (128, 256, 512)
    num_embeddings: int = 1024
    embedding_dim: int = 512
    norm_groups: int = 8

    @property
    def stride(self) -> int:
        """In-plane stride of the latent grid (and the depth stride for isotropic input)."""
        return self.start_stride * 2 ** (len(self.down_channels) - 1)

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict, strict: bool = True) -> "TokenizerConfig":
        """Strict by default: an unknown key is an error naming it (:func:`pumit_nnunet.plain.from_plain`)."""
        return from_plain(cls, data, strict=strict, what="tokenizer config")


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    "base": TokenizerConfig(),  # the paper's tokenizer
    "small": TokenizerConfig(down_channels=(64, 128, 256), up_channels=(64, 128, 256), embedding_dim=256),
    "tiny": TokenizerConfig(down_channels=(16, 32, 64), up_channels=(16, 32, 64), num_embeddings=64, embedding_dim=32),
}


def tokenizer_config(name: str, **overrides) -> TokenizerConfig:
    """A preset from :data:`TOKENIZER_PRESETS` with field overrides (``None`` values are ignored)."""
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(TOKENIZER_PRESETS)}")
    return replace(TOKENIZER_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def tokenizer_input(image: Tensor) -> Tensor:
    """Loader crops ``(B, 1|3, D, H, W)`` in [0, 1] -> 3-channel tokenizer input in [-1, 1] (grey replicated)."""
    if image.shape[1] == 1:
        image = image.expand(-1, 3, *image.shape[2:])
    elif image.shape[1] != 3:
        raise ValueError(f"the tokenizer takes 1 or 3 channels, got {image.shape[1]}")
    return image * 2 - 1


class _ChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(1, -1)


class _ChannelsFirst(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1)


class LayerNormNd(nn.Sequential):
    """LayerNorm over the channels of a channel-first tensor (parameters at ``.1``, as the original's keys)."""

    def __init__(self, channels: int) -> None:
        super().__init__(_ChannelsLast(), nn.LayerNorm(channels), _ChannelsFirst())


def _conv3_block(c_in: int, c_out: int, groups: int) -> list[nn.Module]:
    return [SpatiallyAdaptiveConv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU()]


class AdaptiveTransposedConvUpsample(SpatialModule):
    """Adaptive transposed conv x2 (depth only while it was downsampled), then a SAC 3x3 conv, GroupNorm, LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 2, groups: int = 8) -> None:
        super().__init__()
        self.transposed_conv = SpatiallyAdaptiveConvTranspose3d(c_in, c_out, stride)
        self.conv = SpatialSequential(*_conv3_block(c_out, c_out, groups))
        self.level_change = self.transposed_conv.level_change

    def forward(self, x: Tensor, aniso_d: int, level: int = 0) -> Tensor:
        x = self.transposed_conv(x, aniso_d, level)
        return self.conv(x, aniso_d, level + self.level_change)


def build_encoder(config: TokenizerConfig) -> SpatialSequential:
    """Down convs (k = s) each with LayerNormNd + GELU, then two SAC 3x3 conv blocks (the authors' layout)."""
    layers: list[nn.Module] = []
    c_in = config.in_channels
    for i, c_out in enumerate(config.down_channels):
        stride = config.start_stride if i == 0 else 2
        layers += [SpatiallyAdaptiveConv3d(c_in, c_out, stride, stride=stride), LayerNormNd(c_out), nn.GELU()]
        c_in = c_out
    for _ in range(2):
        layers += _conv3_block(c_in, c_in, config.norm_groups)
    return SpatialSequential(*layers)


def build_decoder(config: TokenizerConfig) -> SpatialSequential:
    """Two SAC 3x3 conv blocks, adaptive x2 upsamplings, and a final adaptive transposed conv k = s = start_stride."""
    channels = config.up_channels[::-1]
    layers = _conv3_block(config.embedding_dim, channels[0], config.norm_groups)
    layers += _conv3_block(channels[0], channels[0], config.norm_groups)
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(AdaptiveTransposedConvUpsample(c_in, c_out, 2, config.norm_groups))
    layers.append(SpatiallyAdaptiveConvTranspose3d(channels[-1], config.in_channels, config.start_stride))
    return SpatialSequential(*layers)


@dataclass
class TokenizerOutput:
    """What one training forward produces: the reconstruction and the channel-last token distributions."""

    reconstruction: Tensor
    probs: Tensor  # (B, d, h, w, K), float32
    log_probs: Tensor  # (B, d, h, w, K), float32
    extras: dict = field(default_factory=dict)


class UniversalTokenizer(nn.Module):
    """SAC encoder -> :class:`SoftTokenQuantizer` -> SAC decoder.

    Args:
        config: sizes (see :class:`TokenizerConfig`).
    """

    def __init__(self, config: TokenizerConfig = TokenizerConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.quantize = SoftTokenQuantizer(config.num_embeddings, config.embedding_dim, config.down_channels[-1])
        self.decoder = build_decoder(config)
        self.latent_level = self.encoder.level_change

    def token_grid(self, shape: tuple[int, int, int], aniso_d: int) -> tuple[int, int, int]:
        """Latent grid ``(d, h, w)`` of an input of spatial ``shape`` (dims must be multiples of the strides)."""
        s = self.config.stride
        depth_stride = max(s >> aniso_d, 1)
        d, h, w = shape
        if d % depth_stride or h % s or w % s:
            raise ValueError(f"input {shape} is not a multiple of the strides ({depth_stride}, {s}, {s}) at aniso_d {aniso_d}")
        return d // depth_stride, h // s, w // s

    def encode_logits(self, x: Tensor, aniso_d: int) -> Tensor:
        """Token logits, channel-last ``(B, d, h, w, K)``."""
        self.token_grid(tuple(x.shape[2:]), aniso_d)
        return self.quantize.logits(self.encoder(x, aniso_d, 0))

    def encode(self, x: Tensor, aniso_d: int) -> Tensor:
        """Token distributions ``(B, K, d, h, w)`` (softmax of the logits, temperature 1, float32)."""
        return self.encode_logits(x, aniso_d).float().softmax(-1).movedim(-1, 1)

    def decode(self, probs: Tensor, aniso_d: int) -> Tensor:
        """Image in [-1, 1] (not clamped) from channel-first token distributions ``(B, K, d, h, w)``."""
        z_q = self.quantize.embed(probs.movedim(1, -1).to(self.quantize.embedding.weight.dtype))
        return self.decoder(z_q, aniso_d, self.latent_level)

    def forward(self, x: Tensor, aniso_d: int) -> TokenizerOutput:
        """Encode, soft-quantise and decode; the training entry point."""
        self.token_grid(tuple(x.shape[2:]), aniso_d)
        z_q, probs, log_probs = self.quantize(self.encoder(x, aniso_d, 0))
        return TokenizerOutput(self.decoder(z_q, aniso_d, self.latent_level), probs, log_probs)

    def reconstruct(self, x: Tensor, aniso_d: int) -> Tensor:
        """``decode(encode(x))``: the reconstruction of ``x``."""
        return self.forward(x, aniso_d).reconstruction
