"""A shared nnU-Net model folder must not be able to run code or poison a run (stock commands, real CT scans).

- what a PUMIT trainer writes loads weights-only, is certified by ``pumit-nnunet check-model-folder`` and predicts
  under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (the documented safe way to use nnU-Net's predictor);
- a checkpoint with a ``__reduce__`` payload (it would create a marker file) is refused by every path we control
  (``--c``, ``--val``, ``-pretrained_weights``, ``weights ...``, ``check-model-folder``) and by that prediction path;
- a run whose loss turns NaN stops with one line and keeps its last good checkpoint; NaN weights are refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import CT_ID, nnunet_environment, run_command
from safety_payloads import write_malicious_checkpoint

pytestmark = pytest.mark.e2e

SAFETY_TRAINERS = Path(__file__).resolve().parent / "safety_trainers"
DATASET = "Dataset950_RealCTLung5mm"
TRAINER = "PumitTrainer_T_safety"


def safety_environment(root: Path, results: Path | None = None, training: bool = True) -> dict[str, str]:
    """nnU-Net's environment with the test-only trainers findable (our start-up hook appends the shipped ones)."""
    env = nnunet_environment(root, training=training)
    env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (str(SAFETY_TRAINERS), env.get("nnUNet_extTrainer")) if p)
    if results is not None:
        env["nnUNet_results"] = str(results)
    return env


def run_refused(args: list[str], env: dict[str, str]) -> str:
    """Run a command that must refuse; returns its last stderr line."""
    result = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
    assert result.returncode != 0, f"{' '.join(args)} did not refuse:\n{result.stdout[-3000:]}"
    return result.stderr.strip().splitlines()[-1]


def predict(env: dict[str, str], trainer: str, image: Path, out: Path) -> subprocess.CompletedProcess:
    inputs = out.parent / f"{out.name}_in"
    inputs.mkdir(parents=True)
    os.symlink(image, inputs / image.name)
    args = ["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(CT_ID), "-c", "3d_fullres", "-tr", trainer,
            "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]
    return subprocess.run(args, env={**env, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=900)


@pytest.fixture(scope="module")
def trained(nnunet_root: Path) -> Path:
    """The results root after the tiny smoke run of ``PumitTrainer_T_safety`` (fold 0 of the 5 mm CT)."""
    env = safety_environment(nnunet_root)
    run_command(["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    return nnunet_root / "results"


def _model_folder(results: Path) -> Path:
    return results / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"


def _image(root: Path) -> Path:
    return root / "raw" / DATASET / "imagesTr" / "lung1b_0000.nii.gz"


def test_our_model_folder_loads_weights_only_and_predicts_under_the_safe_flag(nnunet_root, trained, tmp_path):
    folder = _model_folder(trained)
    for path in folder.glob("fold_0/checkpoint_*.pth"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no extra allowed globals
        assert checkpoint["trainer_name"] == TRAINER and isinstance(checkpoint["_best_ema"], (float, type(None)))
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["network_weights"])
    env = safety_environment(nnunet_root, training=False)
    certified = run_command(["pumit-nnunet", "check-model-folder", str(folder)], env).stdout
    assert "checkpoints load weights-only and are finite" in certified and "BAD" not in certified
    result = predict(env, TRAINER, _image(nnunet_root), tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = sitk.ReadImage(str(tmp_path / "pred" / "lung1b.nii.gz"))
    assert prediction.GetSize() == sitk.ReadImage(str(_image(nnunet_root))).GetSize()


def test_a_malicious_checkpoint_never_runs_on_any_path(nnunet_root, trained, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(trained / DATASET, results / DATASET, symlinks=True)
    final = _model_folder(results) / "fold_0" / "checkpoint_final.pth"
    marker = tmp_path / "PWNED"
    write_malicious_checkpoint(final, marker, like=torch.load(final, map_location="cpu", weights_only=True))
    env = safety_environment(nnunet_root, results)
    train = ["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    for flag in ("--val", "--c"):  # load_checkpoint of our trainers
        line = run_refused(train + [flag], env)
        assert line.startswith(f"PUMIT trainer: error: {final}: refused: the file holds pickled objects"), line
    line = run_refused(["nnUNetv2_train", str(CT_ID), "3d_fullres", "1", "-tr", TRAINER, "-device", "cpu",
                        "-pretrained_weights", str(final)], env)
    assert line.startswith(f"PUMIT trainer: error: {final}: -pretrained_weights not loaded: refused: the file holds "
                           "pickled objects"), line
    assert not list((_model_folder(results) / "fold_1").glob("checkpoint_*.pth"))
    line = run_refused(["pumit-nnunet", "check-model-folder", str(results)], env)
    assert line.startswith(f"pumit-nnunet check-model-folder: error: {final}: refused"), line
    for command in (["inspect", str(final)], ["verify", str(final)],
                    ["convert", str(final), "--out", str(tmp_path / "converted.pt")]):
        line = run_refused(["pumit-nnunet", "weights", *command], env)
        assert line.startswith(f"pumit-nnunet weights {command[0]}: error: ") and "pickled objects" in line, line
    # nnU-Net's own predictor (not ours) under the documented flag: refused before anything is unpickled
    result = predict(safety_environment(nnunet_root, results, training=False), TRAINER, _image(nnunet_root),
                     tmp_path / "pred")
    assert result.returncode != 0 and "Weights only load failed" in result.stderr
    assert not (tmp_path / "pred" / "lung1b.nii.gz").exists() and not (tmp_path / "converted.pt").exists()
    assert not marker.exists()
    torch.load(final, map_location="cpu", weights_only=False)  # the payload is real: stock loading runs it
    assert marker.exists()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(nnunet_root, tmp_path):
    results = tmp_path / "results"
    env = {**safety_environment(nnunet_root, results), "PUMIT_MAX_NONFINITE_STEPS": "2"}
    trainer = "PumitTrainer_T_nanloss"  # epoch 0 trains and saves checkpoint_latest; from epoch 1 the loss is NaN
    line = run_refused(["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    assert line.startswith("PUMIT trainer: error: training stopped: the loss was non-finite for 2 consecutive "
                           "iterations"), line
    fold = results / DATASET / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    assert not (fold / "checkpoint_final.pth").exists()  # nnU-Net would have saved the NaN model as final
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=True)
    assert latest["current_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in latest["network_weights"].values() if v.is_floating_point())
    log = next(fold.glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "non-finite loss (nan) at iteration 2; step skipped (1 in a row, stop at 2)" in log

    # NaN weights as -pretrained_weights: refused before training, naming the file and the first bad tensors
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in latest["network_weights"].items()}
    nan_file = tmp_path / "nan_weights.pth"
    torch.save({"network_weights": nan}, nan_file)
    line = run_refused(["nnUNetv2_train", str(CT_ID), "3d_fullres", "1", "-tr", TRAINER, "-device", "cpu",
                        "-pretrained_weights", str(nan_file)], env)
    assert line.startswith(f"PUMIT trainer: error: {nan_file}: -pretrained_weights not loaded: weights hold NaN/Inf "
                           "values: backbone."), line
