"""End to end with the stock nnU-Net commands on real scans: plan/preprocess, train, --c, --val, predict.

Everything runs through the real console scripts (``nnUNetv2_train`` ...) so the trainer lookup goes through the
start-up hook exactly as it does for users.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import CT_ID, MRI_ID, nnunet_environment, run_command

pytestmark = pytest.mark.e2e


def _results(root: Path, dataset: str, trainer: str, configuration: str) -> Path:
    return root / "results" / dataset / f"{trainer}__nnUNetPlans__{configuration}"


def _assert_same_geometry(a: Path, b: Path) -> None:
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    np.testing.assert_allclose(ia.GetSpacing(), ib.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(ia.GetOrigin(), ib.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ia.GetDirection(), ib.GetDirection(), atol=1e-6)


def _predict(root: Path, dataset_id: int, configuration: str, trainer: str, images: list[Path], out: Path) -> list[Path]:
    inputs = out.parent / f"{out.name}_in"
    inputs.mkdir(parents=True)
    for image in images:
        os.symlink(image, inputs / image.name)
    run_command(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", str(dataset_id), "-c", configuration,
                 "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], nnunet_environment(root))
    return [out / image.name.replace("_0000", "") for image in images]


def test_ct_3d_train_interrupt_resume_validate_predict(nnunet_root: Path, tmp_path: Path) -> None:
    """Anisotropic 5 mm CT (aniso_d 3): train, kill after the first checkpoint, resume with --c, --val, predict."""
    env = nnunet_environment(nnunet_root)
    trainer = "PumitTrainer_T_smoke_2epochs"
    out = _results(nnunet_root, "Dataset950_RealCTLung5mm", trainer, "3d_fullres") / "fold_0"
    cmd = ["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint_latest.pth").is_file():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint after 10 minutes"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # an interruption right after epoch 0's checkpoint
    process.wait()
    assert not (out / "checkpoint_final.pth").exists()

    run_command(cmd + ["--c"], env)
    import torch

    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 2 and final["trainer_name"] == trainer
    logs = sorted(out.glob("training_log_*.txt"), key=os.path.getmtime)
    assert "Epoch 1" in logs[-1].read_text(encoding="utf-8") and "Epoch 0\n" not in logs[-1].read_text(encoding="utf-8")
    assert (out / "progress.png").is_file()

    plans = json.loads((out.parent / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]
    assert plans["architecture"]["network_class_name"] == "pumit_nnunet.models.segmentation.PumitSegNet"
    assert plans["architecture"]["arch_kwargs"]["aniso_d"] == 3  # 5 mm / 0.57 mm
    assert plans["patch_size"] == plans["architecture"]["arch_kwargs"]["patch_size"] == [16, 64, 64]

    (out / "validation" / "summary.json").unlink()
    run_command(cmd + ["--val"], env)
    summary = json.loads((out / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert "foreground_mean" in summary

    # a case of another size than the patch (sliding window + padding), in its own geometry
    source = nnunet_root / "raw" / "Dataset950_RealCTLung5mm" / "imagesTr" / "lung2_0000.nii.gz"
    test_image = tmp_path / "case9_0000.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(sitk.ReadImage(str(source)), [90, 70, 13], [3, 20, 2]), str(test_image))
    (prediction,) = _predict(nnunet_root, CT_ID, "3d_fullres", trainer, [test_image], tmp_path / "pred")
    _assert_same_geometry(prediction, test_image)
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))))) <= {0, 1}


def test_ct_2d_configuration_trains_and_predicts(nnunet_root: Path, tmp_path: Path) -> None:
    env = nnunet_environment(nnunet_root)
    trainer = "PumitTrainer_T_smoke"
    run_command(["nnUNetv2_train", str(CT_ID), "2d", "0", "-tr", trainer, "-device", "cpu", "--npz"], env)
    out = _results(nnunet_root, "Dataset950_RealCTLung5mm", trainer, "2d")
    arch = json.loads((out / "plans.json").read_text(encoding="utf-8"))["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert arch["patch_size"] == [64, 64]
    image = nnunet_root / "raw" / "Dataset950_RealCTLung5mm" / "imagesTr" / "lung1b_0000.nii.gz"
    (prediction,) = _predict(nnunet_root, CT_ID, "2d", trainer, [image], tmp_path / "pred2d")
    _assert_same_geometry(prediction, image)


def test_isotropic_mri_3d_trains_and_predicts(nnunet_root: Path, tmp_path: Path) -> None:
    env = nnunet_environment(nnunet_root)
    trainer = "PumitTrainer_T_smoke"
    run_command(["nnUNetv2_train", str(MRI_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env)
    out = _results(nnunet_root, "Dataset951_RealMRIBrain1mm", trainer, "3d_fullres")
    arch = json.loads((out / "plans.json").read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["aniso_d"] == 0 and arch["patch_size"] == [32, 64, 64]
    image = nnunet_root / "raw" / "Dataset951_RealMRIBrain1mm" / "imagesTr" / "mni152b_0000.nii.gz"
    (prediction,) = _predict(nnunet_root, MRI_ID, "3d_fullres", trainer, [image], tmp_path / "pred_mri")
    _assert_same_geometry(prediction, image)


def test_trainers_are_found_without_the_hook_through_the_documented_variable(nnunet_root: Path) -> None:
    """The manual fallback: PUMIT_NNUNET_NO_HOOK=1 plus the export line that ``pumit-nnunet env`` prints."""
    env = nnunet_environment(nnunet_root)
    env["PUMIT_NNUNET_NO_HOOK"] = "1"
    env.pop("nnUNet_extTrainer", None)
    probe = "import os; print(os.environ.get('nnUNet_extTrainer'))"
    assert run_command([os.sys.executable, "-c", probe], env).stdout.strip() == "None"
    line = run_command(["pumit-nnunet", "env"], env).stdout.strip().splitlines()[-1]
    assert line.startswith("export nnUNet_extTrainer=")
    env["nnUNet_extTrainer"] = line.split("=", 1)[1].strip("'\"")
    find = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "print(f('PumitTrainer').__module__)")
    assert run_command([os.sys.executable, "-c", find], env).stdout.strip().endswith("pumit_nnunet.nnunet.trainers")


def test_fine_tuning_from_a_released_format_checkpoint(nnunet_root: Path, tmp_path: Path) -> None:
    """``nnUNetv2_train ... -pretrained_weights pumit-b.ckpt``-style: a Lightning checkpoint with the released key
    names (16^3 RGB patch kernel, 5x10x10 position embedding, mask token, MIM head) fine-tunes the tiny trainer on
    the 5 mm CT; the backbone starts from the converted weights (kernel summed to 2x16x16 and to 1 channel)."""
    import torch

    from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
    from pumit_nnunet.layers.sac import reduce_depth_kernel
    from pumit_nnunet.models.vit import UniversalViT, vit_config

    vit = randomise_(UniversalViT(vit_config("T", mask_token=True)), seed=3)
    weights = tmp_path / "pumit-t.ckpt"
    torch.save(released_pumit_checkpoint(vit.state_dict()), weights)
    env = nnunet_environment(nnunet_root)
    trainer = "PumitTrainer_T_smoke"
    run_command(["nnUNetv2_train", str(CT_ID), "3d_fullres", "1", "-tr", trainer, "-device", "cpu",
                 "-pretrained_weights", str(weights)], env)
    log = next((_results(nnunet_root, "Dataset950_RealCTLung5mm", trainer, "3d_fullres") / "fold_1").glob("training_log_*.txt"))
    assert log.is_file()
    # the loaded kernel is the SAC reduction of the 16^3 one at aniso_d 3 (groups of 8 depth taps), summed over RGB
    final = torch.load(log.parent / "checkpoint_final.pth", map_location="cpu", weights_only=True)["network_weights"]
    expected = reduce_depth_kernel(vit.state_dict()["patch_embed.proj.weight"], 8).sum(1, keepdim=True)
    assert final["backbone.patch_embed.proj.weight"].shape == expected.shape
    # two AdamW steps at lr <= 1e-4 move a weight by at most ~2e-4
    torch.testing.assert_close(final["backbone.patch_embed.proj.weight"], expected, atol=5e-4, rtol=0)
