"""Stock nnU-Net plans -> PUMIT configurations: token-aligned patches, persisted architecture, clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pumit_nnunet.models.segmentation import PumitSegNet, patch_divisor
from pumit_nnunet.nnunet.plans import PUMIT_NETWORK, adapt_configuration, plan_aniso_d, round_patch_size


def _stock_plans() -> dict:
    unet = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"strides": [[1, 1, 1]]}, "_kw_requires_import": []}
    return {
        "dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [5, 0.6, 0.6],
        "original_median_shape_after_transp": [40, 400, 400], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
        "configurations": {
            "2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
                   "patch_size": [448, 430], "spacing": [0.6, 0.6], "normalization_schemes": ["CTNormalization"],
                   "use_mask_for_norm": [False], "architecture": copy.deepcopy(unet), "batch_dice": True},
            "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                           "batch_size": 2, "patch_size": [40, 224, 208], "spacing": [5.0, 0.6, 0.6],
                           "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                           "architecture": copy.deepcopy(unet), "batch_dice": False},
            "3d_big": {"inherits_from": "3d_fullres", "patch_size": [56, 300, 300]},
        },
    }


@pytest.mark.parametrize("spacing,expected", [([5.0, 0.6, 0.6], 3), ([1, 1, 1], 0), ([3.0, 0.75, 0.75], 2), ([0.6, 0.6], 5)])
def test_plan_aniso_d(spacing, expected) -> None:
    assert plan_aniso_d(spacing) == expected


def test_round_patch_size_is_nearest_multiple_and_capped() -> None:
    assert round_patch_size([40, 224, 208], [4, 32, 32]) == [40, 224, 224]
    assert round_patch_size([3, 20, 70], [4, 32, 32]) == [4, 32, 64]
    assert round_patch_size([40, 224, 208], [4, 32, 32], cap=[16, 64, 100]) == [16, 64, 96]


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d", "3d_big"])
def test_adapted_plans_are_deterministic_and_build_the_network(configuration: str) -> None:
    plans = _stock_plans()
    resolved = adapt_configuration(plans, configuration, "T")
    again = _stock_plans()
    adapt_configuration(again, configuration, "T")
    adapt_configuration(again, configuration, "T")  # idempotent
    assert json.dumps(plans, sort_keys=True) == json.dumps(again, sort_keys=True)
    arch = plans["configurations"][configuration]["architecture"]
    assert arch["network_class_name"] == PUMIT_NETWORK
    kwargs = arch["arch_kwargs"]
    divisor = patch_divisor(kwargs["aniso_d"], len(kwargs["patch_size"]))
    assert all(p % d == 0 for p, d in zip(kwargs["patch_size"], divisor))
    assert resolved["patch_size"] == kwargs["patch_size"]
    json.dumps(plans)  # JSON types only
    if configuration == "3d_big":  # inherits spacing from 3d_fullres
        assert kwargs["aniso_d"] == 3 and kwargs["patch_size"] == [56, 288, 288]


def test_nnunet_builds_the_network_from_the_persisted_plans() -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pumit_nnunet.nnunet.trainers import PumitTrainer_T

    plans = _stock_plans()
    adapt_configuration(plans, "3d_fullres", "T", patch_cap=[16, 64, 64])
    manager = PlansManager(json.loads(json.dumps(plans)))  # as read back from the results' plans.json
    net = PumitTrainer_T.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 3, False)
    assert isinstance(net, PumitSegNet)
    assert net(torch.zeros(1, 1, 16, 64, 64)).shape == (1, 3, 16, 64, 64)


def test_stock_unet_plans_are_refused_with_an_explanation() -> None:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pumit_nnunet.nnunet.trainers import PumitTrainer

    manager = PlansManager(_stock_plans())
    with pytest.raises(ValueError, match="not the PUMIT network"):
        PumitTrainer.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 2, True)


def test_bad_plans_fail_clearly() -> None:
    plans = _stock_plans()
    with pytest.raises(KeyError, match="not in plans"):
        adapt_configuration(plans, "3d_lowres", "B")
    broken = _stock_plans()
    broken["configurations"]["3d_fullres"]["spacing"] = [5.0, 0.6]
    with pytest.raises(ValueError, match="disagree in dimensions"):
        adapt_configuration(broken, "3d_fullres", "B")
    with pytest.raises(ValueError, match="unknown ViT size"):
        adapt_configuration(_stock_plans(), "3d_fullres", "XXL")


def test_segmentation_heads_count_like_nnunet_not_the_labels_dict() -> None:
    """The memory fit sizes the network's head by nnU-Net's count: the ignore label and the background of a
    region-based dataset have no output channel (``len(labels)`` counted both)."""
    from pumit_nnunet.nnunet.plans import segmentation_heads

    assert segmentation_heads({"labels": {"background": 0, "liver": 1, "tumour": 2}}) == 3
    assert segmentation_heads({"labels": {"background": 0, "lesion": 1, "ignore": 2}}) == 2
    brats = {"labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3},
             "regions_class_order": [1, 2, 3]}
    assert segmentation_heads(brats) == 3
