"""Pure functions that turn a stock nnU-Net plans configuration into a PUMIT one.

The trainer applies them to the plans it receives (before nnU-Net's constructor reads them), so the stock
``nnUNetPlans`` work unchanged; nnU-Net then persists the adapted plans into the results' ``plans.json`` and the
predictor rebuilds the identical network from there.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Sequence

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing
from pumit_nnunet.models.segmentation import patch_divisor

__all__ = ["PUMIT_NETWORK", "plan_aniso_d", "round_patch_size", "pumit_architecture", "adapt_configuration",
           "is_pumit_configuration"]

PUMIT_NETWORK = "pumit_nnunet.models.segmentation.PumitSegNet"


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

    ``arch_overrides`` holds further :class:`PumitSegNet` keyword arguments (``vit_overrides``,
    ``lateral_channels``, ``fullres_channels``)."""
    from pumit_nnunet.models.vit import ViTConfig, vit_config

    vit_config(vit) if isinstance(vit, str) else ViTConfig.from_dict(vit)  # fail now, not at network build time
    kwargs: dict[str, Any] = {"patch_size": [int(p) for p in patch_size], "aniso_d": int(aniso_d), "vit": vit}
    kwargs.update(json.loads(json.dumps(arch_overrides or {})))  # JSON types only: tuples become lists
    return {"network_class_name": PUMIT_NETWORK, "arch_kwargs": kwargs, "_kw_requires_import": []}


def is_pumit_configuration(configuration: dict[str, Any]) -> bool:
    return configuration.get("architecture", {}).get("network_class_name") == PUMIT_NETWORK


def adapt_configuration(plans: dict[str, Any], configuration_name: str, vit: str | dict[str, Any],
                        patch_cap: Sequence[int] | None = None, batch_size: int | None = None,
                        arch_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a PUMIT architecture and a token-aligned patch size into ``plans`` (in place) and return the
    resolved configuration. Deterministic: adapting twice gives the same plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration_name not in plans.get("configurations", {}):
        raise KeyError(f"configuration {configuration_name!r} not in plans (have: {sorted(plans.get('configurations', {}))})")
    # resolve inherits_from on a copy (nnU-Net's PlansManager caches and mutates nothing, but be safe)
    resolved = PlansManager(copy.deepcopy(plans)).get_configuration(configuration_name).configuration
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
    target["architecture"] = pumit_architecture(new_patch, aniso_d, vit, arch_overrides)
    if batch_size is not None:
        target["batch_size"] = int(batch_size)
    return {**resolved, **target}
