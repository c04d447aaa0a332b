"""Tokenizer training on real demo data: overfitting, exact resume, 2-process DDP agreement, the console command."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
from pumit_nnunet.checkpoints.tokenizer import load_tokenizer
from pumit_nnunet.errors import UsageError
from pumit_nnunet.pretrain import distributed as D
from pumit_nnunet.pretrain.checkpoint import load_checkpoint
from pumit_nnunet.pretrain.run import TRAIN_STATE, preflight
from pumit_nnunet.pretrain.tokenizer_trainer import FINAL, LATEST, TokenizerTrainConfig, TokenizerTrainer, prepare_run

DATASET = "Dataset904_RealCTChestTissue"  # 1.14 x 1.14 x 5 mm: aniso_d 2


@pytest.fixture(scope="module")
def raw_dataset(real_demo_dir, tmp_path_factory):
    """A writable copy of the real chest CT tissue dataset (nnU-Net raw layout)."""
    target = tmp_path_factory.mktemp("raw") / DATASET
    shutil.copytree(real_demo_dir / DATASET, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@pytest.fixture(scope="module")
def store(raw_dataset, tmp_path_factory):
    from pumit_nnunet.corpus.api import ensure_store

    return ensure_store(raw_dataset, tmp_path_factory.mktemp("work"))


def tiny_config(tmp_path, **overrides) -> TokenizerTrainConfig:
    values = dict(data="unused", out=str(tmp_path / "run"), preset="tiny", steps=4, batch_size=1, crop_depth_tokens=1,
                  crop_inplane_tokens=2, precision="fp32", device="cpu", perceptual=False, warmup_steps=1, lr=3e-3,
                  log_every=1, val_every=1000, ckpt_every=1000, seed=7)
    values.update(overrides)
    return TokenizerTrainConfig(**values)


def _loader(store, cfg, augment=True):
    from pumit_nnunet.corpus.loader import CropGrid, build_pretrain_loader

    crop = CropGrid(cfg.crop_depth_tokens, cfg.crop_inplane_tokens)
    return build_pretrain_loader(store, cfg.batch_size, crop, seed=cfg.seed, augment=augment)


def test_small_tokenizer_overfits_real_crops(store, tmp_path):
    torch.set_num_threads(2)
    cfg = tiny_config(tmp_path, batch_size=2, steps=100, warmup_steps=0, quant_weight=0.03, entropy_weight=0.01)
    batch = next(iter(_loader(store, cfg, augment=False)))
    assert batch.image.shape == (2, 1, 4, 32, 32) and batch.aniso_d == 2
    trainer = TokenizerTrainer(cfg, D.init_distributed("cpu"))
    losses = [trainer.train_step(batch.image, batch.aniso_d)["l1"] for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0], losses


def _fit(cfg, store, val_images=None, resume=False):
    from pumit_nnunet.pretrain.run import fit

    info = D.init_distributed("cpu")
    trainer = prepare_run(cfg, info, _loader(store, cfg), val_images, preflight(cfg, info, resume))
    fit(trainer)
    return trainer


def test_resume_is_exact(store, tmp_path, lpips_files):
    vgg, lin = lpips_files
    common = dict(perceptual=True, vgg16=str(vgg), lpips_lin=str(lin), max_perceptual_slices=4, val_every=2)
    first = next(iter(_loader(store, tiny_config(tmp_path))))
    val_images = [(first.keys[0], "CT", first.image[0], first.aniso_d)]
    straight = _fit(tiny_config(tmp_path / "a", **common), store, val_images)
    _fit(tiny_config(tmp_path / "b", stop_at=2, **common), store, val_images)
    run_b = tmp_path / "b" / "run"
    assert (run_b / TRAIN_STATE).exists() and (run_b / LATEST).exists() and not (run_b / FINAL).exists()
    with pytest.raises(UsageError, match="--resume"):
        preflight(tiny_config(tmp_path / "b", **common), D.init_distributed("cpu"), resume=False)
    resumed = _fit(tiny_config(tmp_path / "b", **common), store, val_images, resume=True)
    assert resumed.step == straight.step == 4 and len(resumed.step_log) == 2
    assert resumed.step_log == straight.step_log[2:]  # identical losses, bit for bit
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.disc.state_dict().values(), resumed.disc.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history == straight.history
    for name in ("progress.png", "reconstructions.png", "codebook_usage.png", "sharpness.png", FINAL, "history.json"):
        assert (run_b / name).is_file(), name


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _run_steps(folder, D.init_distributed("cpu"))
    D.cleanup_distributed()


def _run_steps(folder: str, info: D.DistInfo) -> None:
    """Two steps on this rank's share of the saved global batch; rank 0 saves losses and weights."""
    data = torch.load(Path(folder) / "batch.pth", weights_only=True)
    cfg = tiny_config(Path(folder) / f"w{info.world_size}", gan_threshold=10.0)  # gate always open: covers the GAN term
    trainer = TokenizerTrainer(cfg, info)
    for group in trainer.opt_g.param_groups + trainer.opt_d.param_groups:
        # Adam divides by |gradient|: with the default eps, elements whose gradient is float noise (e.g. conv biases
        # right before a GroupNorm, zero in theory) would take random +-lr steps; a larger eps keeps them still
        group["eps"] = 1e-4
    share = data["image"].chunk(info.world_size)[info.rank]
    log = [trainer.train_step(share, int(data["aniso_d"])) for _ in range(2)]
    if D.is_main(info):
        moments = [s["exp_avg"] for opt in (trainer.opt_g, trainer.opt_d) for s in opt.state_dict()["state"].values()]
        torch.save({"log": log, "model": trainer.model.state_dict(), "disc": trainer.disc.state_dict(),
                    "moments": moments, "lr": cfg.lr}, Path(folder) / f"result{info.world_size}.pth")


@pytest.mark.distributed
def test_two_processes_agree_with_one(store, tmp_path, free_port):
    batch = next(iter(_loader(store, tiny_config(tmp_path, batch_size=2), augment=False)))
    torch.save({"image": batch.image, "aniso_d": batch.aniso_d}, tmp_path / "batch.pth")
    mp.start_processes(_ddp_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    _run_steps(str(tmp_path), D.init_distributed("cpu"))
    one, two = (torch.load(tmp_path / f"result{n}.pth", weights_only=True) for n in (1, 2))
    assert all(step["gan_on"] == 1.0 for step in one["log"] + two["log"])
    for a, b in zip(one["log"], two["log"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # Adam's first moments are (mixtures of) the gradients: the DDP gradients equal the global-batch ones
    # (biases right before a GroupNorm have a zero gradient in theory, float noise in practice: absolute tolerance
    # relative to the largest moment)
    scale = max(float(a.abs().max()) for a in one["moments"])
    for a, b in zip(one["moments"], two["moments"]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * scale)
    for name, value in list(one["model"].items()) + list(one["disc"].items()):
        other = two["model"].get(name, two["disc"].get(name))
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-3 * one["lr"], msg=lambda m: f"{name}: {m}")


def _parser() -> argparse.ArgumentParser:
    from pumit_nnunet.pretrain.cli import register

    parser = argparse.ArgumentParser(prog="pumit-nnunet")
    register(parser.add_subparsers(dest="command"))
    return parser


def _main(argv: list[str]) -> int:
    """``pumit_nnunet.cli.main`` when the whole command builds (other areas may still be missing)."""
    try:
        from pumit_nnunet.cli import build_parser

        build_parser()
    except ModuleNotFoundError:
        args = _parser().parse_args(argv)
        return args.func(args)
    from pumit_nnunet.cli import main

    return main(argv)


def test_command_trains_from_a_raw_dataset_and_resumes(raw_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "tokenizer", "--data", str(raw_dataset), "--out", str(out), "--preset", "tiny",
            "--steps", "2", "--batch-size", "1", "--crop-depth-tokens", "1", "--crop-inplane-tokens", "2",
            "--no-perceptual", "--device", "cpu", "--precision", "fp32", "--warmup-steps", "1", "--val-every", "1"]
    assert _main(argv) == 0
    final = load_pumit_checkpoint(out / FINAL)  # the artefact is our checkpoint format, kind "tokenizer"
    assert final.kind == "tokenizer" and final.extra["step"] == 2 and final.architecture["num_embeddings"] == 64
    assert final.extra["train_config"]["preset"] == "tiny" and len(final.extra["discriminator"]) > 0
    tokenizer = load_tokenizer(out / FINAL)
    assert not any(p.requires_grad for p in tokenizer.parameters())
    assert tokenizer.encode(torch.zeros(1, 3, 16, 32, 32), 0).shape == (1, 64, 1, 2, 2)
    capsys.readouterr()
    assert _main(argv) == 2  # refuses to start over a run
    assert "--resume" in capsys.readouterr().err
    # the old flag name --config still works (hidden alias); a different preset is refused, naming the field
    assert _main([a if a != "--preset" else "--config" for a in argv[:-2]] + ["--lr", "5e-4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (the corpus progress bar may precede it)
    assert "lr 0.0001 -> 0.0005" in err and err.startswith("pumit-nnunet pretrain tokenizer: error:")
    steps_at = argv.index("--steps") + 1
    assert _main(argv[:steps_at] + ["3"] + argv[steps_at + 1:] + ["--resume"]) == 0  # --steps may change
    assert load_checkpoint(out / TRAIN_STATE)["step"] == 3


def test_resume_without_a_checkpoint_says_it_starts_fresh(raw_dataset, tmp_path, capsys):
    out = tmp_path / "fresh"
    argv = ["pretrain", "tokenizer", "--data", str(raw_dataset), "--out", str(out), "--preset", "tiny", "--steps", "3",
            "--stop-at", "1", "--batch-size", "1", "--crop-depth-tokens", "1", "--crop-inplane-tokens", "2",
            "--no-perceptual", "--device", "cpu", "--precision", "fp32", "--warmup-steps", "1", "--resume"]
    assert _main(argv) == 0
    captured = capsys.readouterr()
    assert "STARTING A NEW RUN" in captured.err and "--stop-at" in captured.out
    assert load_checkpoint(out / TRAIN_STATE)["step"] == 1 and not (out / FINAL).exists()


def test_help_lists_torchrun_lines():
    help_text = _parser().format_help()
    assert "pretrain" in help_text
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["pretrain", "tokenizer", "--help"])
    assert exit_info.value.code == 0


def test_console_script_help():
    exe = shutil.which("pumit-nnunet")
    assert exe, "the pumit-nnunet console script is not installed (pip install -e .)"
    result = subprocess.run([exe, "pretrain", "tokenizer", "--help"], capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torchrun" in result.stdout and "--resume" in result.stdout
