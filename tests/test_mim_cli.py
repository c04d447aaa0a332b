"""``pumit-nnunet pretrain mim``: a run, the refusal to overwrite it, and its exact resume via the console script."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
from pumit_nnunet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(store, tokenizer, out, steps: int) -> list[str]:
    return ["pretrain", "mim", "--data", str(store), "--tokenizer", str(tokenizer), "--out", str(out), "--vit", "T",
            "--steps", str(steps), "--warmup-steps", "1", "--batch-size", "2", "--crop-depth-tokens", "2",
            "--crop-inplane-tokens", "4", "--device", "cpu", "--precision", "fp32", "--ckpt-every", "2",
            "--image-every", "100", "--log-every", "1"]


def test_mim_command_trains_refuses_to_overwrite_and_resumes(mim_store, mim_tokenizer_ckpt, tmp_path, capsys):
    store, tokenizer_ckpt = mim_store, mim_tokenizer_ckpt
    out = tmp_path / "run"
    assert main(_args(store, tokenizer_ckpt, out, 2)) == 0
    first = load_pumit_checkpoint(out / "pumit_mim_final.pth")
    assert first.kind == "mim" and first.extra["step"] == 2

    assert main(_args(store, tokenizer_ckpt, out, 2)) == 2
    assert "--resume" in capsys.readouterr().err
    # a different recipe is refused in one line naming every differing field
    assert main(_args(store, tokenizer_ckpt, out, 3) + ["--lr", "1e-3", "--mask-ratio", "0.5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pumit-nnunet pretrain mim: error:")
    assert "lr 2e-05 -> 0.001" in err and "mask_ratio 0.55 -> 0.5" in err

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


def test_mim_stop_at_then_resume(mim_store, mim_tokenizer_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(mim_store, mim_tokenizer_ckpt, out, 3) + ["--stop-at", "1"]) == 0
    assert "--stop-at" in capsys.readouterr().out and not (out / "pumit_mim_final.pth").exists()
    assert torch.load(out / "checkpoint_latest.pth", weights_only=True)["step"] == 1
    assert main(_args(mim_store, mim_tokenizer_ckpt, out, 3) + ["--resume"]) == 0
    assert load_pumit_checkpoint(out / "pumit_mim_final.pth").extra["step"] == 3


def test_mim_state_of_an_earlier_release_resumes_exactly(mim_store, mim_tokenizer_ckpt, tmp_path):
    """The earlier release wrote the same MIM training state without ``format``/``stage``/``package_version``
    and with a config that had no ``stop_at``; it resumes, and to the same weights as today's layout."""
    import shutil

    ours, legacy = tmp_path / "ours", tmp_path / "legacy"
    assert main(_args(mim_store, mim_tokenizer_ckpt, ours, 3) + ["--stop-at", "2"]) == 0
    shutil.copytree(ours, legacy)
    state = torch.load(legacy / "checkpoint_latest.pth", weights_only=True)
    for key in ("format", "stage", "package_version"):
        del state[key]
    del state["config"]["stop_at"]
    torch.save(state, legacy / "checkpoint_latest.pth")
    for out in (ours, legacy):
        assert main(_args(mim_store, mim_tokenizer_ckpt, out, 3) + ["--resume"]) == 0
    finals = [load_pumit_checkpoint(out / "pumit_mim_final.pth") for out in (ours, legacy)]
    assert finals[1].extra["step"] == 3
    for name, tensor in finals[0].state_dict.items():
        torch.testing.assert_close(finals[1].state_dict[name], tensor, rtol=0, atol=0, msg=name)
