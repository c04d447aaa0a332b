"""Loading any supported checkpoint into a :class:`~pumit_nnunet.models.vit.UniversalViT`, with a load report."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from pumit_nnunet.checkpoints.convert import CHANNEL_MODES, ConversionResult, convert_vit_state_dict
from pumit_nnunet.checkpoints.format import CheckpointError
from pumit_nnunet.checkpoints.readers import PATCH_KEY, SourceWeights, read_weights, vit_flavour
from pumit_nnunet.checkpoints.report import LoadReport

__all__ = ["infer_vit_architecture", "load_vit_weights", "convert_for_vit", "load_network_strict", "unwrap_network"]

#: model keys a checkpoint may legitimately lack (they keep their initialisation)
OPTIONAL_KEYS = ("mask_token",)
#: config fields the weights cannot reveal but a checkpoint of ours records
_RECORDED_ONLY = ("num_heads", "rope_bases")


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(network, nn.parallel.DistributedDataParallel) or type(network).__name__ == "DataParallel":
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def infer_vit_architecture(encoder: Mapping[str, Tensor]) -> dict[str, Any]:
    """ViT sizes readable from the weights (num_heads is not; 64-channel heads are assumed by callers)."""
    kernel = encoder[PATCH_KEY]
    blocks = {int(m.group(1)) for k in encoder if (m := re.match(r"blocks\.(\d+)\.", k))}
    arch: dict[str, Any] = {
        "embed_dim": int(kernel.shape[0]),
        "depth": max(blocks) + 1 if blocks else 0,
        "in_channels": int(kernel.shape[1]),
        "patch_size": int(kernel.shape[-1]),
        "patch_depth": int(kernel.shape[2]) if kernel.dim() == 5 else None,
    }
    for key in ("blocks.0.mlp.w1.weight", "blocks.0.mlp.fc1_g.weight"):
        if key in encoder:
            arch["mlp_hidden_dim"] = int(encoder[key].shape[0])
    pe = encoder.get("pos_embed")
    if pe is not None and pe.dim() == 5:
        arch["pos_embed_shape"] = [int(s) for s in pe.shape[2:]]
    arch["mask_token"] = "mask_token" in encoder
    return arch


def _hint(encoder: Mapping[str, Tensor], config: Any) -> str:
    arch = infer_vit_architecture(encoder)
    fields = ("embed_dim", "depth", "mlp_hidden_dim")
    theirs = ", ".join(f"{f} {arch.get(f)}" for f in fields)
    ours = ", ".join(f"{f} {getattr(config, f)}" for f in fields)
    return f"checkpoint ViT: {theirs}; model ViT: {ours}"


def _report(result: ConversionResult, model_state: Mapping[str, Tensor], weights: SourceWeights) -> tuple[dict[str, Tensor], LoadReport]:
    report = LoadReport(source=weights.source, format=weights.format, skipped=list(result.skipped))
    to_load = {}
    for key, target in model_state.items():
        value = result.state_dict.get(key)
        if value is None:
            (report.initialised if key in OPTIONAL_KEYS else report.missing).append(key)
        elif tuple(value.shape) != tuple(target.shape):
            report.mismatched[key] = f"checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
        else:
            to_load[key] = value
            if key in result.converted:
                report.converted[key] = result.converted[key]
            else:
                report.loaded.append(key)
    extra = [k for k in result.state_dict if k not in model_state]
    # a segmentation backbone replaces the final norm by Identity (its neck reads un-normed block outputs)
    dropped_norm = not any(k.startswith("norm.") for k in model_state)
    report.skipped += [k for k in extra if dropped_norm and k.startswith("norm.")]
    report.unexpected = [k for k in extra if k not in report.skipped]
    return to_load, report


def _recorded_vit_config(weights: SourceWeights) -> Mapping[str, Any]:
    """The ViT config a checkpoint of ours records (bare, or under ``"vit"`` for a segmentation network)."""
    arch = weights.checkpoint.architecture if weights.checkpoint else {}
    if "embed_dim" in arch:
        return arch
    nested = arch.get("vit")
    return nested if isinstance(nested, Mapping) else {}


def _check_recorded_config(weights: SourceWeights, config: Any, report: LoadReport) -> None:
    recorded = _recorded_vit_config(weights)
    for name in _RECORDED_ONLY:
        if name in recorded and [float(v) for v in _as_list(recorded[name])] != [float(v) for v in _as_list(getattr(config, name))]:
            report.mismatched[f"config.{name}"] = f"checkpoint {recorded[name]} vs model {getattr(config, name)}"


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_channel_mode(weights: SourceWeights, channel_mode: str) -> None:
    if channel_mode not in CHANNEL_MODES:
        raise ValueError(f"channel_mode {channel_mode!r} is not one of {CHANNEL_MODES}")
    plan = weights.checkpoint.pretrain_plan if weights.checkpoint else None
    if channel_mode == "imagenet-fold" and plan is not None and plan.intensity != "unit-range-imagenet":
        raise CheckpointError(
            f"{weights.source} was pre-trained with intensity {plan.intensity!r}; 'imagenet-fold' applies only to "
            "weights trained on ImageNet-normalised [0, 1] RGB input (use channel_mode='sum')"
        )


def convert_for_vit(
    weights: SourceWeights, config: Any, model_state: Mapping[str, Tensor], *, channel_mode: str = "sum",
    eva_cls_pos_index: int = 0,
) -> tuple[dict[str, Tensor], LoadReport]:
    """Convert ``weights`` to the ViT ``config``; returns the loadable entries and the report (nothing loaded yet)."""
    _check_channel_mode(weights, channel_mode)
    encoder = weights.encoder_state_dict()
    flavour = vit_flavour(encoder)
    try:
        result = convert_vit_state_dict(
            encoder,
            flavour=flavour,
            patch_size=config.patch_size,
            patch_depth=config.patch_depth or config.patch_size,
            in_channels=config.in_channels,
            pos_embed_shape=config.pos_embed_shape,
            has_mask_token=config.mask_token,
            channel_mode=channel_mode,
            eva_cls_pos_index=eva_cls_pos_index,
        )
    except ValueError as error:
        raise CheckpointError(f"{weights.source}: cannot convert the patch embedding: {error}\n{_hint(encoder, config)}") from error
    to_load, report = _report(result, model_state, weights)
    _check_recorded_config(weights, config, report)
    report.architecture_hint = _hint(encoder, config)
    return to_load, report


def load_vit_weights(
    vit: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    allow_partial: bool = False,
    eva_cls_pos_index: int = 0,
    channel_mode: str = "sum",
    log: Callable[[str], None] | None = print,
) -> LoadReport:
    """Read any supported checkpoint, convert it to ``vit.config``, load it and return (and log) the report.

    Missing, unexpected or mismatched backbone keys raise :class:`CheckpointError` unless ``allow_partial``;
    then only the matching entries are loaded. Pre-training heads are always skipped.
    """
    weights = source if isinstance(source, SourceWeights) else read_weights(source)
    to_load, report = convert_for_vit(
        weights, vit.config, vit.state_dict(), channel_mode=channel_mode, eva_cls_pos_index=eva_cls_pos_index
    )
    if not allow_partial:
        report.raise_if_incomplete()
    with torch.no_grad():
        vit.load_state_dict(to_load, strict=False)
    if log is not None:
        log(report.summary())
    return report


def load_network_strict(network: nn.Module, weights: SourceWeights, log: Callable[[str], None] | None = print) -> LoadReport:
    """Load a whole network (e.g. a fine-tuned nnU-Net results checkpoint of the same network) strictly."""
    model_state = network.state_dict()
    result = ConversionResult(dict(weights.state_dict))
    to_load, report = _report(result, model_state, weights)
    report.raise_if_incomplete()
    network.load_state_dict(to_load, strict=True)
    if log is not None:
        log(report.summary())
    return report
