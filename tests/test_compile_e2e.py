"""nnU-Net compiles the network by default on CUDA; here the same path is forced on the CPU (a test-only trainer whose
``_do_i_compile`` returns True) through the stock commands, on real CT scans: ``-pretrained_weights`` into the
compiled network, checkpoints saved from it (plain names, weights-only), ``--c`` and ``--val`` into a compiled
network, and prediction from the result. Kept to one epoch of two iterations, with the ``aot_eager`` backend unless
``PUMIT_TEST_COMPILE_BACKEND`` says otherwise: inductor's code generation takes minutes on 2 cores."""

from __future__ import annotations

import shutil

import pytest
import SimpleITK as sitk
import torch

from conftest import CT_ID, run_command
from test_safety_e2e import DATASET, _image, predict, safety_environment

pytestmark = pytest.mark.e2e

TRAINER = "PumitTrainer_T_compiled"


def _plain_and_finite(checkpoint: dict) -> bool:
    weights = checkpoint["network_weights"]
    return not any(k.startswith(("_orig_mod.", "module.")) for k in weights) and all(
        torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_compiled_trainer_path_end_to_end(nnunet_root, tmp_path):
    from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
    from pumit_nnunet.layers.sac import reduce_depth_kernel
    from pumit_nnunet.models.vit import UniversalViT, vit_config

    vit = randomise_(UniversalViT(vit_config("T", mask_token=True)), seed=4)
    weights = tmp_path / "pumit-t.ckpt"
    torch.save(released_pumit_checkpoint(vit.state_dict()), weights)
    results = tmp_path / "results"
    # PUMIT_TEST_COMPILE_BACKEND=inductor runs nnU-Net's exact backend (minutes of code generation per process)
    env = {"PUMIT_TEST_COMPILE_BACKEND": "aot_eager", **safety_environment(nnunet_root, results)}
    train = ["nnUNetv2_train", str(CT_ID), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    run_command(train + ["-pretrained_weights", str(weights)], env, timeout=1800)
    fold = results / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text(encoding="utf-8")
    assert "Using torch.compile" in log
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 1 and _plain_and_finite(final)  # saved from _orig_mod, not the wrapper
    # the pre-trained kernel reached the compiled network: its SAC reduction (aniso_d 3), summed over RGB, moved
    # by two AdamW steps at lr <= 1e-4 only
    expected = reduce_depth_kernel(vit.state_dict()["patch_embed.proj.weight"], 8).sum(1, keepdim=True)
    torch.testing.assert_close(final["network_weights"]["backbone.patch_embed.proj.weight"], expected, atol=5e-4, rtol=0)

    # --c into a compiled network: resume the (rewound) epoch 0 from checkpoint_latest.pth and train it again
    torch.save({**final, "current_epoch": 0}, fold / "checkpoint_latest.pth")
    (fold / "checkpoint_final.pth").unlink()
    run_command(train + ["--c"], env, timeout=1800)
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert resumed["current_epoch"] == 1 and _plain_and_finite(resumed)
    moved = resumed["network_weights"]["backbone.patch_embed.proj.weight"] - final["network_weights"]["backbone.patch_embed.proj.weight"]
    assert 0 < moved.abs().max() < 5e-4  # trained on from the loaded weights, not from a fresh initialisation
    logs = sorted(fold.glob("training_log_*.txt"))
    assert any("weights-only" in path.read_text(encoding="utf-8") for path in logs)

    # --val into a compiled network
    shutil.rmtree(fold / "validation")
    run_command(train + ["--val"], env, timeout=1800)
    assert (fold / "validation" / "summary.json").is_file()

    # prediction from the compiled run's checkpoint under the safe flag
    result = predict(safety_environment(nnunet_root, results, training=False), TRAINER, _image(nnunet_root),
                     tmp_path / "pred")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sitk.ReadImage(str(tmp_path / "pred" / "lung1b.nii.gz")).GetSize() == \
        sitk.ReadImage(str(_image(nnunet_root))).GetSize()
