"""Shared pre-training infrastructure: checkpoints, RNG state, precision switches, plots, collectives."""

from __future__ import annotations

import math
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pumit_nnunet.pretrain import distributed as D
from pumit_nnunet.pretrain.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint_atomic
from pumit_nnunet.pretrain.plots import plot_curves, plot_histogram, save_image_grid
from pumit_nnunet.pretrain.precision import autocast_context, make_grad_scaler


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_checkpoint_round_trip_is_weights_only_and_atomic(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state(), "step": 7,
             "history": {"l1": [[1, 0.5]]}, "name": "run"}
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint_atomic(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]  # no temp file left behind
    loaded = torch.load(path, weights_only=True)
    torch.testing.assert_close(loaded["model"]["weight"], model.weight.detach())
    assert load_checkpoint(path)["step"] == 7
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])  # optimiser state survives weights-only loading
    save_checkpoint_atomic(path, {"step": 8})  # replacing keeps exactly one file
    assert load_checkpoint(path)["step"] == 8


def test_load_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(missing)
    good = tmp_path / "good.pth"
    save_checkpoint_atomic(good, {"w": torch.ones(1000)})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated.pth"):
        load_checkpoint(truncated)


def test_rng_state_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    save_checkpoint_atomic(tmp_path / "rng.pth", {"rng": capture_rng_state()})
    expected = [_draws() for _ in range(3)]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    np.random.randn()  # leave a cached gaussian around: it must be replaced too
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert [_draws() for _ in range(3)] == expected


def test_precision_is_a_no_op_on_cpu():
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16", "fp16"):
        with autocast_context(cpu, precision):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert not make_grad_scaler(cpu, precision).is_enabled()
    with pytest.raises(ValueError, match="fp8"):
        autocast_context(cpu, "fp8")


def test_plots_write_pngs_atomically(tmp_path):
    history = {"train/l1": [(1, 0.5), (2, 0.4)], "val/psnr": [(2, 20.0)], "empty": []}
    plot_curves(history, tmp_path / "progress.png")
    grid = [[np.zeros((8, 8)), np.ones((8, 8))], [np.random.rand(8, 8) * 5, np.eye(8)]]
    save_image_grid(grid, tmp_path / "grid.png", row_titles=["a", "b"], col_titles=["in", "out"])
    plot_histogram(np.random.rand(100), tmp_path / "hist.png", "title", vlines={"log K": 0.5})
    plot_histogram(np.random.rand(16), tmp_path / "bars.png", "usage", as_bars=True)
    for name in ("progress.png", "grid.png", "hist.png", "bars.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "grid.png", "hist.png", "progress.png"]
    with pytest.raises(ValueError, match="2D"):
        save_image_grid([[np.zeros((2, 2, 2))]], tmp_path / "bad.png")


def test_single_process_collectives_are_identities():
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, D.is_main(info)) == (0, 1, True)
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    assert D.all_gather_mean_keep_grad(t) is t
    torch.testing.assert_close(D.all_reduce_mean(t), t.detach())
    assert D.gather_objects({"a": 1}) == [{"a": 1}] and D.broadcast_object(5) == 5
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model, info) is model
    D.barrier()
    D.cleanup_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = D.init_distributed("cpu")
    # rank r holds r + 1 items, all equal to (r + 1) * [1, 2]: the global mean is count-weighted
    local_items = torch.full((rank + 1, 2), float(rank + 1)) * torch.tensor([1.0, 2.0])
    param = torch.ones((), requires_grad=True)
    local_mean = (local_items * param).mean(0)
    mean = D.all_gather_mean_keep_grad(local_mean, count=rank + 1)
    mean.sum().backward()
    grad = param.grad.clone()
    dist.all_reduce(grad)
    reduced = D.all_reduce_mean(torch.tensor([float(rank)]))
    objects = D.gather_objects(rank * 10)
    if D.is_main(info):
        torch.save({"mean": mean.detach(), "grad_sum": grad / world, "reduced": reduced, "objects": objects}, out)
    D.cleanup_distributed()


@pytest.mark.distributed
def test_two_process_collectives(tmp_path):
    out = str(tmp_path / "result.pth")
    mp.start_processes(_collectives_worker, args=(2, free_port(), out), nprocs=2, join=True, start_method="spawn")
    result = torch.load(out, weights_only=True)
    items = torch.cat([torch.full((1, 2), 1.0), torch.full((2, 2), 2.0)]) * torch.tensor([1.0, 2.0])
    torch.testing.assert_close(result["mean"], items.mean(0))  # the mean over the global batch
    # DDP-averaged gradient of sum(global mean) w.r.t. a shared scale == the single-process gradient
    torch.testing.assert_close(result["grad_sum"], items.mean(0).sum())
    torch.testing.assert_close(result["reduced"], torch.tensor([0.5]))
    assert result["objects"] == [0, 10]


# --- optimiser groups -----------------------------------------------------------------------------------------
def _groups_by_name(model: torch.nn.Module, weight_decay: float = 0.05) -> tuple[set[str], set[str]]:
    from pumit_nnunet.optim import build_adamw

    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_adamw(model, lr=1e-4, weight_decay=weight_decay)
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt  # each parameter in one group
    return decayed, exempt


def _declared(model: torch.nn.Module) -> set[str]:
    """Reference: every ``no_weight_decay()`` name under its module's prefix, plus biases and 1-D parameters."""
    declared = {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
                if hasattr(m, "no_weight_decay") for n in m.no_weight_decay()}
    params = dict(model.named_parameters())
    return (declared & set(params)) | {n for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias")}


def test_tokenizer_codebook_is_not_weight_decayed():
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config

    model = UniversalTokenizer(tokenizer_config("tiny"))
    decayed, exempt = _groups_by_name(model)
    assert "quantize.embedding.weight" in exempt  # the codebook (the authors exclude embeddings)
    assert "quantize.proj.weight" in decayed and "encoder.0.weight" in decayed
    assert exempt == _declared(model)


@pytest.mark.parametrize("vit_size", ["T", "S"])
def test_vit_groups_come_from_no_weight_decay(vit_size):
    from pumit_nnunet.models.classifier import PumitClassifier, classifier_vit_config
    from pumit_nnunet.models.mim import ViTForMIM
    from pumit_nnunet.models.vit import vit_config

    mim = ViTForMIM(vit_config(vit_size, depth=2, out_indices=(0, 1)), codebook_size=16)
    decayed, exempt = _groups_by_name(mim)
    assert {"cls_token", "pos_embed", "mask_token"} <= exempt and exempt == _declared(mim)
    assert any(n.startswith("blocks.0.") and n.endswith(".weight") for n in decayed)
    # a wrapper declares nothing of its own: the ViT's names are found under its prefix
    classifier = PumitClassifier(classifier_vit_config(vit_size, depth=2, out_indices=(0, 1)), 3)
    decayed, exempt = _groups_by_name(classifier)
    assert {"vit.cls_token", "vit.pos_embed"} <= exempt and exempt == _declared(classifier)
    assert "head.weight" in decayed


def test_an_embedding_without_a_declaration_is_still_exempt():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.Linear(3, 2))
    decayed, exempt = _groups_by_name(model)
    assert decayed == {"1.weight"} and exempt == {"0.weight", "1.bias"}


def test_history_with_non_finite_values_is_strict_json(tmp_path):
    import json

    from pumit_nnunet.io import null_to_nonfinite
    from pumit_nnunet.pretrain.config import MIMTrainConfig
    from pumit_nnunet.pretrain.run import HISTORY, write_run_files

    history = {"train/loss": [(1, 0.5), (2, float("nan")), (3, float("inf"))], "val/psnr": [(2, 20.0)]}
    write_run_files(tmp_path, MIMTrainConfig(data="d", out=str(tmp_path), tokenizer="t"), history)

    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    written = json.loads((tmp_path / HISTORY).read_text(encoding="utf-8"), parse_constant=refuse)
    back = null_to_nonfinite(written)
    assert [p["value"] for p in back["train/loss"]][0::2] == [0.5, float("inf")]
    assert math.isnan(back["train/loss"][1]["value"]) and back["val/psnr"] == [{"step": 2, "value": 20.0}]
