"""The memory-fitting rule (pumit_nnunet.nnunet.memory_fit): budget, each branch of the rule, and the trainers
applying it to stock plans (and honouring a plan's activation checkpointing)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pumit_nnunet.errors import UsageError
from pumit_nnunet.models.segmentation import patch_divisor
from pumit_nnunet.nnunet import memory
from pumit_nnunet.nnunet.memory_fit import (ENV_BUDGET, NNUNET_REFERENCE_GB, estimate_peak_memory_bytes, fit_training,
                                            gpu_budget_gb, network_shape, shrink_patch_to_fit)
from pumit_nnunet.nnunet.plans import adapt_and_fit, pumit_architecture

PATCH, MEDIAN, ANISO_D = (48, 192, 192), (60, 250, 220), 2  # BTCV-like: 3 x 0.75 x 0.75 mm
NET = network_shape("B", 1, 14, ANISO_D, 3)


def _gib(patch, batch: int, mode: str) -> float:
    return memory.peak_memory_bytes(patch, batch, ANISO_D, replace(NET, activation_checkpointing=mode)) / memory.GIB


def _fit(budget_gb: float, batch: int = 2, **kwargs):
    return fit_training(PATCH, batch, ANISO_D, NET, MEDIAN, (budget_gb, "test"), **kwargs)


# -- budget -----------------------------------------------------------------------------------------------------
def test_budget_defaults_to_nnunets_reference_and_the_environment_changes_it(monkeypatch) -> None:
    monkeypatch.delenv(ENV_BUDGET, raising=False)
    assert gpu_budget_gb() == (NNUNET_REFERENCE_GB, f"nnU-Net's reference budget; set {ENV_BUDGET} to change it")
    assert NNUNET_REFERENCE_GB == 8.0  # nnU-Net's ExperimentPlanner default gpu_memory_target_in_gb
    monkeypatch.setenv(ENV_BUDGET, "24")
    assert gpu_budget_gb() == (24.0, ENV_BUDGET)
    assert gpu_budget_gb(40) == (40.0, "--gpu-memory-gb")  # the command line wins
    for bad in ("lots", "-3", "nan"):
        monkeypatch.setenv(ENV_BUDGET, bad)
        with pytest.raises(UsageError, match="GiB"):
            gpu_budget_gb()


# -- the rule's branches (budgets placed between the model's own estimates) ----------------------------------------
def test_a_fitting_plan_is_kept() -> None:
    decision = _fit(_gib(PATCH, 2, "none") + 0.1)
    assert (decision.patch_size, decision.batch_size, decision.activation_checkpointing) == (PATCH, 2, "none")
    assert decision.fits and len(decision.steps) == 1 and decision.steps[0].endswith("kept")


def test_checkpointing_comes_first_and_only_as_much_as_needed() -> None:
    assert _gib(PATCH, 2, "none") > _gib(PATCH, 2, "backbone") > _gib(PATCH, 2, "all")
    backbone = _fit((_gib(PATCH, 2, "none") + _gib(PATCH, 2, "backbone")) / 2)
    assert (backbone.patch_size, backbone.batch_size, backbone.activation_checkpointing) == (PATCH, 2, "backbone")
    full = _fit((_gib(PATCH, 2, "backbone") + _gib(PATCH, 2, "all")) / 2)
    assert (full.patch_size, full.batch_size, full.activation_checkpointing) == (PATCH, 2, "all")
    assert full.fits and "activation checkpointing 'all'" in full.steps[-1]


def test_then_the_batch_is_lowered_to_the_largest_that_fits() -> None:
    budget = (_gib(PATCH, 3, "all") + _gib(PATCH, 4, "all")) / 2
    decision = _fit(budget, batch=6)
    assert (decision.patch_size, decision.batch_size, decision.activation_checkpointing) == (PATCH, 3, "all")
    assert _fit(budget, batch=6, fixed_batch=True).patch_size != PATCH  # a fixed batch shrinks the patch instead


def test_then_the_patch_shrinks_along_nnunets_axis_never_the_batch_below_two() -> None:
    budget = _gib(PATCH, 2, "all") - 0.5
    decision = _fit(budget, batch=4)
    assert decision.batch_size == 2 and decision.activation_checkpointing == "all" and decision.fits
    divisor = patch_divisor(ANISO_D)
    expected = shrink_patch_to_fit(PATCH, MEDIAN, divisor, lambda p: _gib(p, 2, "all") <= budget)
    assert list(decision.patch_size) == expected and tuple(expected) != PATCH
    # nnU-Net's axis: 192/220 > 48/60 > 192/250, so the last axis goes first, then the depth axis
    assert expected[2] < PATCH[2] and expected[1] == PATCH[1]
    assert _fit(budget, batch=4, fixed_patch=True).patch_size == PATCH  # a preset's fixed patch is kept


def test_a_budget_nothing_fits_is_reported() -> None:
    decision = _fit(0.5)  # below the fixed CUDA overhead
    assert not decision.fits and list(decision.patch_size) == list(patch_divisor(ANISO_D))
    assert "DOES NOT FIT" in decision.message("3d_fullres, ViT-B")


def test_estimate_from_plans_arch_kwargs_is_the_rules_estimate() -> None:
    """The public one-call estimate (what benchmarks/gpu_suite.py compares with the measured peak)."""
    kwargs = pumit_architecture(PATCH, ANISO_D, "B", {"activation_checkpointing": "all"})["arch_kwargs"]
    assert estimate_peak_memory_bytes(kwargs, 1, 14, 2) == pytest.approx(_gib(PATCH, 2, "all") * memory.GIB)


# -- trainers on stock plans ---------------------------------------------------------------------------------------
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}


def _stock_plans() -> dict:
    unet = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"strides": [[1, 1, 1]]}, "_kw_requires_import": []}
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 2, "patch_size": list(PATCH), "median_image_size_in_voxels": list(MEDIAN),
                     "spacing": [3.0, 0.75, 0.75], "normalization_schemes": ["CTNormalization"],
                     "use_mask_for_norm": [False], "architecture": unet, "batch_dice": False}
    return {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [3, 0.75, 0.75],
            "original_median_shape_after_transp": list(MEDIAN), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
            "configurations": {"3d_fullres": configuration}}


def test_stock_plans_get_the_rules_choice_deterministically(monkeypatch) -> None:
    net = network_shape("S", 1, 2, ANISO_D, 3)
    none, full = (memory.peak_memory_bytes(PATCH, 2, ANISO_D, replace(net, activation_checkpointing=m)) / memory.GIB
                  for m in ("backbone", "all"))
    monkeypatch.setenv(ENV_BUDGET, f"{(none + full) / 2:.3f}")
    plans, again = _stock_plans(), _stock_plans()
    decision = adapt_and_fit(plans, "3d_fullres", "S", DATASET_JSON)
    adapt_and_fit(again, "3d_fullres", "S", DATASET_JSON)
    adapt_and_fit(again, "3d_fullres", "S", DATASET_JSON)  # now PUMIT plans: kept as they are
    assert json.dumps(plans, sort_keys=True) == json.dumps(again, sort_keys=True)
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert decision.activation_checkpointing == kwargs["activation_checkpointing"] == "all"
    assert kwargs["patch_size"] == list(PATCH) and plans["configurations"]["3d_fullres"]["batch_size"] == 2


def test_pumit_plans_keep_patch_batch_and_decoder(monkeypatch) -> None:
    monkeypatch.setenv(ENV_BUDGET, "2")  # far too small for ViT-B at this patch: the plan's patch stays anyway
    plans = _stock_plans()
    configuration = plans["configurations"]["3d_fullres"]
    configuration["batch_size"] = 3
    configuration["architecture"] = pumit_architecture(PATCH, ANISO_D, "B", {"decoder": "lite"})
    decision = adapt_and_fit(plans, "3d_fullres", "B", DATASET_JSON)
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert (configuration["patch_size"], configuration["batch_size"]) == (list(PATCH), 3) and not decision.fits
    assert kwargs["decoder"] == "lite" and kwargs["activation_checkpointing"] == "all"


def test_trainer_logs_the_fit_and_builds_the_checkpointed_network(monkeypatch, tmp_path: Path) -> None:
    from pumit_nnunet.nnunet.trainers import PumitTrainer_S_lite

    for variable in ("nnUNet_raw", "nnUNet_results", "nnUNet_preprocessed"):  # nnU-Net reads them lazily
        monkeypatch.setenv(variable, str(tmp_path / variable))
    monkeypatch.setenv(ENV_BUDGET, "3")
    plans = {**_stock_plans(), "continue_training": False}
    trainer = PumitTrainer_S_lite(copy.deepcopy(plans), "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    log = Path(trainer.log_file).read_text(encoding="utf-8")
    assert f"PUMIT memory fit (3d_fullres, ViT-S; budget 3 GiB from {ENV_BUDGET})" in log
    assert "activation checkpointing 'all'" in log and "shrunk along nnU-Net's axis" in log
    assert trainer.configuration_manager.patch_size == list(trainer.memory_fit.patch_size)
    network = PumitTrainer_S_lite.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                             1, 2, True)
    assert network.activation_checkpointing == "all" and network.neck.checkpointing and network.decoder.checkpointing
    assert network.decoder.config.lateral_channels == (128, 256, 320, 320)  # the lite decoder
