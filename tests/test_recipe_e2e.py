"""The authors' recipe end to end through the stock commands, on real CT: `pumit-nnunet plan --preset` with the
authors' normalisation (preprocessed by nnU-Net's spawned workers), `nnUNetv2_train` with the recipe's loss,
crop sampler and MONAI augmentation in a data-augmentation worker, then `nnUNetv2_predict` (spawned workers again)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct_dataset, nnunet_environment, run_command

pytestmark = pytest.mark.e2e
pytest.importorskip("monai")

DATASET_ID, NAME = 962, "Dataset962_RealCTAuthorsRecipe"
TRAINER, PLANS = "PumitTrainer_T_paper_smoke", "PumitPlansAuthorsTiny"

PRESET = {
    "name": "authors-tiny",
    "description": "test preset: the authors' recipe with their CHAOS intensity and the BTCV crop odds and input map",
    "plans_name": PLANS,
    "channels": 1,
    "normalization": {"scheme": "PumitPercentileZScoreNormalization"},
    "configurations": {"3d_fullres": {"patch_size": [16, 64, 64], "batch_size": 2}},
    "protocol": {"iterations": 4, "epochs": 2, "iterations_per_epoch": 2, "warmup_iterations": 1,
                 "recipe": "authors", "crop_weights": [1, 3], "input_affine": [2, -1]},
}


def test_authors_recipe_plans_trains_and_predicts_with_stock_commands(real_demo_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "nnunet"
    raw = make_ct_dataset(real_demo_dir, root / "raw", DATASET_ID, NAME.split("_", 1)[1],
                          [{"train": ["lung1", "lung2"], "val": ["lung1b"]}])
    preset = tmp_path / "authors-tiny.json"
    preset.write_text(json.dumps(PRESET), encoding="utf-8")
    env = nnunet_environment(root, training=False)
    run_command(["pumit-nnunet", "plan", "-d", str(DATASET_ID), "-c", "3d_fullres", "--vit", "T", "--preset",
                 str(preset), "--preprocess", "-np", "2"], env)
    plans = json.loads((root / "preprocessed" / NAME / f"{PLANS}.json").read_text(encoding="utf-8"))
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["PumitPercentileZScoreNormalization"]
    assert configuration["pumit_protocol"]["recipe"] == "authors"

    train_env = nnunet_environment(root)
    train_env["nnUNet_n_proc_DA"] = "1"  # one background augmentation worker: the recipe's transforms must travel
    run_command(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
                train_env, timeout=900)
    fold = root / "results" / NAME / f"{TRAINER}__{PLANS}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = max(fold.glob("training_log_*.txt"), key=os.path.getmtime).read_text(encoding="utf-8")
    assert "the authors' recipe: crops uniform:class-balanced (1.0, 3.0)" in log
    losses = [float(line.split()[-1]) for line in log.splitlines() if "train_loss" in line]
    assert losses and all(np.isfinite(losses))
    kwargs = json.loads((fold.parent / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"][
        "architecture"]["arch_kwargs"]
    assert kwargs["input_affine"] == [2.0, -1.0]
    assert kwargs["decoder"]["norm_affine"] is False and kwargs["decoder"]["up_bias"] is True

    inputs, out = tmp_path / "predict_in", tmp_path / "predict_out"
    inputs.mkdir()
    os.symlink(raw / "imagesTr" / "lung1b_0000.nii.gz", inputs / "lung1b_0000.nii.gz")
    run_command(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
                 "-tr", TRAINER, "-p", PLANS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"],
                nnunet_environment(root, training=False))
    prediction, image = sitk.ReadImage(str(out / "lung1b.nii.gz")), sitk.ReadImage(str(inputs / "lung1b_0000.nii.gz"))
    assert prediction.GetSize() == image.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= {0, 1}
