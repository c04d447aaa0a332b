"""Our checkpoint format and the readers: round trips, weights-only loading, detection of every format, bad files."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch

from pumit_nnunet.checkpoints.format import (
    VIT_ADAPTATION,
    CheckpointError,
    PretrainPlan,
    load_pumit_checkpoint,
    save_pumit_checkpoint,
)
from pumit_nnunet.checkpoints.readers import read_weights, torch_load_checked
from pumit_nnunet.checkpoints.samples import eva02_original_checkpoint, released_pumit_checkpoint
from pumit_nnunet.models.vit import UniversalViT, ViTConfig

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1))


class _HyperParameters:
    """A foreign class pickled into a Lightning checkpoint (as LightningCLI does); reading must not import it."""

    def __init__(self, value: int) -> None:
        self.value = value


class _Malicious:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def _vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UniversalViT(SMALL).state_dict()


def test_round_trip_weights_only(tmp_path):
    state = _vit_state()
    plan = PretrainPlan(in_channels=3, intensity="unit-range-imagenet", spacing=[1.0, 0.8, 0.8], patch_size=[64, 128, 128])
    path = tmp_path / "sub" / "vit.pt"
    save_pumit_checkpoint(path, kind="mim", state_dict=state, architecture=SMALL.to_dict(), pretrain_plan=plan,
                          adaptation=VIT_ADAPTATION, extra={"step": np.int64(7), "hist": np.arange(3), "p": tmp_path})
    raw = torch.load(path, weights_only=True)  # plain values and tensors only
    assert raw["format"] == "pumit-nnunet" and raw["version"]
    ckpt = load_pumit_checkpoint(path)
    assert ckpt.kind == "mim" and ckpt.pretrain_plan == plan and ckpt.adaptation == VIT_ADAPTATION
    assert ViTConfig.from_dict(ckpt.architecture) == SMALL
    assert ckpt.extra["step"] == 7 and ckpt.extra["p"] == str(tmp_path)
    torch.testing.assert_close(ckpt.extra["hist"], torch.arange(3))
    for key, value in state.items():
        torch.testing.assert_close(ckpt.state_dict[key], value, rtol=0, atol=0)
    assert sorted(os.listdir(path.parent)) == ["vit.pt"]  # atomic: no temporary left behind


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        save_pumit_checkpoint(tmp_path / "a.pt", kind="resnet", state_dict={}, architecture={})
    with pytest.raises(TypeError, match="cannot store"):
        save_pumit_checkpoint(tmp_path / "a.pt", kind="vit", state_dict={}, architecture={}, extra={"o": object()})
    assert not list(tmp_path.iterdir())


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    save_pumit_checkpoint(path, kind="vit", state_dict=_vit_state(), architecture=SMALL.to_dict())
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_pumit_checkpoint(path)


def test_tokenizer_checkpoint_has_no_vit(tmp_path):
    path = tmp_path / "tok.pt"
    save_pumit_checkpoint(path, kind="tokenizer", state_dict={"quantize.embedding.weight": torch.zeros(4, 2)},
                          architecture={})
    with pytest.raises(CheckpointError, match="tokenizer"):
        read_weights(path)


def test_lightning_checkpoint_with_foreign_objects_reads_as_inert_stubs(tmp_path):
    ckpt = released_pumit_checkpoint(_vit_state())
    ckpt["hyper_parameters"] = {"ns": argparse.Namespace(lr=1e-3), "conf": _HyperParameters(1)}
    path = tmp_path / "pumit-b.ckpt"
    torch.save(ckpt, path)
    weights = read_weights(path)
    assert weights.format == "pumit-released" and weights.encoder_prefix == ""
    assert "mim_head.2.weight" in weights.state_dict and "mask_token" in weights.state_dict
    raw = torch_load_checked(path)
    assert type(raw["hyper_parameters"]["conf"]) is not _HyperParameters  # a stub, the class was never imported


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capfd):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _vit_state(), "x": _Malicious()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt holds pickled objects .*system"):
        read_weights(path)
    assert "should-never-run" not in capfd.readouterr().out


@pytest.mark.parametrize(
    ("build", "expected", "prefix"),
    [
        (lambda s: released_pumit_checkpoint(s), "pumit-released", ""),
        (lambda s: eva02_original_checkpoint(s, head_dim=32), "eva02", ""),
        (lambda s: dict(s), "state-dict", ""),
        (lambda s: {"network_weights": {f"backbone.{k}": v for k, v in s.items()}, "trainer_name": "PumitTrainer"},
         "nnunet-results", "backbone."),
        (lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}}, "pumit-released", ""),
    ],
)
def test_format_detection(tmp_path, build, expected, prefix):
    path = tmp_path / "ckpt.pth"
    torch.save(build(_vit_state()), path)
    weights = read_weights(path)
    assert (weights.format, weights.encoder_prefix) == (expected, prefix)
    assert "cls_token" in weights.encoder_state_dict()


def test_bad_files_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        read_weights(tmp_path / "absent.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        torch_load_checked(empty)
    good = tmp_path / "good.pt"
    save_pumit_checkpoint(good, kind="vit", state_dict=_vit_state(), architecture=SMALL.to_dict())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt .*truncated or not a torch checkpoint"):
        read_weights(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        read_weights(text)


def test_state_dict_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"no ViT weights.*0\.weight"):
        read_weights(path)
    torch.save({"network_weights": {"encoder.stages.0.conv.weight": torch.zeros(2)}, "trainer_name": "nnUNetTrainer"}, path)
    with pytest.raises(CheckpointError, match="another model"):
        read_weights(path)
