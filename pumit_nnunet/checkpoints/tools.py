"""Checkpoint-level operations behind ``pumit-nnunet weights``: describe a file, read the ViT config the weights
were trained with, convert a file into our format. (Targets from nnU-Net plans: :mod:`pumit_nnunet.nnunet.pretrained`.)"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from pumit_nnunet.checkpoints.format import (
    VIT_ADAPTATION,
    PretrainPlan,
    save_pumit_checkpoint,
)
from pumit_nnunet.checkpoints.load import infer_vit_architecture, load_vit_weights
from pumit_nnunet.checkpoints.readers import SourceWeights, read_weights
from pumit_nnunet.checkpoints.report import LoadReport
from pumit_nnunet.models.vit import VIT_PRESETS, UniversalViT, ViTConfig

__all__ = ["describe_checkpoint", "source_vit_config", "source_pretrain_plan", "convert_checkpoint"]

#: what the released PUMIT and EVA-02 MIM weights were trained on
IMAGENET_RGB_PLAN = PretrainPlan(in_channels=3, intensity="unit-range-imagenet",
                                 notes="[0, 1] per image, replicated to RGB, ImageNet-normalised")


def describe_checkpoint(weights: SourceWeights) -> dict[str, Any]:
    """A JSON-friendly description: format, kind, version, architecture (recorded or read off the weights)."""
    encoder = weights.encoder_state_dict()
    info: dict[str, Any] = {
        "source": weights.source,
        "format": weights.format,
        "encoder_prefix": weights.encoder_prefix,
        "tensors": len(weights.state_dict),
        "parameters": int(sum(v.numel() for v in weights.state_dict.values())),
        "vit_parameters": int(sum(v.numel() for v in encoder.values())),
        "inferred_vit": infer_vit_architecture(encoder),
        "heads": sorted({k.split(".")[0] for k in encoder if k.startswith(("mim_head.", "lm_head.", "head."))}),
    }
    if weights.checkpoint is not None:
        ckpt = weights.checkpoint
        info.update(kind=ckpt.kind, version=ckpt.version, architecture=ckpt.architecture,
                    pretrain_plan=ckpt.pretrain_plan and ckpt.pretrain_plan.__dict__,
                    adaptation=ckpt.adaptation and ckpt.adaptation.__dict__)
    return info


def source_vit_config(weights: SourceWeights) -> ViTConfig:
    """The ViT config the weights were trained with: recorded in ours, else read off the tensors (64-channel heads,
    out_indices of the preset of the same size)."""
    recorded = weights.checkpoint.architecture if weights.checkpoint else {}
    if "embed_dim" in recorded:
        return ViTConfig.from_dict(recorded)
    arch = infer_vit_architecture(weights.encoder_state_dict())
    preset = next((p for p in VIT_PRESETS.values() if (p.embed_dim, p.depth) == (arch["embed_dim"], arch["depth"])), None)
    depth = arch["depth"]
    if arch["patch_depth"] is None:  # a 2D (EVA-02) kernel, e.g. 14x14: ours is the 16^3 SAC kernel it converts into
        arch = {**arch, "patch_size": 16}
    fields: dict[str, Any] = {
        "embed_dim": arch["embed_dim"], "depth": depth, "in_channels": arch["in_channels"],
        "num_heads": preset.num_heads if preset else max(arch["embed_dim"] // 64, 1),
        "mlp_hidden_dim": arch.get("mlp_hidden_dim", int(arch["embed_dim"] * 8 / 3)),
        "patch_size": arch["patch_size"],
        "patch_depth": None if arch["patch_depth"] in (None, arch["patch_size"]) else arch["patch_depth"],
        "out_indices": preset.out_indices if preset else tuple(range(max(depth - 4, 0), depth)),
        "mask_token": arch["mask_token"],
    }
    if "pos_embed_shape" in arch:
        fields["pos_embed_shape"] = tuple(arch["pos_embed_shape"])
    return ViTConfig(**fields)


def source_pretrain_plan(weights: SourceWeights) -> PretrainPlan:
    """What the weights were trained on (recorded in ours; the released PUMIT and EVA-02 weights: ImageNet RGB)."""
    if weights.checkpoint is not None and weights.checkpoint.pretrain_plan is not None:
        return weights.checkpoint.pretrain_plan
    return replace(IMAGENET_RGB_PLAN)


def convert_checkpoint(
    source: str | os.PathLike, out: str | os.PathLike, config: ViTConfig | None = None, *,
    channel_mode: str = "sum", allow_partial: bool = False, eva_cls_pos_index: int = 0, overwrite: bool = False,
) -> LoadReport:
    """Convert any supported checkpoint into ours (kind ``vit``) for ``config`` (default: the source's own)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force")
    weights = read_weights(source)
    config = config or source_vit_config(weights)
    vit = UniversalViT(config)
    report = load_vit_weights(vit, weights, allow_partial=allow_partial, channel_mode=channel_mode,
                              eva_cls_pos_index=eva_cls_pos_index, log=None)
    plan = source_pretrain_plan(weights)
    if channel_mode == "imagenet-fold":
        plan = replace(plan, intensity="unit-range", notes=f"{plan.notes}; ImageNet normalisation folded into the patch embedding".lstrip("; "))
    save_pumit_checkpoint(
        out, kind="vit", state_dict=vit.state_dict(), architecture=config.to_dict(), pretrain_plan=plan,
        adaptation=VIT_ADAPTATION,
        extra={"converted_from": str(source), "source_format": weights.format, "channel_mode": channel_mode,
               "load_report": report.summary()},
    )
    return report
