"""``pumit-nnunet pretrain mim``: a run, the refusal to overwrite it, and its exact resume via the console script."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
from pumit_nnunet.cli import main
from test_mim_trainer import one_thread, store, tokenizer_ckpt  # noqa: F401,F811  (shared fixtures; one_thread is autouse)


def _args(store, tokenizer, out, steps: int) -> list[str]:
    return ["pretrain", "mim", "--data", str(store), "--tokenizer", str(tokenizer), "--out", str(out), "--vit", "T",
            "--steps", str(steps), "--warmup-steps", "1", "--batch-size", "2", "--crop-depth-tokens", "2",
            "--crop-inplane-tokens", "4", "--device", "cpu", "--precision", "fp32", "--ckpt-every", "2",
            "--image-every", "100", "--log-every", "1"]


def test_mim_command_trains_refuses_to_overwrite_and_resumes(store, tokenizer_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(store, tokenizer_ckpt, out, 2)) == 0
    first = load_pumit_checkpoint(out / "pumit_mim_final.pth")
    assert first.kind == "mim" and first.extra["step"] == 2

    assert main(_args(store, tokenizer_ckpt, out, 2)) == 2
    assert "--resume" in capsys.readouterr().err

    done = subprocess.run(["pumit-nnunet", *_args(store, tokenizer_ckpt, out, 3), "--resume"], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = load_pumit_checkpoint(out / "pumit_mim_final.pth")
    assert resumed.extra["step"] == 3
    assert not torch.equal(resumed.state_dict["mim_head.2.weight"], first.state_dict["mim_head.2.weight"])


def test_mim_help_documents_torchrun_and_fine_tuning(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "mim", "--help"])
    text = capsys.readouterr().out
    assert "torchrun" in text and "-pretrained_weights" in text and "--mask-ratio" in text
