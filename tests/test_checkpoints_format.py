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
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused: the file holds pickled objects .*system"):
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
    with pytest.raises(CheckpointError, match=r"truncated\.pt: .*truncated or not a torch checkpoint"):
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


# --- layouts of earlier releases and of the authors ------------------------------------------------------------------
def _tiny_tokenizer_and_discriminator(seed: int = 0):
    from pumit_nnunet.models.discriminator import PatchDiscriminator
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config

    torch.manual_seed(seed)
    return UniversalTokenizer(tokenizer_config("tiny")).eval(), PatchDiscriminator()


def _same_tokens(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.rand(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(a.encode(x, 0), b.encode(x, 0))


def test_tokenizer_final_of_an_earlier_release_loads(tmp_path):
    """``checkpoint_final.pth`` of the release before this one: the whole training state, ``format``
    ``pumit-nnunet/tokenizer/1``, the architecture under ``config`` (the entries below are those such a file holds)."""
    from pumit_nnunet.checkpoints.tokenizer import LEGACY_TOKENIZER_FORMAT, load_tokenizer, read_tokenizer_weights

    model, disc = _tiny_tokenizer_and_discriminator()
    legacy = {"format": LEGACY_TOKENIZER_FORMAT, "package_version": "0.4.0", "step": 2, "config": model.config.to_dict(),
              "discriminator_config": disc.config.to_dict(), "model": model.state_dict(),
              "discriminator": disc.state_dict(), "train_config": {"preset": "tiny", "min_lr_ratio": 0.01},
              "optimizer_g": {"state": {}, "param_groups": []}, "gate": {"ema": 1.0}, "world_size": 1,
              "rng": [], "loader": [None], "history": {}}
    torch.save(legacy, tmp_path / "checkpoint_final.pth")
    weights = read_tokenizer_weights(tmp_path / "checkpoint_final.pth")
    assert weights.format == LEGACY_TOKENIZER_FORMAT and weights.config == model.config
    assert weights.discriminator is not None and set(weights.discriminator) == set(disc.state_dict())
    _same_tokens(load_tokenizer(tmp_path / "checkpoint_final.pth"), model)


def test_tokenizer_state_of_an_earlier_release_is_refused_on_resume_with_the_way_out(tmp_path):
    from pumit_nnunet.checkpoints.tokenizer import LEGACY_TOKENIZER_FORMAT
    from pumit_nnunet.errors import UsageError
    from pumit_nnunet.pretrain import run as R
    from pumit_nnunet.pretrain.config import TokenizerTrainConfig
    from pumit_nnunet.pretrain.distributed import DistInfo

    config = TokenizerTrainConfig(data="d", out=str(tmp_path), preset="tiny")
    state = {"format": LEGACY_TOKENIZER_FORMAT, "train_config": {"data": "d", "out": str(tmp_path), "preset": "tiny"}}
    with pytest.raises(UsageError, match=r"cannot be resumed exactly; continue in a new --out with `--init "):
        R.check_resume(state, config, tmp_path / R.TRAIN_STATE, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_authors_tokenizer_sizes_are_read_from_the_shapes(preset):
    from pumit_nnunet.checkpoints.tokenizer import infer_tokenizer_config
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config

    config = tokenizer_config(preset)
    with torch.device("meta"):  # shapes only: the base tokenizer is never allocated
        state = UniversalTokenizer(config).state_dict()
    assert infer_tokenizer_config(state) == config


@pytest.mark.parametrize("bare", [False, True], ids=["fabric-dict", "bare-state-dict"])
def test_authors_tokenizer_checkpoint_loads(tmp_path, bare):
    """The authors' ``simple-soft.ckpt`` layout: their key names (ours), no architecture entry."""
    from pumit_nnunet.checkpoints.tokenizer import load_tokenizer, read_tokenizer_weights

    model, disc = _tiny_tokenizer_and_discriminator(seed=3)
    if bare:
        obj = model.state_dict()
    else:
        obj = {"model": model.state_dict(), "discriminator": disc.state_dict(), "step": 500_000,
               "optimizer_g": {"state": {}, "param_groups": [{"lr": 1e-6}]}, "optimizer_d": {"state": {}}}
    torch.save(obj, tmp_path / "simple-soft.ckpt")
    weights = read_tokenizer_weights(tmp_path / "simple-soft.ckpt")
    assert weights.format == "authors" and weights.config == model.config
    assert (weights.discriminator is None) == bare
    _same_tokens(load_tokenizer(tmp_path / "simple-soft.ckpt"), model)


def test_a_vit_is_not_a_tokenizer(tmp_path):
    from pumit_nnunet.checkpoints.tokenizer import read_tokenizer_weights

    torch.save(_vit_state(), tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="holds no tokenizer weights"):
        read_tokenizer_weights(tmp_path / "vit.pth")


def _tiny_classifier():
    from pumit_nnunet.models.classifier import PumitClassifier

    torch.manual_seed(0)
    return PumitClassifier(SMALL, 3).eval()


def test_classifier_checkpoint_new_and_earlier_layout(tmp_path):
    from pumit_nnunet.checkpoints.classifier import CLASSIFIER_ADAPTATION, load_classifier, save_classifier

    model = _tiny_classifier()
    save_classifier(tmp_path / "new.pt", model, extra={"dataset": "organmnist3d"})
    assert load_pumit_checkpoint(tmp_path / "new.pt").kind == "classifier"
    # what the earlier release wrote: kind "vit", the head flagged in extra
    save_pumit_checkpoint(tmp_path / "old.pt", kind="vit", state_dict=model.state_dict(),
                          architecture=model.architecture(), adaptation=CLASSIFIER_ADAPTATION,
                          extra={"classifier": True, "dataset": "organmnist3d"})
    x = torch.rand(2, 3, 16, 32, 32)
    for name in ("new.pt", "old.pt"):
        loaded, extra = load_classifier(tmp_path / name)
        assert extra["dataset"] == "organmnist3d"
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), model(x))
        assert read_weights(tmp_path / name).encoder_prefix == "vit."  # its backbone feeds fine-tuning like any ViT


def test_a_plain_vit_is_not_a_classifier(tmp_path):
    from pumit_nnunet.checkpoints.classifier import load_classifier

    save_pumit_checkpoint(tmp_path / "vit.pt", kind="vit", state_dict=_vit_state(), architecture=SMALL.to_dict(),
                          adaptation=VIT_ADAPTATION)
    with pytest.raises(CheckpointError, match="without a classifier head; fine-tune it first"):
        load_classifier(tmp_path / "vit.pt")
