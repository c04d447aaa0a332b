"""``pumit-nnunet demo``: its pieces (table, metrics, out-folder claim) and the whole demo end to end at the
``quick`` budget (the ``_quick`` trainer pair: 1 epoch x 3 iterations), including a rerun that resumes."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_command

from pumit_nnunet.errors import UsageError
from pumit_nnunet.nnunet.demo_report import RowResult, format_table, overlay_slices, score_prediction
from pumit_nnunet.nnunet.demo_steps import OUT_MARKER, claim_out_folder

ROW_RE = re.compile(r"^(?P<trainer>\S+)\s+(?P<start>from scratch|--weights \S+|pre-trained here)\s+"
                    r"(?P<dice>\S+)\s+(?P<hd95>\S+)\s+(?P<train>\S+)\s+(?P<predict>\S+)$", re.M)


def _write_mask(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0)) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_score_prediction_matches_hand_computed_dice_and_hd95(tmp_path):
    ref = np.zeros((6, 10, 10), np.uint8)
    ref[1:5, 2:8, 2:8] = 1
    pred = np.zeros_like(ref)
    pred[1:5, 2:8, 3:8] = 1  # one column of 4x6 voxels missing
    dice, hd95 = score_prediction(_write_mask(pred, tmp_path / "p.nii.gz"), _write_mask(ref, tmp_path / "r.nii.gz"))
    assert dice == pytest.approx(2 * pred.sum() / (pred.sum() + ref.sum()))
    assert hd95 == pytest.approx(1.0)  # the missing column lies 1 mm (x spacing) from the predicted surface
    assert score_prediction(_write_mask(ref, tmp_path / "same.nii.gz"), tmp_path / "r.nii.gz") == (1.0, 0.0)


def test_format_table_prints_every_row_and_nonfinite_values():
    table = format_table([RowResult("nnUNetTrainer_demo", "from scratch", 0.91234, 12.345, 185.0, 21.4),
                          RowResult("PumitTrainer_T_demo", "pre-trained here", 0.5, math.inf, 59.6, 3.0)])
    rows = {m["trainer"]: m for m in ROW_RE.finditer(table)}
    assert rows["nnUNetTrainer_demo"]["dice"] == "0.912" and rows["nnUNetTrainer_demo"]["train"] == "3m05s"
    assert rows["PumitTrainer_T_demo"]["hd95"] == "inf" and rows["PumitTrainer_T_demo"]["predict"] == "3s"


def test_overlay_slices_lie_inside_the_label():
    label = np.zeros((40, 4, 4), np.uint8)
    label[10:31] = 1
    assert overlay_slices(label) == [15, 20, 25]
    assert overlay_slices(np.zeros((8, 2, 2))) == [4, 4, 4]


def test_out_folder_of_someone_else_is_refused(tmp_path, cli_main, capsys):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(UsageError):
        claim_out_folder(tmp_path)
    assert cli_main(["demo", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("pumit-nnunet demo: error: ") and "not made by" in error[0]
    assert (tmp_path / "mine.txt").read_text() == "user data" and not (tmp_path / OUT_MARKER).exists()


def _demo(out: Path) -> str:
    env = {**os.environ, "PUMIT_DEMO_BUDGET": "quick", "nnUNet_def_n_proc": "2", "PYTHONUNBUFFERED": "1"}
    return run_command([sys.executable, "-m", "pumit_nnunet.cli", "demo", "--out", str(out)], env, timeout=1200).stdout


def _rows(stdout: str) -> dict[str, re.Match]:
    return {m["trainer"]: m for m in ROW_RE.finditer(stdout)}


def test_nnunet_twin_trains_on_the_pumit_twins_fitted_patch_and_batch(monkeypatch):
    # a GPU budget this small makes the memory fit shrink the PUMIT twin's patch on stock plans
    from test_memory_fit import DATASET_JSON, _stock_plans

    from pumit_nnunet.nnunet.demo_trainers import PumitTrainer_T_demo, match_twin_plans
    from pumit_nnunet.nnunet.memory_fit import ENV_BUDGET
    from pumit_nnunet.nnunet.plans import adapt_configuration

    monkeypatch.setenv(ENV_BUDGET, "0.05")
    twin, budget = PumitTrainer_T_demo, PumitTrainer_T_demo.demo_budget
    unfitted = adapt_configuration(_stock_plans(), "3d_fullres", "T", budget.patch_cap, budget.batch_size)
    pumit, nnunet = _stock_plans(), _stock_plans()
    twin.fit_plans(pumit, "3d_fullres", DATASET_JSON)
    match_twin_plans(nnunet, "3d_fullres", DATASET_JSON, twin)
    fitted, baseline = pumit["configurations"]["3d_fullres"], nnunet["configurations"]["3d_fullres"]
    assert fitted["patch_size"] != unfitted["patch_size"]  # the fit did change the patch
    assert (baseline["patch_size"], baseline["batch_size"]) == (fitted["patch_size"], fitted["batch_size"])
    assert baseline["batch_size"] == budget.batch_size
    assert baseline["architecture"] == _stock_plans()["configurations"]["3d_fullres"]["architecture"]  # still the U-Net


@pytest.mark.e2e
def test_demo_trains_both_trainers_prints_one_table_draws_the_overlay_and_resumes(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    stdout = _demo(out)
    rows = _rows(stdout)
    assert set(rows) == {"nnUNetTrainer_demo_quick", "PumitTrainer_T_demo_quick"}, stdout[-3000:]
    for row in rows.values():
        assert 0.0 <= float(row["dice"]) <= 1.0 and row["start"] == "from scratch"
    picture = out / "demo_overlay.png"
    assert f"overlay (image, label, each prediction, same slices): {picture}" in stdout
    with Image.open(picture) as image:
        image.verify()
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 3 * 150  # label + 2 prediction rows
    progress = re.findall(r"^training curves of .*: (\S+progress\.png)$", stdout, re.M)
    assert len(progress) == 2 and all(Path(p).is_file() for p in progress)

    # a rerun reuses every finished step: no training, no prediction, the same table (the original times included)
    finished = sorted(out.glob("nnUNet_results/*/*/fold_0/checkpoint_final.pth")) + sorted(out.glob("predictions/*/*.nii.gz"))
    stamps = [p.stat().st_mtime_ns for p in finished]
    again = _demo(out)
    assert "$ nnUNetv2_train" not in again and "$ nnUNetv2_predict" not in again and "$ nnUNetv2_plan" not in again
    assert [p.stat().st_mtime_ns for p in finished] == stamps and len(finished) == 4
    assert {k: m.group(0) for k, m in _rows(again).items()} == {k: m.group(0) for k, m in rows.items()}
