"""Load reports, mismatch errors and the nnU-Net routes (``-pretrained_weights`` and weights in the plans)."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from pumit_nnunet.checkpoints.format import VIT_ADAPTATION, CheckpointError, PretrainPlan, save_pumit_checkpoint
from pumit_nnunet.checkpoints.load import load_vit_weights
from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
from pumit_nnunet.models.segmentation import PumitSegNet
from pumit_nnunet.models.vit import UniversalViT, ViTConfig
from pumit_nnunet.nnunet import pretrained

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1))
TINY_VIT = ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden_dim=85, out_indices=(0, 1, 2, 3)).to_dict()
TINY_SEG = dict(input_channels=1, num_classes=2, patch_size=[8, 64, 64], aniso_d=2, vit=TINY_VIT,
                lateral_channels=(8, 8, 8, 8), fullres_channels=(4, 4))


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "pumit-small.ckpt"
    torch.save(released_pumit_checkpoint(randomise_(UniversalViT(replace(SMALL, mask_token=True))).state_dict()), path)
    return str(path)


def test_report_lists_every_key_and_is_printed(released):
    lines = []
    vit = UniversalViT(replace(SMALL, in_channels=1, patch_depth=4))
    report = load_vit_weights(vit, released, log=lines.append)
    assert report.complete and report.num_transferred == len(vit.state_dict())
    assert set(report.loaded) | set(report.converted) == set(vit.state_dict())
    assert set(report.converted) == {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert lines == [report.summary()] and "pumit-released" in lines[0] and "mim_head.0.weight" in lines[0]


def test_wrong_architecture_size_lists_what_does_not_match(released):
    narrow = UniversalViT(ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=85, out_indices=(0, 1)))
    with pytest.raises(CheckpointError) as error:
        load_vit_weights(narrow, released, log=None)
    message = str(error.value)
    assert "cls_token (checkpoint (1, 1, 64) vs model (1, 1, 32))" in message
    assert "checkpoint ViT: embed_dim 64, depth 2, mlp_hidden_dim 170; model ViT: embed_dim 32" in message
    shallow = UniversalViT(replace(SMALL, depth=1, out_indices=(0,)))
    with pytest.raises(CheckpointError, match=r"checkpoint keys the model does not have: blocks\.1\."):
        load_vit_weights(shallow, released, log=None)
    deep = UniversalViT(replace(SMALL, depth=3))
    with pytest.raises(CheckpointError, match=r"model keys missing from the checkpoint: blocks\.2\."):
        load_vit_weights(deep, released, log=None)


def test_allow_partial_loads_the_matching_part(released):
    deep = UniversalViT(replace(SMALL, depth=3))
    before = deep.blocks[2].mlp.w1.weight.detach().clone()
    report = load_vit_weights(deep, released, allow_partial=True, log=None)
    assert not report.complete and all(k.startswith("blocks.2.") for k in report.missing)
    source = torch.load(released, weights_only=True)["state_dict"]
    torch.testing.assert_close(deep.blocks[1].mlp.w1.weight.data, source["blocks.1.mlp.w1.weight"])
    torch.testing.assert_close(deep.blocks[2].mlp.w1.weight.data, before)


def test_recorded_heads_and_intensity_are_checked(tmp_path):
    path = tmp_path / "ours.pt"
    save_pumit_checkpoint(path, kind="vit", state_dict=UniversalViT(SMALL).state_dict(), architecture=SMALL.to_dict(),
                          pretrain_plan=PretrainPlan(3, "minus1-1"), adaptation=VIT_ADAPTATION)
    with pytest.raises(CheckpointError, match=r"config\.num_heads \(checkpoint 2 vs model 4\)"):
        load_vit_weights(UniversalViT(replace(SMALL, num_heads=4)), path, log=None)
    with pytest.raises(CheckpointError, match="minus1-1"):
        load_vit_weights(UniversalViT(SMALL), path, channel_mode="imagenet-fold", log=None)


def _results_checkpoint(path, network: torch.nn.Module) -> None:
    torch.save({"network_weights": network.state_dict(), "optimizer_state": {}, "current_epoch": 3,
                "init_args": {"configuration": "3d_fullres"}, "trainer_name": "PumitTrainer_T"}, path)


def test_pretrained_weights_route(tmp_path, released, monkeypatch):
    import nnunetv2.run.run_training as run_training

    calls = []
    monkeypatch.setattr(run_training, "load_pretrained_weights", lambda net, fname, verbose=False: calls.append(fname))
    pretrained.install_pretrained_weights_route()
    pretrained.install_pretrained_weights_route()  # idempotent: wrapped once
    route = run_training.load_pretrained_weights
    assert route._pumit_route and not getattr(route.__wrapped__, "_pumit_route", False)
    route(torch.nn.Linear(2, 2), "other.pth")
    assert calls == ["other.pth"]  # networks without a ViT backbone go to nnU-Net's loader

    torch.manual_seed(1)
    finetuned = randomise_(PumitSegNet(**TINY_SEG), seed=3)
    results = tmp_path / "checkpoint_final.pth"
    _results_checkpoint(results, finetuned)
    fresh = PumitSegNet(**TINY_SEG)
    report = pretrained.pumit_load_pretrained_weights(fresh, str(results), log=lambda s: None)
    assert report.complete and len(report.loaded) == len(fresh.state_dict())  # the whole network, strictly
    for key, value in finetuned.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)

    other = PumitSegNet(**{**TINY_SEG, "num_classes": 5})  # another task's decoder: only the backbone transfers
    report = pretrained.pumit_load_pretrained_weights(other, str(results), log=lambda s: None)
    assert report.complete and all(not k.startswith("decoder") for k in report.loaded)
    torch.testing.assert_close(other.backbone.pos_embed.data, finetuned.backbone.pos_embed.data)


def _fake_trainer(network, block, base):
    configuration = {"spacing": [3.0, 0.8, 0.8], **({"pumit_pretrained": block} if block else {})}
    return SimpleNamespace(network=network, configuration_name="3d_fullres", preprocessed_dataset_folder_base=str(base),
                           configuration_manager=SimpleNamespace(configuration=configuration),
                           print_to_log_file=lambda *a: None)


def test_load_pretrained_from_plans(tmp_path, released, monkeypatch):
    network = PumitSegNet(**{**TINY_SEG, "vit": replace(SMALL, out_indices=(0, 1, 1, 1)).to_dict()})
    assert pretrained.load_pretrained_from_plans(_fake_trainer(network, None, tmp_path)) is None
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.ckpt").write_bytes(open(released, "rb").read())
    monkeypatch.setenv("PUMIT_TEST_BASE", str(tmp_path))
    for path in ("weights/w.ckpt", "$PUMIT_TEST_BASE/weights/w.ckpt"):  # relative to the plans' folder, or env vars
        trainer = _fake_trainer(network, {"path": path, "allow_partial": False, "channel_mode": "sum"}, tmp_path)
        report = pretrained.load_pretrained_from_plans(trainer)
        assert report.complete and {"norm.weight", "mim_head.0.weight"} <= set(report.skipped)  # no final norm in seg
    missing = _fake_trainer(network, {"path": "nowhere.ckpt"}, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'3d_fullres' records pre-trained weights .*nowhere\.ckpt"):
        pretrained.load_pretrained_from_plans(missing)
    with pytest.raises(ValueError, match="channel_mode"):
        pretrained.load_pretrained_from_plans(_fake_trainer(network, {"path": released, "channel_mode": "x"}, tmp_path))


def test_record_pretrained_in_plans(tmp_path, released):
    plans_file = tmp_path / "nnUNetPlans.json"
    original = {"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {"patch_size": [8, 64, 64]}}}
    plans_file.write_text(json.dumps(original))
    backup = pretrained.record_pretrained_in_plans(str(plans_file), "3d_fullres", released, channel_mode="imagenet-fold")
    block = json.loads(plans_file.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["pumit_pretrained"]
    assert block == {"path": released, "allow_partial": False, "channel_mode": "imagenet-fold", "eva_cls_pos_index": 0}
    assert json.loads(backup.read_text(encoding="utf-8")) == original
    with pytest.raises(KeyError, match="2d"):
        pretrained.record_pretrained_in_plans(str(plans_file), "2d", released)
    with pytest.raises(ValueError, match="unknown"):
        pretrained.record_pretrained_in_plans(str(plans_file), "3d_fullres", released, strict=True)
    with pytest.raises(FileNotFoundError):
        pretrained.record_pretrained_in_plans(str(plans_file), "3d_fullres", str(tmp_path / "absent.ckpt"))
