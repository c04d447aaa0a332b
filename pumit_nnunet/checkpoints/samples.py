"""Checkpoints with the exact key names, shapes and containers of the released formats, built from a model's
weights. Tests, benchmarks and CI use them instead of downloading the real files (nothing downloads here).

- :func:`released_pumit_checkpoint`: the authors' Lightning ``pumit-b.ckpt`` (``state_dict`` with ``mask_token``
  and ``mim_head.{0,2}``, plus Lightning's bookkeeping entries);
- :func:`eva02_original_checkpoint`: BAAI's ``eva02_*_pt_*_p14.pt`` (weights under ``module``, 4D 14x14 kernel,
  ``pos_embed`` (1, 1 + 16*16, C), ``rope.freqs_cos/sin`` at the root and in every attention, ``lm_head``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["randomise_", "released_pumit_checkpoint", "eva02_original_checkpoint"]


@torch.no_grad()
def randomise_(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Fill every parameter with seeded random values (norm weights around 1) so that equivalence tests catch
    any mis-mapped tensor, including norms and biases that default to constants."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * scale
        is_norm_weight = name.endswith("weight") and param.dim() == 1
        param.copy_(noise + 1.0 if is_norm_weight else noise)
    return module


def released_pumit_checkpoint(vit_state: dict[str, Tensor], codebook_size: int = 1024) -> dict[str, Any]:
    """A Lightning checkpoint as ``ViTForMIM`` saves it, from an adaptive ViT's state dict (with ``mask_token``)."""
    dim = vit_state["cls_token"].shape[-1]
    state = dict(vit_state)
    state.setdefault("mask_token", torch.randn(1, 1, dim) * 0.02)
    state["mim_head.0.weight"] = torch.randn(dim, dim) * 0.02
    state["mim_head.0.bias"] = torch.zeros(dim)
    state["mim_head.2.weight"] = torch.randn(codebook_size, dim) * 0.02
    state["mim_head.2.bias"] = torch.zeros(codebook_size)
    return {
        "epoch": 0,
        "global_step": 250_000,
        "pytorch-lightning_version": "2.0.6",
        "state_dict": state,
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


def eva02_original_checkpoint(
    vit_state: dict[str, Tensor], patch: int = 14, grid: int = 16, head_dim: int = 64, lm_dim: int = 1024
) -> dict[str, Any]:
    """EVA-02's MIM file from a ViT's block weights (same names), with EVA's own patch kernel and 1D embedding."""
    dim = vit_state["cls_token"].shape[-1]
    in_channels = vit_state["patch_embed.proj.weight"].shape[1]
    module = {k: v for k, v in vit_state.items() if k.startswith(("blocks.", "norm.", "cls_token"))}
    module["mask_token"] = torch.randn(1, 1, dim) * 0.02
    module["pos_embed"] = torch.randn(1, 1 + grid * grid, dim) * 0.02
    module["patch_embed.proj.weight"] = torch.randn(dim, in_channels, patch, patch) * 0.02
    module["patch_embed.proj.bias"] = torch.randn(dim) * 0.02
    tables = torch.randn(grid * grid, head_dim)
    depth = 1 + max(int(k.split(".")[1]) for k in module if k.startswith("blocks."))
    for prefix in ["", *(f"blocks.{i}.attn." for i in range(depth))]:
        module[f"{prefix}rope.freqs_cos"] = tables.cos()
        module[f"{prefix}rope.freqs_sin"] = tables.sin()
    module["lm_head.weight"] = torch.randn(lm_dim, dim) * 0.02
    module["lm_head.bias"] = torch.zeros(lm_dim)
    return {"module": module}
