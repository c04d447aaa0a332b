"""Pure functions that turn a stock nnU-Net plans configuration into a PUMIT one.

The trainer applies them to the plans it receives (before nnU-Net's constructor reads them), so the stock
``nnUNetPlans`` work unchanged; nnU-Net then persists the adapted plans into the results' ``plans.json`` and the
predictor rebuilds the identical network from there.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any, Sequence

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing
from pumit_nnunet.models.segmentation import patch_divisor

if TYPE_CHECKING:
    from pumit_nnunet.nnunet.memory_fit import FitDecision

__all__ = ["PUMIT_NETWORK", "plan_aniso_d", "round_patch_size", "pumit_architecture", "adapt_configuration",
           "is_pumit_configuration", "adapt_and_fit", "segmentation_heads", "PLAN_CHOSEN_ARCH_KEYS"]

PUMIT_NETWORK = "pumit_nnunet.models.segmentation.PumitSegNet"
#: architecture choices a PUMIT plan makes that a trainer keeps when it re-adapts the plan (unless its own
#: overrides set them): the fitting rule's activation checkpointing and the decoder widths
PLAN_CHOSEN_ARCH_KEYS = ("activation_checkpointing", "decoder")


def plan_aniso_d(spacing: Sequence[float]) -> int:
    """Degree of anisotropy of a configuration's (transposed) target spacing; 2D configurations are 5."""
    if len(spacing) == 2:
        return MAX_ANISO_D
    # after nnU-Net's transpose, axis 0 is the lowest-resolution axis: it is our depth axis
    return aniso_d_from_spacing(spacing)


def round_patch_size(patch_size: Sequence[int], divisor: Sequence[int], cap: Sequence[int] | None = None) -> list[int]:
    """Round every axis to the nearest multiple of its divisor (at least one multiple), then clip to ``cap``
    (rounded down to a multiple, never below one)."""
    rounded = []
    for i, (size, div) in enumerate(zip(patch_size, divisor)):
        value = max(int(size / div + 0.5), 1) * div
        if cap is not None:
            value = min(value, max(cap[i] // div, 1) * div)
        rounded.append(int(value))
    return rounded


def pumit_architecture(patch_size: Sequence[int], aniso_d: int, vit: str | dict[str, Any],
                       arch_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plans ``architecture`` entry of a PUMIT network (JSON types only).

    ``arch_overrides`` holds further :class:`PumitSegNet` keyword arguments (``vit_overrides``, ``decoder``,
    ``lateral_channels``, ``fullres_channels``, ``activation_checkpointing``)."""
    from pumit_nnunet.models.vit import ViTConfig, vit_config

    vit_config(vit) if isinstance(vit, str) else ViTConfig.from_dict(vit)  # fail now, not at network build time
    kwargs: dict[str, Any] = {"patch_size": [int(p) for p in patch_size], "aniso_d": int(aniso_d), "vit": vit}
    kwargs.update(json.loads(json.dumps(arch_overrides or {})))  # JSON types only: tuples become lists
    return {"network_class_name": PUMIT_NETWORK, "arch_kwargs": kwargs, "_kw_requires_import": []}


def is_pumit_configuration(configuration: dict[str, Any]) -> bool:
    return configuration.get("architecture", {}).get("network_class_name") == PUMIT_NETWORK


def _resolved(plans: dict[str, Any], configuration_name: str) -> dict[str, Any]:
    """The configuration with ``inherits_from`` resolved (on a copy: nothing in ``plans`` changes)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(copy.deepcopy(plans)).get_configuration(configuration_name).configuration


def _plan_choices(configuration: dict[str, Any]) -> dict[str, Any]:
    """The :data:`PLAN_CHOSEN_ARCH_KEYS` of an already PUMIT configuration (nothing for stock ones)."""
    if not is_pumit_configuration(configuration):
        return {}
    kwargs = configuration["architecture"].get("arch_kwargs", {})
    return {k: kwargs[k] for k in PLAN_CHOSEN_ARCH_KEYS if k in kwargs}


def adapt_configuration(plans: dict[str, Any], configuration_name: str, vit: str | dict[str, Any],
                        patch_cap: Sequence[int] | None = None, batch_size: int | None = None,
                        arch_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a PUMIT architecture and a token-aligned patch size into ``plans`` (in place) and return the
    resolved configuration. Deterministic: adapting twice gives the same plans."""
    if configuration_name not in plans.get("configurations", {}):
        raise KeyError(f"configuration {configuration_name!r} not in plans (have: {sorted(plans.get('configurations', {}))})")
    resolved = _resolved(plans, configuration_name)
    missing = [k for k in ("spacing", "patch_size") if k not in resolved]
    if missing:
        raise ValueError(f"plans configuration {configuration_name!r} has no {' or '.join(missing)}: is the plans file complete?")
    spacing, patch = resolved["spacing"], resolved["patch_size"]
    if len(spacing) != len(patch):
        raise ValueError(f"configuration {configuration_name!r}: spacing {spacing} and patch {patch} disagree in dimensions")
    aniso_d = plan_aniso_d(spacing)
    cap = None if patch_cap is None else list(patch_cap)[-len(patch):]  # a 3-axis cap also serves 2D configurations
    new_patch = round_patch_size(patch, patch_divisor(aniso_d, len(patch)), cap)
    target = plans["configurations"][configuration_name]
    target["patch_size"] = new_patch
    target["architecture"] = pumit_architecture(new_patch, aniso_d, vit, {**_plan_choices(resolved), **(arch_overrides or {})})
    if batch_size is not None:
        target["batch_size"] = int(batch_size)
    return {**resolved, **target}


def segmentation_heads(dataset_json: dict[str, Any]) -> int:
    """The network's output channels, as nnU-Net counts them: regions or labels, never the ignore label
    (``len(dataset_json["labels"])`` would count the ignore label too)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order")).num_segmentation_heads


def adapt_and_fit(plans: dict[str, Any], configuration_name: str, vit: str | dict[str, Any], dataset_json: dict[str, Any],
                  patch_cap: Sequence[int] | None = None, batch_size: int | None = None,
                  arch_overrides: dict[str, Any] | None = None) -> FitDecision:
    """The trainers' entry: :func:`adapt_configuration`, then the memory-fitting rule of
    :mod:`pumit_nnunet.nnunet.memory_fit` (budget from ``PUMIT_GPU_MEMORY_GB``, else nnU-Net's reference), whose
    choice is written into ``plans``. On *stock* plans it may change checkpointing, batch and patch; PUMIT plans
    keep the patch and batch ``pumit-nnunet plan`` chose (only checkpointing may be enabled). Returns the
    :class:`~pumit_nnunet.nnunet.memory_fit.FitDecision` for the trainer's log."""
    from pumit_nnunet.nnunet import memory_fit

    stock = not is_pumit_configuration(_resolved(plans, configuration_name))
    resolved = adapt_configuration(plans, configuration_name, vit, patch_cap, batch_size, arch_overrides)
    kwargs = resolved["architecture"]["arch_kwargs"]
    aniso_d, patch = kwargs["aniso_d"], kwargs["patch_size"]
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    net = memory_fit.network_shape(vit, channels, segmentation_heads(dataset_json), aniso_d, len(patch), kwargs)
    decision = memory_fit.fit_training(patch, resolved["batch_size"], aniso_d, net,
                                       resolved.get("median_image_size_in_voxels") or patch, memory_fit.gpu_budget_gb(),
                                       fixed_patch=not stock, fixed_batch=not stock or batch_size is not None)
    target = plans["configurations"][configuration_name]
    target["patch_size"], target["batch_size"] = list(decision.patch_size), decision.batch_size
    overrides = {k: v for k, v in kwargs.items() if k not in ("patch_size", "aniso_d", "vit", "activation_checkpointing")}
    if decision.activation_checkpointing != "none":
        overrides["activation_checkpointing"] = decision.activation_checkpointing
    target["architecture"] = pumit_architecture(decision.patch_size, aniso_d, vit, overrides)
    return decision
