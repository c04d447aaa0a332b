"""The PUMIT experiment planner: token-aligned patches, a token-based memory model and batch size >= 2.

It subclasses nnU-Net's :class:`ExperimentPlanner` and replaces only the per-configuration choice of patch,
batch size and architecture (``get_plans_for_configuration``), the normalisation (for presets) and the data
identifier; spacing, transpose, resampling and the 3d_lowres search stay nnU-Net's. nnU-Net's ``-pl`` cannot
find planners outside its package, so ``pumit-nnunet plan`` passes this class to
``plan_experiment_dataset`` (see :mod:`pumit_nnunet.nnunet.plan_cli`).

Patch search (as nnU-Net's ResEnc planners): start from a patch with the spacing's aspect ratio and
``256**3`` (3D) or ``2048**2`` (2D) voxels, clip it to the median image shape, round up to whole tokens and the
neck's strides (:func:`patch_divisor`), then apply the memory-fitting rule of :mod:`.memory_fit` at batch 2
(activation checkpointing first, then shrinking the axis with the largest patch/median ratio) until it fits the
GPU memory budget. The batch then grows to what fits, capped so one batch covers at most 5 % of the dataset's
voxels, and never below 2. A preset's fixed patch and batch are kept (only checkpointing may be enabled); the
planner warns when they do not fit.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed

from pumit_nnunet.models.segmentation import patch_divisor
from pumit_nnunet.nnunet import memory
from pumit_nnunet.nnunet.memory_fit import FitDecision, fit_training, network_shape, shrink_patch_to_fit
from pumit_nnunet.nnunet.plans import plan_aniso_d, pumit_architecture
from pumit_nnunet.nnunet.presets import PROTOCOL_KEY, PlanPreset

__all__ = [
    "PumitPlanner", "initial_patch_size", "shrink_patch_to_fit", "choose_batch_size", "preprocessing_signature",
    "network_shape", "PLANNER_KEY", "STOCK_PLANS", "FitDecision",
]

STOCK_PLANS = "nnUNetPlans"
#: plans-configuration block recording what the planner assumed (for users; nothing reads it back)
PLANNER_KEY = "pumit_planner"
_TARGET_VOXELS = {3: 256 ** 3, 2: 2048 ** 2}


def initial_patch_size(spacing: Sequence[float], median_shape: Sequence[float], divisor: Sequence[int]) -> list[int]:
    """Largest starting patch: the spacing's aspect ratio at 256^3 (3D) / 2048^2 (2D) voxels, clipped to the
    median shape, rounded up to multiples of ``divisor`` (so a median image fits one patch)."""
    inverse = 1 / np.asarray(spacing, dtype=np.float64)
    patch = inverse * (_TARGET_VOXELS[len(spacing)] / np.prod(inverse)) ** (1 / len(spacing))
    patch = np.minimum(patch, np.asarray(median_shape, dtype=np.float64))
    return [max(math.ceil(round(p, 6) / d), 1) * d for p, d in zip(patch, divisor)]


def choose_batch_size(fitting: int, coverage_cap: int, minimum: int = 2) -> int:
    """The batch that fits memory, capped by dataset coverage, never below ``minimum`` (nnU-Net's rule)."""
    return max(min(fitting, coverage_cap), minimum)


def coverage_cap(dataset_voxels: float, patch: Sequence[int], max_covered: float) -> int:
    """Batch size at which one batch covers ``max_covered`` of the dataset's voxels (nnU-Net's 5 % rule)."""
    return round(dataset_voxels * max_covered / np.prod(patch, dtype=np.float64))


def preprocessing_signature(spacing: Sequence[float], configuration: dict[str, Any], transpose_forward: Sequence[int],
                            intensity_properties: dict[str, Any]) -> dict[str, Any]:
    """Everything nnU-Net's preprocessing output depends on (besides the raw data), as a JSON-able dict."""
    schemes = list(configuration["normalization_schemes"])
    return {
        "spacing": [round(float(s), 6) for s in spacing],
        "transpose_forward": [int(t) for t in transpose_forward],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(m) for m in configuration["use_mask_for_norm"]],
        "resampling": [configuration[k] for k in ("resampling_fn_data", "resampling_fn_data_kwargs",
                                                   "resampling_fn_seg", "resampling_fn_seg_kwargs")],
        # only CTNormalization reads the plans' intensity properties
        "intensity_properties": intensity_properties if "CTNormalization" in schemes else None,
    }


def _digest(signature: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:8]


class PumitPlanner(ExperimentPlanner):
    """nnU-Net experiment planner for PUMIT trainers (see the module docstring).

    Args:
        dataset_name_or_id: nnU-Net dataset.
        gpu_memory_target_in_gb: GPU memory one training process may use (GiB).
        preprocessor_name / plans_name / overwrite_target_spacing / suppress_transpose: as nnU-Net's planner;
            ``overwrite_target_spacing`` is a fixed target spacing in nnU-Net's (untransposed) axis order.
        vit: ViT preset of the planned network (``T``, ``S``, ``B``, ``L``); trainers of another size re-adapt.
        preset: a plan preset (normalisation, fixed patch/batch, protocol), applied on top.
        arch_overrides: further PumitSegNet keyword arguments (``decoder``, decoder channels).
        budget_source: where ``gpu_memory_target_in_gb`` came from (logged with the fitting decision).
    """

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = "PumitPlans",
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False, *,
                 vit: str = "B", preset: PlanPreset | None = None, arch_overrides: dict[str, Any] | None = None,
                 budget_source: str = "gpu_memory_target_in_gb"):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.vit = vit
        self.preset = preset
        self.arch_overrides = arch_overrides
        self.budget_source = budget_source
        self.intensity_properties = self._intensity_properties()

    def _intensity_properties(self) -> dict[str, Any]:
        fingerprint = self.dataset_fingerprint["foreground_intensity_properties_per_channel"]
        return fingerprint if self.preset is None else self.preset.intensity_properties(fingerprint)

    # -- normalisation ------------------------------------------------------------------------------------------
    def determine_normalization_scheme_and_whether_mask_is_used_for_norm(self) -> tuple[list[str], list[bool]]:
        schemes, masks = super().determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        if self.preset is None or self.preset.normalization is None:
            return schemes, masks
        from nnunetv2.preprocessing.normalization import default_normalization_schemes as norms

        scheme = getattr(norms, self.preset.normalization.scheme)
        # nnU-Net's rule: normalise inside the non-zero mask only when cropping removed much and the scheme keeps zeros
        use_mask = (self.dataset_fingerprint["median_relative_size_after_cropping"] < 3 / 4
                    and bool(scheme.leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true))
        return [scheme.__name__] * len(schemes), [use_mask] * len(schemes)

    # -- data identifier ----------------------------------------------------------------------------------------
    def _stock_configuration(self, configuration: str) -> dict[str, Any] | None:
        """The stock plans' configuration and plans-level fields if ``nnUNetPlans.json`` exists, else None."""
        path = Path(nnUNet_preprocessed, self.dataset_name, f"{STOCK_PLANS}.json")
        if not path.is_file():
            return None
        try:
            plans = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"stock plans file {path} is not valid JSON: {error}") from None
        if configuration not in plans.get("configurations", {}) or "inherits_from" in plans["configurations"][configuration]:
            return None
        return {**plans["configurations"][configuration], "_transpose": plans["transpose_forward"],
                "_intensity": plans["foreground_intensity_properties_per_channel"]}

    def _predicted_stock_signature(self, configuration: str, plan: dict[str, Any]) -> dict[str, Any]:
        """What nnU-Net's default planner would preprocess for ``configuration`` (no plans file needed)."""
        overwrite, self.overwrite_target_spacing = self.overwrite_target_spacing, None
        try:
            spacing = ExperimentPlanner.determine_fullres_target_spacing(self)
            transpose = ExperimentPlanner.determine_transpose(self)[0]
        finally:
            self.overwrite_target_spacing = overwrite
        schemes, masks = ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm(self)
        stock = {**plan, "normalization_schemes": schemes, "use_mask_for_norm": masks}
        spacing = np.asarray(spacing)[transpose]
        fingerprint = self.dataset_fingerprint["foreground_intensity_properties_per_channel"]
        return preprocessing_signature(spacing[1:] if configuration == "2d" else spacing, stock, transpose, fingerprint)

    def data_identifier_for(self, configuration: str, spacing: Sequence[float], plan: dict[str, Any]) -> str:
        """``nnUNetPlans_<cfg>`` when the preprocessing equals nnU-Net's default (the stock data is reused), else
        ``<plans>_<cfg>_<digest>``: a different spacing or normalisation never mixes with other data."""
        ours = preprocessing_signature(spacing, plan, self.determine_transpose()[0], self.intensity_properties)
        if configuration in ("2d", "3d_fullres") and ours == self._predicted_stock_signature(configuration, plan):
            stock = self._stock_configuration(configuration)
            if stock is None or ours == preprocessing_signature(stock["spacing"], stock, stock["_transpose"], stock["_intensity"]):
                return f"{STOCK_PLANS}_{configuration}"
        return f"{self.plans_identifier}_{configuration}_{_digest(ours)}"

    def _configuration_name(self, data_identifier: str) -> str:
        # nnU-Net hands get_plans_for_configuration only generate_data_identifier(name) = "<plans>_<name>"
        prefix = f"{self.plans_identifier}_"
        if not data_identifier.startswith(prefix):
            raise ValueError(f"unexpected data identifier {data_identifier!r} (expected {prefix}<configuration>)")
        return data_identifier[len(prefix):]

    # -- patch, batch, architecture -----------------------------------------------------------------------------
    def _network(self, aniso_d: int, spatial_dims: int) -> memory.NetworkShape:
        channels = len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))
        return network_shape(self.vit, channels, len(self.dataset_json["labels"]), aniso_d, spatial_dims,
                             self.arch_overrides)

    def _fixed(self, configuration: str, spacing: Sequence[float], divisor: Sequence[int]):
        """The preset's fixed patch and batch of ``configuration`` (None where the planner chooses)."""
        fixed = self.preset.configurations.get(configuration) if self.preset else None
        if fixed is None:
            return None, None
        if fixed.patch_size is not None and (len(fixed.patch_size) != len(spacing)
                                             or any(p % d for p, d in zip(fixed.patch_size, divisor))):
            raise ValueError(f"preset {self.preset.name}: {configuration} patch {list(fixed.patch_size)} is not a multiple "
                             f"of {list(divisor)} (whole tokens and the neck's strides at aniso_d={plan_aniso_d(spacing)})")
        return fixed.patch_size, fixed.batch_size

    def _patch_and_batch(self, configuration: str, spacing: Sequence[float], median_shape: Sequence[float],
                         dataset_voxels: float) -> tuple[int, memory.NetworkShape, FitDecision]:
        """aniso_d, the network (with the chosen checkpointing) and the fitting decision (patch, batch, why)."""
        aniso_d = plan_aniso_d(spacing)
        divisor = patch_divisor(aniso_d, len(spacing))
        net = self._network(aniso_d, len(spacing))
        budget = (float(self.UNet_vram_target_GB), self.budget_source)
        fixed_patch, fixed_batch = self._fixed(configuration, spacing, divisor)
        patch = list(fixed_patch) if fixed_patch else initial_patch_size(spacing, median_shape, divisor)
        decision = fit_training(patch, fixed_batch or self.UNet_min_batch_size, aniso_d, net, median_shape, budget,
                                fixed_patch=fixed_patch is not None, fixed_batch=True)
        net = replace(net, activation_checkpointing=decision.activation_checkpointing)
        if fixed_batch is None:  # grow the batch to what fits
            cap = coverage_cap(dataset_voxels, decision.patch_size, self.max_dataset_covered)
            fitting = memory.max_batch_size(decision.patch_size, aniso_d, net, budget[0] * memory.GIB)
            batch = choose_batch_size(fitting, cap, self.UNet_min_batch_size)
            if batch != decision.batch_size:
                estimate = memory.peak_memory_bytes(decision.patch_size, batch, aniso_d, net)
                decision = replace(decision, batch_size=batch, estimate_bytes=estimate,
                                   steps=(*decision.steps, f"batch {batch} (fits, <= 5 % of the dataset): "
                                                           f"~{estimate / memory.GIB:.1f} GiB"))
        message = decision.message(f"{configuration}, ViT-{self.vit}")
        print(message)
        if not decision.fits:
            warnings.warn(message, stacklevel=2)
        return aniso_d, net, decision

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if not all(s > 0 for s in spacing):
            raise ValueError(f"spacing must be > 0, got {list(spacing)}")
        configuration = self._configuration_name(data_identifier)
        aniso_d, net, decision = self._patch_and_batch(configuration, spacing, median_shape, approximate_n_voxels_dataset)
        patch, batch = list(decision.patch_size), decision.batch_size
        resampling_data, data_kwargs, resampling_seg, seg_kwargs = self.determine_resampling()
        resampling_probabilities, probabilities_kwargs = self.determine_segmentation_softmax_export_fn()
        schemes, masks = self.determine_normalization_scheme_and_whether_mask_is_used_for_norm()
        plan = {
            "data_identifier": data_identifier, "preprocessor_name": self.preprocessor_name, "batch_size": int(batch),
            "patch_size": patch, "median_image_size_in_voxels": median_shape, "spacing": spacing,
            "normalization_schemes": schemes, "use_mask_for_norm": masks,
            "resampling_fn_data": resampling_data.__name__, "resampling_fn_seg": resampling_seg.__name__,
            "resampling_fn_data_kwargs": data_kwargs, "resampling_fn_seg_kwargs": seg_kwargs,
            "resampling_fn_probabilities": resampling_probabilities.__name__,
            "resampling_fn_probabilities_kwargs": probabilities_kwargs,
            "architecture": pumit_architecture(patch, aniso_d, self.vit, self._arch_overrides(decision)),
        }
        plan["data_identifier"] = self.data_identifier_for(configuration, spacing, plan)
        plan[PLANNER_KEY] = {
            "vit": self.vit, "aniso_d": aniso_d, "tokens": int(np.prod(memory.token_grid(patch, aniso_d))),
            "gpu_memory_target_gb": float(self.UNet_vram_target_GB), "gpu_memory_budget_from": self.budget_source,
            "estimated_memory_gb": round(decision.estimate_bytes / memory.GIB, 2),
            "activation_checkpointing": decision.activation_checkpointing, "memory_fit": list(decision.steps),
            "preset": self.preset.name if self.preset else None,
        }
        return plan

    def _arch_overrides(self, decision: FitDecision) -> dict[str, Any] | None:
        """The planner's architecture overrides plus the chosen checkpointing (omitted when none)."""
        if decision.activation_checkpointing == "none":
            return self.arch_overrides
        return {**(self.arch_overrides or {}), "activation_checkpointing": decision.activation_checkpointing}

    # -- saving -------------------------------------------------------------------------------------------------
    def _apply_preset(self, plans: dict[str, Any]) -> None:
        plans["foreground_intensity_properties_per_channel"] = copy.deepcopy(self.intensity_properties)
        if self.preset is None:
            return
        for name, configuration in plans["configurations"].items():
            if "inherits_from" in configuration:
                continue
            if self.preset.protocol is not None and name in self.preset.configurations:
                configuration[PROTOCOL_KEY] = self.preset.protocol.to_dict()
            if self.preset.pretrained is not None:
                from pumit_nnunet.nnunet.pretrained import PLANS_KEY

                configuration[PLANS_KEY] = dict(self.preset.pretrained)

    def save_plans(self, plans: dict[str, Any]) -> None:
        """Apply the preset, keep configurations of an existing plans file (as nnU-Net does), write atomically."""
        from nnunetv2.utilities.json_export import recursive_fix_for_json_export

        from pumit_nnunet.io import write_text_atomic

        self._apply_preset(plans)
        recursive_fix_for_json_export(plans)
        path = Path(nnUNet_preprocessed, self.dataset_name, f"{self.plans_identifier}.json")
        if path.is_file():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))["configurations"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"existing plans file {path} is corrupt ({error!r}); move it away or pick another "
                                 "--plans-name") from None
            plans["configurations"].update({k: v for k, v in old.items() if k not in plans["configurations"]})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(plans, indent=4))
        print(f"Plans were saved to {path}")
