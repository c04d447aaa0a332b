"""PUMIT planner: the token memory model, patch alignment, presets, CT window, `pumit-nnunet plan` end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CT_ID, nnunet_environment, run_command
from pumit_nnunet.cli import main
from pumit_nnunet.models.segmentation import patch_divisor
from pumit_nnunet.nnunet import memory
from pumit_nnunet.nnunet.planner import choose_batch_size, initial_patch_size, shrink_patch_to_fit
from pumit_nnunet.nnunet.plans import plan_aniso_d
from pumit_nnunet.nnunet.presets import (PresetError, available_presets, ct_window_intensity_properties, load_preset,
                                         parse_preset, resolve_spacing)

CT_NAME = "Dataset950_RealCTLung5mm"
# ViT-B-like shape with the default decoder (parameter count as PumitSegNet's, order of magnitude)
NET = memory.NetworkShape(embed_dim=768, depth=12, mlp_hidden_dim=2048, in_channels=1, num_classes=14,
                          parameters_without_pos_embed=132_000_000)


# -- memory model -----------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(aniso_d=st.integers(0, 5), units=st.lists(st.integers(1, 6), min_size=3, max_size=3),
       axis=st.integers(0, 2), batch=st.integers(1, 16))
def test_memory_is_monotone_in_patch_and_batch(aniso_d: int, units: list[int], axis: int, batch: int) -> None:
    divisor = patch_divisor(aniso_d)
    patch = [u * d for u, d in zip(units, divisor)]
    bigger = list(patch)
    bigger[axis] += divisor[axis]
    base = memory.training_memory_bytes(patch, batch, aniso_d, NET)
    assert memory.training_memory_bytes(bigger, batch, aniso_d, NET) > base
    assert memory.training_memory_bytes(patch, batch + 1, aniso_d, NET) > base


def test_vit_activations_are_linear_in_tokens() -> None:
    """SDPA keeps no tokens^2 matrix: twice the tokens (+CLS) cost exactly twice the per-token bytes."""
    small, large = memory.vit_saved_bytes([32, 128, 128], 2, NET), memory.vit_saved_bytes([32, 256, 256], 2, NET)
    tokens_small, tokens_large = math.prod(memory.token_grid([32, 128, 128], 2)) + 1, math.prod(memory.token_grid([32, 256, 256], 2)) + 1
    assert small / tokens_small == pytest.approx(large / tokens_large)
    assert tokens_small == 8 * 8 * 8 + 1  # (32 / 4) x (128 / 16)^2 tokens of 4x16x16 voxels


@pytest.mark.parametrize("budget_gb", [4, 8, 24, 80])
def test_max_batch_size_is_the_largest_that_fits(budget_gb: float) -> None:
    budget = budget_gb * memory.GIB
    b = memory.max_batch_size([32, 128, 128], 2, NET, budget)
    if b:
        assert memory.peak_memory_bytes([32, 128, 128], b, 2, NET) <= budget
    assert memory.peak_memory_bytes([32, 128, 128], b + 1, 2, NET) > budget


def test_batch_size_is_at_least_two() -> None:
    assert choose_batch_size(0, 0) == 2
    assert choose_batch_size(9, 3) == 3
    assert choose_batch_size(5, 100) == 5


# -- patch alignment ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing, aniso_d, divisor", [
    ((5.0, 0.57, 0.57), 3, (4, 32, 32)),  # 5 mm CT
    ((1.0, 1.0, 1.0), 0, (32, 32, 32)),  # isotropic MRI
    ((3.0, 0.75, 0.75), 2, (8, 32, 32)),  # BTCV
    ((9.0, 1.62109, 1.62109), 2, (8, 32, 32)),  # CHAOS
    ((0.8, 0.8), 5, (32, 32)),  # 2D
])
def test_patches_are_token_aligned(spacing, aniso_d: int, divisor) -> None:
    assert plan_aniso_d(spacing) == aniso_d
    assert patch_divisor(aniso_d, len(spacing)) == divisor
    median = [60, 300, 300] if len(spacing) == 3 else [300, 300]
    patch = initial_patch_size(spacing, median, divisor)
    assert all(p % d == 0 and p >= d for p, d in zip(patch, divisor))
    assert all(p < m + d for p, m, d in zip(patch, median, divisor))  # clipped to the median, rounded up
    net = memory.NetworkShape(768, 12, 2048, 1, 3, 100_000_000)
    fits = lambda p: memory.training_memory_bytes(p, 2, aniso_d, net) <= 6 * memory.GIB  # noqa: E731
    shrunk = shrink_patch_to_fit(patch, median, divisor, fits)
    assert fits(shrunk) and all(p % d == 0 for p, d in zip(shrunk, divisor))


def test_shrinking_takes_the_axis_with_the_largest_patch_to_median_ratio() -> None:
    """Reference: one step at a time on the axis whose patch/median ratio is largest (nnU-Net's ResEnc rule)."""
    patch, median, divisor = [64, 256, 256], [40, 400, 300], (8, 32, 32)
    limit = 40 * 200 * 160
    expected = list(patch)
    while math.prod(expected) > limit:
        axis = int(np.argmax([p / m for p, m in zip(expected, median)]))
        expected[axis] -= divisor[axis]
    assert shrink_patch_to_fit(patch, median, divisor, lambda p: math.prod(p) <= limit) == expected
    assert shrink_patch_to_fit(patch, median, divisor, lambda p: False) == list(divisor)  # stops at one step


# -- presets and the CT window ------------------------------------------------------------------------------------
def test_shipped_presets_load() -> None:
    assert {"btcv", "chaos", "pretraining-match"} <= set(available_presets())
    btcv, chaos, match = load_preset("btcv"), load_preset("chaos"), load_preset("pretraining-match")
    assert btcv.spacing == (3.0, 0.75, 0.75) and btcv.configurations["3d_fullres"].patch_size == (48, 192, 192)
    assert chaos.spacing == (9.0, 1.62109, 1.62109) and chaos.channels == 2
    assert btcv.configurations["3d_fullres"].batch_size == 4 and chaos.configurations["3d_fullres"].batch_size == 8
    for preset in (btcv, chaos):
        assert preset.protocol.iterations == 50_000 and preset.protocol.warmup_fraction == pytest.approx(0.1)
        assert preset.protocol.sliding_window_step_size == 0.25 and preset.protocol.learning_rate == 1e-4
    assert match.normalization.scheme == "RescaleTo01Normalization" and match.pretrained == {"channel_mode": "imagenet-fold"}
    for preset in (btcv, chaos):  # preset patches are whole tokens at the preset's own spacing
        aniso_d = plan_aniso_d(preset.spacing)
        assert all(p % d == 0 for p, d in zip(preset.configurations["3d_fullres"].patch_size, patch_divisor(aniso_d)))


def test_btcv_window_with_nnunet_ct_normalization_on_real_ct(real_demo_dir: Path) -> None:
    import SimpleITK as sitk
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(real_demo_dir / "Dataset902_RealCTLungNodule/imagesTr/lung1_0000.nii.gz")))
    image = image[20:24].astype(np.float32)
    lower, upper = load_preset("btcv").normalization.window
    normalised = CTNormalization(False, ct_window_intensity_properties(lower, upper)).run(image.copy())
    np.testing.assert_allclose(normalised, np.clip((image + 175) / 425, 0, 1), atol=1e-6)
    assert normalised.min() == 0 and normalised.max() == 1  # real CT has air below and bone above the window


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"name": "x", "patch": [1]}), "unknown keys"),
    (json.dumps({"name": "x", "spacing": [1, 1]}), "spacing"),
    (json.dumps({"name": "x", "normalization": {"scheme": "ZScoreNormalization", "window": [0, 1]}}), "CTNormalization"),
    (json.dumps({"name": "x", "normalization": {"scheme": "MyNorm"}}), "not one of"),
    (json.dumps({"name": "x", "configurations": {"3d_fullres": {"batch_size": 1}}}), "batch_size"),
    (json.dumps({"name": "x", "protocol": {"iterations": 10, "epochs": 3, "iterations_per_epoch": 3}}), "must equal"),
])
def test_bad_preset_files_name_the_file_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PresetError, match=problem) as error:
        load_preset(path)
    assert str(path) in str(error.value)


def test_spacing_resolution() -> None:
    btcv = load_preset("btcv")
    assert resolve_spacing(None, None, btcv) == [3.0, 0.75, 0.75]
    assert resolve_spacing(None, "default", btcv) is None
    assert resolve_spacing([2, 1, 1], None, btcv) == [2.0, 1.0, 1.0]
    with pytest.raises(PresetError, match="3 positive numbers"):
        resolve_spacing([1, 1], None, None)
    with pytest.raises(PresetError, match="fixed needs"):
        resolve_spacing(None, "fixed", parse_preset({"name": "n"}))


# -- the command ----------------------------------------------------------------------------------------------------
@pytest.fixture
def planning_root(nnunet_root: Path, tmp_path: Path) -> Path:
    """A private copy of the CT dataset (raw + stock preprocessed) so planning never touches the shared root."""
    root = tmp_path / "nnunet"
    shutil.copytree(nnunet_root / "raw" / CT_NAME, root / "raw" / CT_NAME)
    shutil.copytree(nnunet_root / "preprocessed" / CT_NAME, root / "preprocessed" / CT_NAME)
    (root / "results").mkdir()
    return root


def _set_env(monkeypatch, root: Path) -> None:
    for key, value in nnunet_environment(root, training=False).items():
        if key.startswith("nnUNet_"):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("argv, problem", [
    (["-d", "999"], "no matching folders Dataset999_"),
    (["-d", "abc"], "neither an id"),
    (["-d", "950", "--spacing", "1", "1"], "3 positive numbers"),
    (["-d", "950", "--preset", "nope"], "unknown preset 'nope'"),
    (["-d", "950", "--preset", "chaos"], "expects 2 input channel"),
    (["-d", "950", "--vit", "XL"], "unknown ViT size"),
])
def test_plan_bad_inputs(planning_root: Path, monkeypatch, capsys, argv: list[str], problem: str) -> None:
    _set_env(monkeypatch, planning_root)
    assert main(["plan", *argv]) == 2
    assert problem in capsys.readouterr().err


def test_plan_corrupt_fingerprint_and_missing_environment(planning_root: Path, monkeypatch, capsys) -> None:
    _set_env(monkeypatch, planning_root)
    fingerprint = planning_root / "preprocessed" / CT_NAME / "dataset_fingerprint.json"
    fingerprint.write_text("{broken")
    assert main(["plan", "-d", "950"]) == 2
    assert f"{fingerprint} is not valid JSON" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_raw")
    assert main(["plan", "-d", "950"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err


def test_plan_fits_the_budget_with_checkpointing_and_the_lite_decoder(planning_root: Path, monkeypatch, capsys) -> None:
    """PUMIT_GPU_MEMORY_GB sets the budget; over it the plan enables activation checkpointing (recorded in the
    architecture, so the trainer builds that network) and prints why; --decoder lite is recorded too."""
    _set_env(monkeypatch, planning_root)
    monkeypatch.setenv("PUMIT_GPU_MEMORY_GB", "2")
    assert main(["plan", "-d", "950", "-c", "3d_fullres", "--vit", "S", "--decoder", "lite"]) == 0
    out = capsys.readouterr().out
    c = json.loads((planning_root / "preprocessed" / CT_NAME / "PumitPlans.json").read_text())["configurations"]["3d_fullres"]
    kwargs, info = c["architecture"]["arch_kwargs"], c["pumit_planner"]
    assert kwargs["decoder"] == "lite" and kwargs["activation_checkpointing"] == info["activation_checkpointing"] != "none"
    assert info["gpu_memory_target_gb"] == 2 and info["gpu_memory_budget_from"] == "PUMIT_GPU_MEMORY_GB"
    assert info["estimated_memory_gb"] <= 2 and c["batch_size"] >= 2
    assert "memory fit: activation checkpointing" in out and "budget 2 GiB" in out


@pytest.mark.e2e
def test_plan_preprocess_and_train_with_stock_commands(planning_root: Path) -> None:
    """`pumit-nnunet plan` (console script) writes token-aligned PumitPlans reusing the stock data, the BTCV preset
    preprocesses its own windowed data, and the stock nnUNetv2_train runs PumitTrainer_T_smoke -p PumitPlans."""
    env = nnunet_environment(planning_root, training=False)
    out = run_command(["pumit-nnunet", "plan", "-d", str(CT_ID), "-c", "3d_fullres", "2d", "--vit", "T", "--preprocess"], env).stdout
    assert f"nnUNetv2_train {CT_ID} 3d_fullres 0 -tr PumitTrainer_T -p PumitPlans" in out
    folder = planning_root / "preprocessed" / CT_NAME
    plans = json.loads((folder / "PumitPlans.json").read_text(encoding="utf-8"))
    for name, aniso_d in (("3d_fullres", 3), ("2d", 5)):
        c = plans["configurations"][name]
        divisor = patch_divisor(aniso_d, len(c["patch_size"]))
        assert c["architecture"]["arch_kwargs"] == {"patch_size": c["patch_size"], "aniso_d": aniso_d, "vit": "T"}
        assert all(p % d == 0 for p, d in zip(c["patch_size"], divisor)) and c["batch_size"] >= 2
        assert c["data_identifier"] == f"nnUNetPlans_{name}"  # default spacing and normalisation: stock data reused

    out = run_command(["pumit-nnunet", "plan", "-d", str(CT_ID), "-c", "3d_fullres", "--preset", "btcv", "--preprocess"], env).stdout
    assert "-step_size 0.25 -chk checkpoint_final.pth" in out
    btcv = json.loads((folder / "PumitPlansBTCV.json").read_text(encoding="utf-8"))
    c = btcv["configurations"]["3d_fullres"]
    assert c["patch_size"] == [48, 192, 192] and c["batch_size"] == 4 and c["spacing"] == [3.0, 0.75, 0.75]
    assert c["pumit_protocol"]["iterations"] == 50_000 and c["normalization_schemes"] == ["CTNormalization"]
    assert btcv["foreground_intensity_properties_per_channel"]["0"]["std"] == 425.0
    assert c["data_identifier"].startswith("PumitPlansBTCV_3d_fullres_")
    import blosc2

    data = blosc2.open(str(folder / c["data_identifier"] / "lung1.b2nd"))[:]
    assert data.min() == 0 and data.max() == 1 and data.shape[1] == 27  # 16 slices of 5 mm -> 3 mm

    run_command(["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", "PumitTrainer_T_smoke", "-p", "PumitPlans",
                 "-device", "cpu"], nnunet_environment(planning_root), timeout=1500)
    fold = planning_root / "results" / CT_NAME / "PumitTrainer_T_smoke__PumitPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
