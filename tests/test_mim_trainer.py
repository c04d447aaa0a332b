"""MIM trainer on real demo data: frozen tokenizer, loss falls, exact resume, checkpoint format, 2-process gloo."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint, save_pumit_checkpoint
from pumit_nnunet.pretrain.distributed import DistInfo
from pumit_nnunet.pretrain.mim_trainer import (PUMIT_FINAL, TRAIN_STATE, MIMTrainConfig, MIMTrainer,
                                               load_frozen_tokenizer)

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(mim_store) -> Path:
    return mim_store


@pytest.fixture
def tokenizer_ckpt(mim_tokenizer_ckpt) -> Path:
    return mim_tokenizer_ckpt


def _config(store: Path, tokenizer: Path, out: Path, **overrides) -> MIMTrainConfig:
    base = MIMTrainConfig(data=str(store), out=str(out), tokenizer=str(tokenizer), vit="T", steps=4, warmup_steps=1,
                          lr=1e-3, batch_size=2, crop_depth_tokens=2, crop_inplane_tokens=4, precision="fp32",
                          device="cpu", seed=3, log_every=2, ckpt_every=2, image_every=2)
    return replace(base, **overrides)


def test_tokenizer_frozen_gradients_reach_vit_and_head(store, tokenizer_ckpt, tmp_path):
    trainer = MIMTrainer(_config(store, tokenizer_ckpt, tmp_path), CPU)
    before = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    batch = next(iter(trainer.loader))
    trainer.train_step(batch.image, batch.aniso_d)
    assert not trainer.tokenizer.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.tokenizer.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.tokenizer.state_dict().items())
    no_grad = [n for n, p in trainer.model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert any(n.startswith("mim_head.") for n, _ in trainer.model.named_parameters())


def test_loss_falls_on_a_real_data_overfit(store, tokenizer_ckpt, tmp_path):
    trainer = MIMTrainer(_config(store, tokenizer_ckpt, tmp_path, steps=25, warmup_steps=0, augment=False), CPU)
    batch = next(iter(trainer.loader))
    kl = [trainer.train_step(batch.image, batch.aniso_d).metrics["kl"] for _ in range(25)]
    assert sum(kl[-5:]) / 5 < 0.7 * sum(kl[:3]) / 3, kl


def test_resume_equals_uninterrupted(store, tokenizer_ckpt, tmp_path):
    whole = MIMTrainer(_config(store, tokenizer_ckpt, tmp_path / "whole"), CPU)
    final = whole.fit()
    first = MIMTrainer(_config(store, tokenizer_ckpt, tmp_path / "split"), CPU)
    first.fit(until=2)
    assert not (tmp_path / "split" / PUMIT_FINAL).exists()
    second = MIMTrainer(_config(store, tokenizer_ckpt, tmp_path / "split"), CPU)
    assert second.resume() and second.step == 2
    second.fit()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert whole.history == second.history
    assert torch.equal(whole.mask_generator.get_state(), second.mask_generator.get_state())

    checkpoint = load_pumit_checkpoint(final)
    assert checkpoint.kind == "mim" and checkpoint.pretrain_plan.intensity == "unit-range-imagenet"
    assert set(checkpoint.state_dict) == set(whole.model.state_dict())
    assert checkpoint.architecture["mask_token"] is True and checkpoint.extra["codebook_size"] == 64
    for name in ("progress.png", TRAIN_STATE, "pictures/step_0000002.png", "pictures/step_0000004.png"):
        assert (tmp_path / "whole" / name).is_file(), name


def _initialised(config: MIMTrainConfig) -> MIMTrainer:
    from pumit_nnunet.pretrain.run import resume_or_init

    trainer = MIMTrainer(config, CPU)
    resume_or_init(trainer, None)
    return trainer


def test_init_from_released_pumit_and_eva02_files(store, tokenizer_ckpt, tmp_path):
    from pumit_nnunet.checkpoints import CheckpointError
    from pumit_nnunet.checkpoints.samples import eva02_original_checkpoint, randomise_, released_pumit_checkpoint
    from pumit_nnunet.models.vit import UniversalViT, vit_config

    vit = randomise_(UniversalViT(vit_config("T", mask_token=True)), seed=5).state_dict()
    released = released_pumit_checkpoint(vit, codebook_size=64)
    torch.save(released, tmp_path / "pumit-t.ckpt")
    model = _initialised(_config(store, tokenizer_ckpt, tmp_path, init=str(tmp_path / "pumit-t.ckpt"))).model
    for name, value in released["state_dict"].items():  # ViT, mask token and the matching MIM head
        assert torch.equal(model.state_dict()[name], value), name

    torch.save(eva02_original_checkpoint(vit), tmp_path / "eva02.pt")
    model = _initialised(_config(store, tokenizer_ckpt, tmp_path, init=str(tmp_path / "eva02.pt"))).model
    assert torch.equal(model.state_dict()["blocks.3.mlp.w3.weight"], vit["blocks.3.mlp.w3.weight"])

    other = UniversalViT(vit_config("T", embed_dim=64, num_heads=1, mlp_hidden_dim=170)).state_dict()
    torch.save(released_pumit_checkpoint(other, 64), tmp_path / "small.ckpt")
    with pytest.raises(CheckpointError, match=r"small\.ckpt: the --init weights do not fit the MIM ViT"):
        _initialised(_config(store, tokenizer_ckpt, tmp_path, init=str(tmp_path / "small.ckpt")))


def test_tokenizer_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    path = tmp_path / "vit.pth"
    save_pumit_checkpoint(path, kind="vit", state_dict={}, architecture={})
    with pytest.raises(ValueError, match="expected a tokenizer checkpoint"):
        load_frozen_tokenizer(path, torch.device("cpu"))
    with pytest.raises((FileNotFoundError, ValueError), match="absent.pth"):
        load_frozen_tokenizer(tmp_path / "absent.pth", torch.device("cpu"))


def _train_steps(config: MIMTrainConfig, info: DistInfo, batch: torch.Tensor, aniso_d: int, steps: int) -> dict:
    trainer = MIMTrainer(config, info, loader=[])
    share = batch.shape[0] // info.world_size
    mine = batch[info.rank * share:(info.rank + 1) * share]
    losses = [trainer.train_step(mine, aniso_d).metrics["loss"] for _ in range(steps)]
    return {"model": trainer.model.state_dict(), "losses": losses}


def _gloo_worker(rank: int, port: int, config: MIMTrainConfig, batch, aniso_d: int, out: str) -> None:
    from pumit_nnunet.pretrain.distributed import cleanup_distributed, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        result = _train_steps(config, info, batch, aniso_d, steps=3)
        if rank == 0:
            torch.save(result, out)
    finally:
        cleanup_distributed()


@pytest.mark.distributed
def test_two_gloo_processes_agree_with_one_on_the_same_global_batch(store, tokenizer_ckpt, tmp_path, free_port):
    config = _config(store, tokenizer_ckpt, tmp_path, augment=False)
    batch = next(iter(MIMTrainer(replace(config, batch_size=4), CPU).loader))
    out = tmp_path / "ddp.pt"
    mp.start_processes(_gloo_worker, args=(free_port, config, batch.image, batch.aniso_d, str(out)), nprocs=2,
                       start_method="spawn")
    ddp = torch.load(out, weights_only=True)
    single = _train_steps(config, CPU, batch.image, batch.aniso_d, steps=3)
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(single["losses"]), atol=1e-5, rtol=1e-5)
    for name, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, atol=1e-5, rtol=1e-4, msg=name)
