"""The whole chain at tiny scale on CPU, on real scans:

real demo images -> corpus store -> tokenizer training -> MIM training -> PUMIT checkpoint -> nnU-Net planning and
preprocessing -> fine-tuning with PumitTrainer from that checkpoint (``-pretrained_weights``) -> prediction.
Every stage goes through the user-facing command (``pumit-nnunet ...`` in process, stock ``nnUNetv2_*`` as
subprocesses).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import SimpleITK as sitk

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
from pumit_nnunet.cli import main

DATASET_ID = 961
CROP_ZYX = (16, 64, 64)
STAGE_TIMEOUT = 600


def _raw_dataset(real_demo_dir: Path, raw: Path) -> Path:
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    source = real_demo_dir / "Dataset903_RealMRBrainLesion"
    cases = [SourceCase(f"{name}{suffix}", source / "imagesTr" / f"{name}_0000.nii.gz", source / "labelsTr" /
                        f"{name}.nii.gz", shift) for name in ("brain1", "brain2")
             for suffix, shift in (("", (0, 0, 0)), ("s", (0, 12, -12)))]
    splits = [{"train": ["brain1", "brain2", "brain1s"], "val": ["brain2s"]}]
    return write_raw_dataset(cases, raw, DATASET_ID, "MimChain", "T1c", {"background": 0, "lesion": 1}, CROP_ZYX,
                             splits=splits)


def _nnunet(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=STAGE_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.e2e
def test_real_images_to_tokenizer_to_mim_to_nnunet_fine_tuning_and_prediction(real_demo_dir, tmp_path):
    # 1. corpus store + tokenizer training (a few steps of the tiny preset, no perceptual loss: no VGG weights here)
    from pumit_nnunet.corpus.api import ensure_store

    store = ensure_store(real_demo_dir / "Dataset903_RealMRBrainLesion", tmp_path / "corpus")
    tok = tmp_path / "tokenizer"
    assert main(["pretrain", "tokenizer", "--data", str(store), "--out", str(tok), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "1", "--crop-depth-tokens", "1", "--crop-inplane-tokens", "4", "--device", "cpu",
                 "--precision", "fp32", "--no-perceptual", "--val-every", "2", "--ckpt-every", "2",
                 "--warmup-steps", "1"]) == 0
    # 2. MIM on the trained tokenizer's soft tokens
    mim = tmp_path / "mim"
    assert main(["pretrain", "mim", "--data", str(store), "--tokenizer", str(tok / "pumit_tokenizer_final.pth"), "--out",
                 str(mim), "--vit", "T", "--steps", "2", "--warmup-steps", "1", "--batch-size", "1",
                 "--crop-depth-tokens", "2", "--crop-inplane-tokens", "4", "--device", "cpu", "--precision", "fp32",
                 "--log-every", "1", "--image-every", "2"]) == 0
    weights = mim / "pumit_mim_final.pth"
    checkpoint = load_pumit_checkpoint(weights)
    assert checkpoint.kind == "mim" and checkpoint.extra["codebook_size"] == 64

    # 3. nnU-Net: stock planning, PumitTrainer fine-tuning from the MIM checkpoint, prediction
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "1"}
    raw = _raw_dataset(real_demo_dir, tmp_path / "raw")
    _nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"], env)
    log = _nnunet(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", "PumitTrainer_T_smoke", "-device",
                   "cpu", "-pretrained_weights", str(weights)], env)
    # the pretrained-weights route ran and its load report lists no missing backbone weight
    assert f"loading pre-trained weights from {weights}" in log and ", 0 missing," in log, log[-3000:]
    output = tmp_path / "pred"
    _nnunet(["nnUNetv2_predict", "-i", str(raw / "imagesTr"), "-o", str(output), "-d", str(DATASET_ID), "-c",
             "3d_fullres", "-tr", "PumitTrainer_T_smoke", "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu",
             "-npp", "1", "-nps", "1", "--disable_tta"], env)
    for case in ("brain1", "brain2s"):
        prediction = sitk.ReadImage(str(output / f"{case}.nii.gz"))
        assert prediction.GetSize() == sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz")).GetSize()
