"""Universal ViT (SPAD-ViT): EVA-02 blocks, additive 3D RoPE, SAC patch embedding, CLS and mask tokens.

State-dict names follow the authors' released ``pumit-b.ckpt`` (``cls_token``, 5D ``pos_embed``,
``patch_embed.proj``, ``blocks.N.{norm1, attn.*, norm2, mlp.{w1,w2,ffn_ln,w3}}``, ``norm``, ``mask_token``), so the
released weights load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.utils.checkpoint
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from pumit_nnunet.layers.attention import EvaAttention
from pumit_nnunet.layers.frozen_cache import FrozenCache
from pumit_nnunet.layers.mlp import SwiGLU
from pumit_nnunet.layers.pos_embed import resample_pos_embed
from pumit_nnunet.layers.rope import DEFAULT_ROPE_BASES, AdditiveRope3d
from pumit_nnunet.layers.sac import SpatiallyAdaptiveConv3d
from pumit_nnunet.plain import from_plain, to_plain

__all__ = ["ViTConfig", "VIT_PRESETS", "vit_config", "EvaBlock", "PatchEmbed", "UniversalViT"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of the universal ViT; also what checkpoints record to rebuild it.

    ``patch_depth=None`` keeps the full ``patch_size``-cube kernel and adapts it per input with SAC; an integer
    freezes the kernel at ``(patch_depth, patch_size, patch_size)`` (SAC at a fixed ``aniso_d``, as the authors'
    BTCV/CHAOS fine-tuning does).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 2048
    in_channels: int = 3
    patch_size: int = 16
    patch_depth: int | None = None
    pos_embed_shape: tuple[int, int, int] = (5, 10, 10)
    rope_bases: tuple[float, float, float] = DEFAULT_ROPE_BASES
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    mask_token: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head dim divisible by 4")
        if any(not 0 <= i < self.depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must lie in [0, {self.depth})")
        if self.patch_depth is not None and (self.patch_depth < 1 or self.patch_size % self.patch_depth):
            raise ValueError(f"patch_depth {self.patch_depth} must divide patch_size {self.patch_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON/plans-friendly dict (tuples become lists)."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> "ViTConfig":
        """Strict by default: an unknown key is an error naming it (:func:`pumit_nnunet.plain.from_plain`)."""
        return from_plain(cls, data, strict=strict, what="ViT config")


def _preset(dim: int, depth: int, heads: int, out_indices: Sequence[int]) -> ViTConfig:
    return ViTConfig(embed_dim=dim, depth=depth, num_heads=heads, mlp_hidden_dim=int(dim * 8 / 3), out_indices=tuple(out_indices))


#: sizes are configuration: B is the released PUMIT size, L the large one, S and T for CPUs and tests
VIT_PRESETS: dict[str, ViTConfig] = {
    "T": _preset(128, 4, 2, (0, 1, 2, 3)),
    "S": _preset(384, 12, 6, (3, 5, 7, 11)),
    "B": _preset(768, 12, 12, (3, 5, 7, 11)),
    "L": _preset(1024, 24, 16, (7, 11, 15, 23)),
}


def vit_config(name: str, **overrides: Any) -> ViTConfig:
    """Return the preset ``name`` (T, S, B, L) with ``overrides`` applied."""
    try:
        base = VIT_PRESETS[name.upper()]
    except KeyError:
        raise ValueError(f"unknown ViT size {name!r}; choose one of {sorted(VIT_PRESETS)}") from None
    return replace(base, **overrides)


class EvaBlock(nn.Module):
    """Pre-LN EVA-02 block without layer scale: ``x + attn(norm1 x)`` then ``x + mlp(norm2 x)``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, eps: float = 1e-5, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EvaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, mlp_hidden_dim, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Patchify with a SAC conv (adaptive 16^3 kernel) or a fixed ``(patch_depth, 16, 16)`` conv."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, patch_depth: int | None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.patch_depth = patch_depth
        if patch_depth is None:
            self.proj: nn.Module = SpatiallyAdaptiveConv3d(in_channels, dim, patch_size, stride=patch_size, as_matmul=True)
        else:
            kernel = (patch_depth, patch_size, patch_size)
            self.proj = nn.Conv3d(in_channels, dim, kernel, stride=kernel)

    def token_size(self, aniso_d: int) -> tuple[int, int, int]:
        """Voxels per token (D, H, W) at ``aniso_d``."""
        depth = self.patch_depth if self.patch_depth is not None else max(self.patch_size >> aniso_d, 1)
        return (depth, self.patch_size, self.patch_size)

    def forward(self, x: Tensor, aniso_d: int) -> Tensor:
        token = self.token_size(aniso_d)
        if any(s % t for s, t in zip(x.shape[2:], token)):
            raise ValueError(f"input of spatial shape {tuple(x.shape[2:])} is not divisible into tokens of {token} voxels (aniso_d={aniso_d})")
        if self.patch_depth is None:
            return self.proj(x, aniso_d, 0)
        return self.proj(x)


class UniversalViT(nn.Module):
    """The universal ViT. ``forward_features`` returns every block's (un-normed) output; ``forward`` the normed last.

    Inputs are ``(B, C, D, H, W)`` with D the (possibly anisotropic) depth axis; ``aniso_d`` is passed explicitly.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(config.in_channels, dim, config.patch_size, config.patch_depth)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *config.pos_embed_shape))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.mask_token else None
        self.rope = AdditiveRope3d(dim // config.num_heads, config.rope_bases)
        # the resampled position embedding of each grid, kept for frozen use (prediction, evaluation)
        self.pos_embed_cache = FrozenCache()
        # a plain list (not torch.linspace) so that the model can be built on the meta device
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            EvaBlock(dim, config.num_heads, config.mlp_hidden_dim, config.norm_eps, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.grad_checkpointing = False
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.mask_token is not None:
            # the original leaves the mask token uninitialised (torch.empty); we initialise it like the CLS token
            trunc_normal_(self.mask_token, std=0.02)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def no_weight_decay(self) -> set[str]:
        """Parameter names that must not be weight-decayed (besides biases and norms)."""
        return {"cls_token", "pos_embed", "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed_patches(self, x: Tensor, aniso_d: int) -> tuple[Tensor, tuple[int, int, int]]:
        """Patch tokens with absolute position embedding, ``(B, N, C)``, and the token grid ``(D', H', W')``."""
        x = self.patch_embed(x, aniso_d)
        grid = tuple(x.shape[2:])
        key = FrozenCache.key(self.pos_embed, None, x.dtype, *grid)
        x = x + self.pos_embed_cache.get(key, lambda: resample_pos_embed(self.pos_embed, grid).to(x.dtype))
        return x.flatten(2).transpose(1, 2), grid  # type: ignore[return-value]

    def prepend_cls(self, tokens: Tensor) -> Tensor:
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def rope_tables(self, grid: Sequence[int], like: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE cos/sin of ``grid`` (cached by :class:`AdditiveRope3d`), in the dtype q and k have: autocast's when
        it is on (so that no block casts the tables again), float32 otherwise."""
        kind = like.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32
        return self.rope.cos_sin(grid, like.device, dtype)

    def run_block(self, index: int, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward_features(self, x: Tensor, aniso_d: int) -> list[Tensor]:
        """Outputs of every block, each ``(B, 1 + N, C)`` with the CLS token first (not normed)."""
        tokens, grid = self.embed_patches(x, aniso_d)
        x = self.prepend_cls(tokens)
        rope = self.rope_tables(grid, x)
        outputs = []
        for i in range(len(self.blocks)):
            x = self.run_block(i, x, rope)
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor, aniso_d: int) -> Tensor:
        """Normed output of the last block, ``(B, 1 + N, C)``."""
        return self.norm(self.forward_features(x, aniso_d)[-1])

    def token_grid(self, spatial_shape: Sequence[int], aniso_d: int) -> tuple[int, int, int]:
        token = self.patch_embed.token_size(aniso_d)
        return tuple(s // t for s, t in zip(spatial_shape, token))  # type: ignore[return-value]
