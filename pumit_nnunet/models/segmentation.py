"""PUMIT segmentation network: universal ViT backbone, hierarchical neck and U-Net decoder with deep supervision.

The constructor takes only JSON types so that nnU-Net's plans can describe it
(``architecture.network_class_name = "pumit_nnunet.models.segmentation.PumitSegNet"``). The backbone is built
at a fixed ``aniso_d`` (the plan's): its patch kernel is ``(16 >> aniso_d, 16, 16)``, i.e. SAC frozen at that
degree of anisotropy, and its position embedding has the plan's token grid. 2D plans (patch of 2 axes) run as
single-slice volumes at ``aniso_d = 5``.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from pumit_nnunet.anisotropy import MAX_ANISO_D, token_depth
from pumit_nnunet.models.seg_blocks import TOKEN_LEVEL, UNetDecoder, ViTNeck, decoder_config, depth_factor
from pumit_nnunet.models.vit import UniversalViT, ViTConfig, vit_config

__all__ = ["PumitSegNet", "patch_divisor", "backbone_config", "deep_supervision_scales", "CHECKPOINTING_MODES"]

#: deepest in-plane level of the pyramid (1/32)
DEEPEST_LEVEL = TOKEN_LEVEL + 1
#: activation checkpointing, from least to most memory saved: nothing, the ViT blocks, ViT blocks + neck + decoder
CHECKPOINTING_MODES = ("none", "backbone", "all")


def patch_divisor(aniso_d: int, spatial_dims: int = 3) -> tuple[int, ...]:
    """What every patch axis must be divisible by: whole tokens and the neck's deepest (1/32) level."""
    inplane = 2 ** DEEPEST_LEVEL
    if spatial_dims == 2:
        return (inplane, inplane)
    # the deepest level's depth factor is a multiple of the token depth (16 >> aniso_d), so it covers both
    return (depth_factor(DEEPEST_LEVEL, aniso_d), inplane, inplane)


def deep_supervision_scales(spatial_dims: int, aniso_d: int) -> list[list[float]]:
    """Size of each deep-supervision output relative to the input (highest resolution first), for nnU-Net's
    target downsampling; the four heads sit at in-plane levels 0-3."""
    scales = []
    for level in range(4):
        inplane = [1 / 2 ** level] * 2
        scales.append(inplane if spatial_dims == 2 else [1 / depth_factor(level, aniso_d), *inplane])
    return scales


def backbone_config(vit: str | dict[str, Any], input_channels: int, patch_size: Sequence[int], aniso_d: int,
                    **overrides: Any) -> ViTConfig:
    """ViT config of a backbone for ``patch_size`` (3D or 2D) at ``aniso_d``."""
    spatial = list(patch_size) if len(patch_size) == 3 else [1, *patch_size]
    depth_voxels = token_depth(16, aniso_d)
    divisor = patch_divisor(aniso_d, len(patch_size))
    if any(s % d for s, d in zip(patch_size, divisor)) or min(spatial[1:]) < 16:
        raise ValueError(
            f"patch size {list(patch_size)} must be divisible by {list(divisor)} (whole 16x16 tokens and the neck's 1/32 level) "
            f"at aniso_d={aniso_d}; smaller than one token is not possible"
        )
    grid = (spatial[0] // depth_voxels, spatial[1] // 16, spatial[2] // 16)
    base = vit_config(vit) if isinstance(vit, str) else ViTConfig.from_dict(vit)
    options = dict(in_channels=input_channels, patch_depth=depth_voxels, pos_embed_shape=grid)
    options.update(overrides)
    return ViTConfig(**{**base.__dict__, **options})


class PumitSegNet(nn.Module):
    """ViT backbone + neck + U-Net decoder; nnU-Net's output contract (raw logits; a list highest resolution
    first when deep supervision is on).

    Args:
        input_channels: image channels (nnU-Net passes them).
        num_classes: segmentation heads (nnU-Net passes ``label_manager.num_segmentation_heads``).
        deep_supervision: return the outputs of the four heads.
        patch_size: the plan's patch (3 axes, or 2 for a 2D configuration).
        aniso_d: degree of anisotropy of the plan's spacing (ignored for 2D, which is 5).
        vit: a preset name (T, S, B, L) or a full ViT config dict.
        vit_overrides: fields of the ViT config to override (e.g. ``drop_path_rate``).
        decoder: a decoder preset (``authors``, the default; ``lite``, nnU-Net's widths capped at 320) or a dict
            of :class:`~pumit_nnunet.models.seg_blocks.DecoderConfig` fields.
        lateral_channels: overrides the decoder channels at in-plane 1/4, 1/8, 1/16, 1/32.
        fullres_channels: overrides the decoder channels at full resolution and 1/2.
        input_affine: ``(scale, shift)`` applied to the input before backbone and decoder, e.g. ``(2, -1)``: the
            authors' BTCV model maps its [0, 1] input to ``2x - 1`` itself (after augmentation), so do we, and
            prediction (which rebuilds the network from the plans) applies it too. None: the input as given.
        activation_checkpointing: one of :data:`CHECKPOINTING_MODES`; recomputes activations in the backward
            pass instead of keeping them (training memory only: outputs and gradients are unchanged).
    """

    key_to_encoder = "backbone"
    key_to_stem = "backbone.patch_embed"
    keys_to_in_proj = ("backbone.patch_embed.proj",)
    key_to_lpe = "backbone.pos_embed"

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = True, *,
                 patch_size: Sequence[int], aniso_d: int = 0, vit: str | dict[str, Any] = "B",
                 vit_overrides: dict[str, Any] | None = None, decoder: str | dict[str, Any] = "authors",
                 lateral_channels: Sequence[int] | None = None, fullres_channels: Sequence[int] | None = None,
                 activation_checkpointing: str = "none", input_affine: Sequence[float] | None = None) -> None:
        super().__init__()
        self.input_affine = None if input_affine is None else (float(input_affine[0]), float(input_affine[1]))
        if len(patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 axes, got {list(patch_size)}")
        self.spatial_dims = len(patch_size)
        self.aniso_d = MAX_ANISO_D if self.spatial_dims == 2 else int(aniso_d)
        if not 0 <= self.aniso_d <= MAX_ANISO_D:
            raise ValueError(f"aniso_d must be in [0, {MAX_ANISO_D}], got {aniso_d}")
        config = backbone_config(vit, input_channels, patch_size, self.aniso_d, **(vit_overrides or {}))
        if len(config.out_indices) != 4:
            raise ValueError(f"the neck needs 4 backbone outputs, got out_indices={config.out_indices}")
        self.backbone = UniversalViT(config)
        # the neck reads un-normed block outputs; an unused final norm would break DDP (nnU-Net wraps without
        # find_unused_parameters), so the segmentation backbone has none (checkpoint loaders skip ``norm.*``)
        self.backbone.norm = nn.Identity()
        self.neck = ViTNeck(config.embed_dim, self.aniso_d)
        widths = decoder_config(decoder, lateral_channels=lateral_channels, fullres_channels=fullres_channels)
        self.decoder = UNetDecoder(config.embed_dim, input_channels, num_classes, self.aniso_d, widths, deep_supervision)
        self.set_activation_checkpointing(activation_checkpointing)

    def set_activation_checkpointing(self, mode: str) -> None:
        """``none``, ``backbone`` (the ViT blocks) or ``all`` (ViT blocks, neck branches, decoder stages)."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"activation_checkpointing must be one of {list(CHECKPOINTING_MODES)}, got {mode!r}")
        self.activation_checkpointing = mode
        self.backbone.set_grad_checkpointing(mode != "none")
        self.neck.checkpointing = self.decoder.checkpointing = mode == "all"

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled

    def deep_supervision_scales(self) -> list[list[float]]:
        """Per output (highest resolution first), its size relative to the input, for nnU-Net's target downsampling."""
        return deep_supervision_scales(self.spatial_dims, self.aniso_d)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.input_affine is not None:
            x = x * self.input_affine[0] + self.input_affine[1]
        if self.spatial_dims == 2:
            x = x.unsqueeze(2)
        out = self.decoder(x, self.neck(self.backbone_maps(x)))
        if self.spatial_dims == 2:
            return [o.squeeze(2) for o in out] if isinstance(out, list) else out.squeeze(2)
        return out

    def backbone_maps(self, x: Tensor) -> list[Tensor]:
        """The outputs of the backbone blocks in ``out_indices`` as ``(B, C, *token_grid)`` maps (the neck's
        input) for a 5D input ``x`` (after ``input_affine``)."""
        features = self.backbone.forward_features(x, self.aniso_d)
        grid = self.backbone.token_grid(x.shape[2:], self.aniso_d)
        return [features[i][:, self.backbone.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
                for i in self.backbone.config.out_indices]

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay parameters, named from here (under the declared :attr:`key_to_encoder`)."""
        return {f"{self.key_to_encoder}.{n}" for n in self.encoder.no_weight_decay()}

    @property
    def encoder(self) -> UniversalViT:
        """The pre-trained part: the submodule named by :attr:`key_to_encoder` (nnU-Net's Primus contract)."""
        return self.get_submodule(self.key_to_encoder)
