"""nnU-Net's CUDA default wraps the network in ``torch.compile`` (and DDP on several GPUs): every route in and out of
the weights must see the plain module. In-process, without compiling (``torch.compile`` is lazy); the compiled
trainer end to end is in test_compile_e2e.py."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pumit_nnunet.checkpoints.load import unwrap_network
from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
from pumit_nnunet.models.segmentation import PumitSegNet
from pumit_nnunet.models.vit import UniversalViT, ViTConfig
from pumit_nnunet.nnunet import pretrained
from pumit_nnunet.nnunet.checkpointing import read_results_checkpoint, restore_results_checkpoint, results_checkpoint
from test_safety_checkpoints import _fake_trainer

TINY_VIT = ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden_dim=85, out_indices=(0, 1, 2, 3))
TINY_SEG = dict(input_channels=1, num_classes=2, patch_size=[8, 64, 64], aniso_d=2, vit=TINY_VIT.to_dict(),
                lateral_channels=(8, 8, 8, 8), fullres_channels=(4, 4))


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, so that real ``DistributedDataParallel`` wrappers can be built on the CPU."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _compile(module: nn.Module) -> nn.Module:
    return torch.compile(module)  # an OptimizedModule; nothing is traced until it is called


def _ddp(module: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module)


def _dp(module: nn.Module) -> nn.Module:
    return nn.DataParallel(module)


#: nnU-Net compiles first and wraps DDP around that; the other orders are what users' own code may do
WRAPPINGS = {
    "plain": (), "compiled": (_compile,), "ddp": (_ddp,), "ddp(compiled)": (_compile, _ddp),
    "compiled(ddp)": (_ddp, _compile), "compiled(ddp(compiled))": (_compile, _ddp, _compile), "dp": (_dp,),
    "dp(compiled)": (_compile, _dp),
}


def _wrap(module: nn.Module, wrapping: str) -> nn.Module:
    for wrapper in WRAPPINGS[wrapping]:
        module = wrapper(module)
    return module


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_unwrap_network_every_wrapper_combination(process_group, wrapping):
    network = nn.Sequential(nn.Linear(4, 3))
    wrapped = _wrap(network, wrapping)
    assert unwrap_network(wrapped) is network
    assert (wrapped is network) == (wrapping == "plain")


@pytest.mark.parametrize("wrapping", ["compiled", "ddp(compiled)", "compiled(ddp)"])
def test_results_checkpoint_of_a_wrapped_network_has_plain_names(process_group, tmp_path, wrapping):
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    trainer = _fake_trainer(network)  # one eager step, so that the optimiser has state to save
    trainer.network = _wrap(network, wrapping)
    assert any(k.startswith(("_orig_mod.", "module.")) for k in trainer.network.state_dict())  # what we avoid
    path = tmp_path / "fold_0" / "checkpoint_final.pth"
    path.parent.mkdir()
    torch.save(results_checkpoint(trainer), path)
    checkpoint = read_results_checkpoint(path)  # weights-only, finite
    assert list(checkpoint["network_weights"]) == list(network.state_dict())  # "0.weight" ..., as nnU-Net saves
    other = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh = _fake_trainer(other)
    fresh.network = _wrap(other, wrapping)  # --c / --val into a compiled (DDP) network
    restore_results_checkpoint(fresh, checkpoint)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value, rtol=0, atol=0)


def test_stock_checkpoint_with_wrapper_prefixes_loads_into_a_compiled_network(tmp_path):
    """A checkpoint saved without unwrapping (``module._orig_mod.`` names) still loads, as a whole network."""
    source = randomise_(PumitSegNet(**TINY_SEG), seed=5)
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}}, path)
    target = PumitSegNet(**TINY_SEG)
    report = pretrained.pumit_load_pretrained_weights(_compile(target), str(path), log=lambda _: None)
    assert report.complete and len(report.loaded) == len(source.state_dict())
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A released-format (Lightning ViTForMIM) checkpoint of the tiny ViT."""
    path = tmp_path_factory.mktemp("released") / "pumit-tiny.ckpt"
    vit = randomise_(UniversalViT(replace(TINY_VIT, mask_token=True)), seed=2)
    torch.save(released_pumit_checkpoint(vit.state_dict()), path)
    return path, vit


@pytest.mark.parametrize("wrapping", ["compiled", "ddp(compiled)", "compiled(ddp)"])
def test_pretrained_weights_reach_the_backbone_of_a_wrapped_network(process_group, released, monkeypatch, wrapping):
    """``-pretrained_weights`` (nnU-Net calls it after ``initialize()`` compiled and wrapped the network) and the
    weights recorded in the plans (loaded in ``on_train_start``) both land in the plain module's backbone."""
    import nnunetv2.run.run_training as run_training

    path, vit = released
    monkeypatch.setattr(run_training, "load_pretrained_weights", lambda *a, **k: pytest.fail("nnU-Net's loader used"))
    pretrained.install_pretrained_weights_route()
    for route in ("-pretrained_weights", "plans"):
        network = PumitSegNet(**TINY_SEG)
        wrapped = _wrap(network, wrapping)
        if route == "-pretrained_weights":
            run_training.load_pretrained_weights(wrapped, str(path), verbose=False)
            assert getattr(network, pretrained.WEIGHTS_LOADED_FLAG)  # the plans' weights are then not loaded on top
        else:
            configuration = {"pumit_pretrained": {"path": path.name}}  # relative to the plans' folder
            trainer = SimpleNamespace(network=wrapped, configuration_name="3d_fullres", print_to_log_file=print,
                                      preprocessed_dataset_folder_base=str(path.parent),
                                      configuration_manager=SimpleNamespace(configuration=configuration))
            assert pretrained.load_pretrained_from_plans(trainer).complete
        for key in ("cls_token", "blocks.0.attn.q_proj.weight", "blocks.3.mlp.w2.weight"):  # unchanged by conversion
            torch.testing.assert_close(network.backbone.state_dict()[key], vit.state_dict()[key], rtol=0, atol=0)

