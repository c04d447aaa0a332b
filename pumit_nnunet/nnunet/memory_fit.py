"""Fitting a PUMIT training configuration into a GPU memory budget: the one rule `pumit-nnunet plan` and the
trainers (on stock nnU-Net plans) share.

**Budget.** nnU-Net's reference budget, 8 GiB (its planner's default ``gpu_memory_target_in_gb``, the memory its
U-Net reference values correspond to), unless ``PUMIT_GPU_MEMORY_GB`` (or ``pumit-nnunet plan --gpu-memory-gb``)
gives another. It is the memory one training process may use, in GiB (2^30 bytes; what ``nvidia-smi`` shows).

**Rule** (the first step that fits wins; the estimate is :func:`pumit_nnunet.nnunet.memory.peak_memory_bytes`,
bf16 autocast as the trainers run on CUDA):

1. keep the plan's patch, batch and activation checkpointing;
2. enable activation checkpointing: ``backbone`` (the ViT blocks), then ``all`` (also the neck and decoder);
   outputs and gradients are unchanged, a step costs one more forward of the checkpointed parts;
3. lower the batch to the largest that fits, never below 2 (nnU-Net's minimum);
4. shrink the patch one divisor step (whole tokens and the neck's strides) at a time along the axis with the
   largest patch / median-image ratio, the axis nnU-Net's planners shrink.

If even the smallest patch does not fit, the decision says so (``fits`` is False) and the caller warns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Sequence

from pumit_nnunet.nnunet import memory

__all__ = [
    "ENV_BUDGET", "NNUNET_REFERENCE_GB", "MIN_BATCH_SIZE", "gpu_budget_gb", "network_shape", "shrink_patch_to_fit",
    "FitDecision", "fit_training", "estimate_peak_memory_bytes",
]

ENV_BUDGET = "PUMIT_GPU_MEMORY_GB"
#: nnU-Net's ``ExperimentPlanner`` default ``gpu_memory_target_in_gb`` (= ``UNet_reference_val_corresp_GB``)
NNUNET_REFERENCE_GB = 8.0
#: nnU-Net's ``UNet_min_batch_size``
MIN_BATCH_SIZE = 2


def gpu_budget_gb(explicit: float | None = None) -> tuple[float, str]:
    """``(budget in GiB, where it came from)``: ``explicit`` (a command-line value), else ``PUMIT_GPU_MEMORY_GB``,
    else nnU-Net's reference budget."""
    from pumit_nnunet.errors import UsageError

    if explicit is not None:
        value, source = float(explicit), "--gpu-memory-gb"
    else:
        text = os.environ.get(ENV_BUDGET, "").strip()
        if not text:
            return NNUNET_REFERENCE_GB, f"nnU-Net's reference budget; set {ENV_BUDGET} to change it"
        try:
            value, source = float(text), ENV_BUDGET
        except ValueError:
            raise UsageError(f"{ENV_BUDGET}={text!r} is not a number of GiB", ENV_BUDGET) from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"the GPU memory budget must be a positive number of GiB, got {value:g}", source)
    return value, source


@lru_cache(maxsize=32)
def _parameter_counts(vit: str, in_channels: int, num_classes: int, aniso_d: int, spatial_dims: int,
                      overrides: str) -> tuple[int, int]:
    """(parameters without the position embedding, parameter tensors), counted on a meta-device network."""
    import torch

    from pumit_nnunet.models.segmentation import PumitSegNet, patch_divisor

    patch = list(patch_divisor(aniso_d, spatial_dims))
    with torch.device("meta"):
        net = PumitSegNet(in_channels, num_classes, patch_size=patch, aniso_d=aniso_d, vit=json.loads(vit),
                          **json.loads(overrides))
    parameters = list(net.parameters())
    return sum(p.numel() for p in parameters) - net.backbone.pos_embed.numel(), len(parameters)


def network_shape(vit: str | dict[str, Any], in_channels: int, num_classes: int, aniso_d: int, spatial_dims: int,
                  arch_overrides: dict[str, Any] | None = None) -> memory.NetworkShape:
    """The memory model's view of a :class:`PumitSegNet` (``arch_overrides``: its further keyword arguments, as in
    the plans' ``arch_kwargs``); parameters are counted once per network on the meta device (cached)."""
    from pumit_nnunet.models.seg_blocks import decoder_config
    from pumit_nnunet.models.vit import ViTConfig, vit_config

    overrides = {k: v for k, v in (arch_overrides or {}).items() if k not in ("patch_size", "aniso_d", "vit")}
    base = vit_config(vit) if isinstance(vit, str) else ViTConfig.from_dict(vit)
    config = replace(base, **overrides.get("vit_overrides", {}))
    decoder = decoder_config(overrides.get("decoder", "authors"), lateral_channels=overrides.get("lateral_channels"),
                             fullres_channels=overrides.get("fullres_channels"))
    params, tensors = _parameter_counts(json.dumps(vit, sort_keys=True), in_channels, num_classes, aniso_d,
                                        spatial_dims, json.dumps(overrides, sort_keys=True))
    return memory.NetworkShape(
        embed_dim=config.embed_dim, depth=config.depth, mlp_hidden_dim=config.mlp_hidden_dim, in_channels=in_channels,
        num_classes=num_classes, parameters_without_pos_embed=params, channels=decoder.channels,
        activation_checkpointing=overrides.get("activation_checkpointing", "none"), parameter_tensors=tensors,
    )


def estimate_peak_memory_bytes(arch_kwargs: dict[str, Any], in_channels: int, num_classes: int,
                               batch_size: int) -> float:
    """Estimated peak CUDA memory (bf16 autocast, AdamW) of one training step of the network a plans
    configuration's ``architecture.arch_kwargs`` describe: the number the fitting rule compares with the budget."""
    patch, aniso_d = list(arch_kwargs["patch_size"]), int(arch_kwargs["aniso_d"])
    net = network_shape(arch_kwargs["vit"], in_channels, num_classes, aniso_d, len(patch), arch_kwargs)
    return memory.peak_memory_bytes(patch, batch_size, aniso_d, net)


def shrink_patch_to_fit(patch: Sequence[int], median_shape: Sequence[float], divisor: Sequence[int],
                        fits: Callable[[list[int]], bool]) -> list[int]:
    """Shrink the axis with the largest patch/median ratio by one ``divisor`` step until ``fits(patch)``; stops
    at one divisor per axis (the caller then warns that even the smallest patch does not fit)."""
    patch = [int(p) for p in patch]
    while not fits(patch):
        shrinkable = [i for i in range(len(patch)) if patch[i] > divisor[i]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda i: (patch[i] / max(float(median_shape[i]), 1.0), -i))
        patch[axis] -= divisor[axis]
    return patch


@dataclass(frozen=True)
class FitDecision:
    """What the fitting rule chose, and why (``steps``: one line per rule step taken, with its estimate)."""

    patch_size: tuple[int, ...]
    batch_size: int
    activation_checkpointing: str
    estimate_bytes: float
    budget_gb: float
    budget_source: str
    steps: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.estimate_bytes <= self.budget_gb * memory.GIB

    def message(self, what: str) -> str:
        """One log line: ``what`` (e.g. ``3d_fullres, ViT-B``), the budget, the steps and the outcome."""
        outcome = "fits" if self.fits else "DOES NOT FIT even at the smallest patch; expect out-of-memory"
        return (f"PUMIT memory fit ({what}; budget {self.budget_gb:g} GiB from {self.budget_source}): "
                f"{'; '.join(self.steps)} -> {outcome}")


def _gib(value: float) -> str:
    return f"~{value / memory.GIB:.1f} GiB"


def fit_training(patch_size: Sequence[int], batch_size: int, aniso_d: int, net: memory.NetworkShape,
                 median_shape: Sequence[float], budget: tuple[float, str], *, fixed_patch: bool = False,
                 fixed_batch: bool = False) -> FitDecision:
    """Apply the module's rule to a plan's patch, batch and network (``net.activation_checkpointing`` is the
    plan's mode); ``budget`` as :func:`gpu_budget_gb` returns it. ``fixed_*``: steps 3 / 4 are not allowed."""
    from pumit_nnunet.models.segmentation import CHECKPOINTING_MODES, patch_divisor

    budget_bytes = budget[0] * memory.GIB
    patch, batch, mode = [int(p) for p in patch_size], int(batch_size), net.activation_checkpointing

    def estimate(p: Sequence[int], b: int, m: str) -> float:
        return memory.peak_memory_bytes(p, b, aniso_d, replace(net, activation_checkpointing=m))

    steps = [f"patch {patch} x batch {batch}, checkpointing {mode!r}: {_gib(estimate(patch, batch, mode))}"]
    for later in CHECKPOINTING_MODES[CHECKPOINTING_MODES.index(mode) + 1:]:
        if estimate(patch, batch, mode) <= budget_bytes:
            break
        mode = later
        steps.append(f"activation checkpointing {mode!r}: {_gib(estimate(patch, batch, mode))}")
    if estimate(patch, batch, mode) > budget_bytes and not fixed_batch and batch > MIN_BATCH_SIZE:
        batch = next((b for b in range(batch - 1, MIN_BATCH_SIZE, -1) if estimate(patch, b, mode) <= budget_bytes),
                     MIN_BATCH_SIZE)
        steps.append(f"batch {batch}: {_gib(estimate(patch, batch, mode))}")
    if estimate(patch, batch, mode) > budget_bytes and not fixed_patch:
        divisor = patch_divisor(aniso_d, len(patch))
        patch = shrink_patch_to_fit(patch, median_shape, divisor, lambda p: estimate(p, batch, mode) <= budget_bytes)
        steps.append(f"patch {patch} (shrunk along nnU-Net's axis): {_gib(estimate(patch, batch, mode))}")
    if len(steps) == 1:
        steps[0] += ", kept"
    return FitDecision(tuple(patch), batch, mode, estimate(patch, batch, mode), budget[0], budget[1], tuple(steps))
