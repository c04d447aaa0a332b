"""Training loop of the universal visual tokenizer: generator and discriminator steps, checkpoints, exact resume.

Launch through ``pumit-nnunet pretrain tokenizer`` (see its ``--help`` for the ``torchrun`` lines of single- and
multi-node DDP). Exact resume: every checkpoint holds both models, both optimisers, schedules and scalers, the GAN
gate, every rank's RNG and loader state, and the step; the per-step randomness of the loss (LPIPS slice choice)
comes from a generator seeded by ``(seed, rank, step)``, so N steps + resume + M steps equals N + M steps.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import torch

from pumit_nnunet import __version__
from pumit_nnunet.layers.lpips import LPIPS
from pumit_nnunet.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from pumit_nnunet.models.tokenizer import TokenizerConfig, UniversalTokenizer, tokenizer_config, tokenizer_input
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw
from pumit_nnunet.pretrain import distributed as D
from pumit_nnunet.pretrain.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint_atomic
from pumit_nnunet.pretrain.losses_tokenizer import GanGate, TokenizerLossWeights, generator_loss, hinge_discriminator_loss
from pumit_nnunet.pretrain.plots import plot_curves
from pumit_nnunet.pretrain.precision import autocast_context, make_grad_scaler
from pumit_nnunet.pretrain.tokenizer_validation import validate_tokenizer, write_validation_figures

__all__ = ["TokenizerTrainConfig", "TokenizerTrainer", "load_tokenizer", "run_from_args", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "pumit-nnunet/tokenizer/1"
LATEST, FINAL = "checkpoint_latest.pth", "checkpoint_final.pth"


@dataclass
class TokenizerTrainConfig:
    """Everything a tokenizer run needs; the CLI fills it and every checkpoint records it."""

    data: str
    out: str
    preset: str = "base"
    codebook_size: int | None = None
    steps: int = 500_000
    batch_size: int = 4
    crop_depth_tokens: int = 4
    crop_inplane_tokens: int = 8
    precision: str = "bf16"
    device: str | None = None
    vgg16: str | None = None
    lpips_lin: str | None = None
    perceptual: bool = True
    lr: float = 1e-4
    lr_disc: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 25_000
    min_lr_ratio: float = 0.01
    quant_weight: float = 0.03
    entropy_weight: float = 1.0
    perceptual_weight: float = 2.0  # the original's weight 1 on its LPIPS x 2
    gan_weight: float = 3e-3
    gan_threshold: float = 0.025
    max_perceptual_slices: int = 24
    seed: int = 2333
    num_workers: int = 0
    val_every: int = 1000
    ckpt_every: int = 1000
    log_every: int = 50
    max_val_images: int = 8
    init: str | None = None
    resume: bool = False
    stop_at: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TokenizerTrainConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["preset"], values["perceptual"] = args.config, not args.no_perceptual
        return cls(**values)

    def model_config(self) -> TokenizerConfig:
        return tokenizer_config(self.preset, num_embeddings=self.codebook_size)

    def loss_weights(self) -> TokenizerLossWeights:
        return TokenizerLossWeights(self.perceptual_weight, self.quant_weight, self.entropy_weight, self.gan_weight,
                                    self.gan_threshold, self.max_perceptual_slices)


def load_tokenizer(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> UniversalTokenizer:
    """A frozen, eval-mode tokenizer from one of our tokenizer checkpoints (architecture from its ``config``)."""
    state = load_checkpoint(path, map_location)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not a tokenizer checkpoint of this package (needs 'config' and 'model')")
    model = UniversalTokenizer(TokenizerConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model.requires_grad_(False).eval()


def _lpips(cfg: TokenizerTrainConfig) -> LPIPS | None:
    if not cfg.perceptual or cfg.perceptual_weight == 0:
        return None
    if not cfg.vgg16 or not cfg.lpips_lin:
        raise ValueError("the perceptual loss needs --vgg16 (torchvision vgg16-397923af.pth) and --lpips-lin "
                         "(lpips weights/v0.1/vgg.pth); pass both, or --no-perceptual")
    return LPIPS(cfg.vgg16, cfg.lpips_lin)


class TokenizerTrainer:
    """Holds the models, optimisers and state of one tokenizer run on one rank.

    Args:
        cfg: the run configuration.
        info: this process's place in the process group (:func:`~pumit_nnunet.pretrain.distributed.init_distributed`).
        loader: iterable of ``PretrainBatch`` with ``state_dict``/``load_state_dict`` (this rank's share).
        val_images: held-out images (``load_validation_images`` output); used on rank 0 only.
    """

    def __init__(self, cfg: TokenizerTrainConfig, info: D.DistInfo, loader: Iterable | None = None,
                 val_images: list | None = None) -> None:
        self.cfg, self.info, self.loader, self.val_images = cfg, info, loader, val_images or []
        self.out = Path(cfg.out)
        self.device = info.device
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = UniversalTokenizer(cfg.model_config()).to(self.device)
        disc_channels = self.model.config.down_channels
        self.disc = PatchDiscriminator(DiscriminatorConfig(layer_channels=disc_channels)).to(self.device)
        self.lpips = _lpips(cfg)
        if self.lpips is not None:
            self.lpips.to(self.device)
        self.weights = cfg.loss_weights()
        self.opt_g = build_adamw(self.model, cfg.lr, cfg.weight_decay)
        self.opt_d = build_adamw(self.disc, cfg.lr_disc, cfg.weight_decay)
        self.sched_g = WarmupDecaySchedule(self.opt_g, cfg.warmup_steps, cfg.steps, "cosine", cfg.min_lr_ratio)
        self.sched_d = WarmupDecaySchedule(self.opt_d, cfg.warmup_steps, cfg.steps, "cosine", cfg.min_lr_ratio)
        self.scaler_g = make_grad_scaler(self.device, cfg.precision)
        self.scaler_d = make_grad_scaler(self.device, cfg.precision)
        self.gate = GanGate(cfg.gan_threshold)
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.step_log: list[dict[str, float]] = []  # this process's per-step terms (tests, debugging)
        self._window: list[dict[str, float]] = []
        self.ddp_model = D.wrap_ddp(self.model, info)
        self.ddp_disc = D.wrap_ddp(self.disc, info)

    # ----------------------------------------------------------------------------------------------- one step
    def _step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.seed, self.info.rank, self.step)) & 0x7FFF_FFFF_FFFF)

    def _backward_step(self, loss, optimizer, scaler, schedule) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()

    def train_step(self, image: torch.Tensor, aniso_d: int) -> dict[str, float]:
        """One generator and one discriminator update on this rank's part ``image`` (in [0, 1]) of the global batch."""
        x = tokenizer_input(image.to(self.device, non_blocking=True).float())
        gan_on = self.gate.is_open
        with autocast_context(self.device, self.cfg.precision):
            out = self.ddp_model(x, aniso_d)
            fake_logits = None
            if gan_on:  # the raw discriminator, frozen: the generator's GAN gradient reaches the reconstruction only
                self.disc.requires_grad_(False)
                fake_logits = self.disc(out.reconstruction, aniso_d)
            loss, terms = generator_loss(x, out, self.weights, self.lpips, fake_logits, generator=self._step_generator())
        self.disc.requires_grad_(True)
        self._backward_step(loss, self.opt_g, self.scaler_g, self.sched_g)
        with autocast_context(self.device, self.cfg.precision):
            # one forward for real and fake: DDP expects a single forward per backward (GroupNorm is per sample)
            logits = self.ddp_disc(torch.cat([x, out.reconstruction.detach()]), aniso_d)
            d_loss = hinge_discriminator_loss(*logits.chunk(2))
        self._backward_step(d_loss, self.opt_d, self.scaler_d, self.sched_d)
        terms["d_loss"] = d_loss.detach()
        names = sorted(terms)
        reduced = D.all_reduce_mean(torch.stack([terms[k].float() for k in names])).tolist()
        result = dict(zip(names, reduced))
        self.gate.update(result["d_loss"])
        result.update(gan_on=float(gan_on), lr=self.opt_g.param_groups[0]["lr"])
        self.step += 1
        return result

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The checkpoint of rank 0; call on every rank (it gathers every rank's RNG and loader state)."""
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        per_rank = D.gather_objects({"rng": capture_rng_state(), "loader": loader_state})
        return {
            "format": CHECKPOINT_FORMAT, "package_version": __version__, "step": self.step,
            "config": self.model.config.to_dict(), "discriminator_config": self.disc.config.to_dict(),
            "train_config": asdict(self.cfg), "model": self.model.state_dict(), "discriminator": self.disc.state_dict(),
            "optimizer_g": self.opt_g.state_dict(), "optimizer_d": self.opt_d.state_dict(),
            "scheduler_g": self.sched_g.state_dict(), "scheduler_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "gate": self.gate.state_dict(), "world_size": self.info.world_size,
            "rng": [r["rng"] for r in per_rank], "loader": [r["loader"] for r in per_rank],
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint written by :meth:`state_dict` (same world size for the loader and RNG streams)."""
        if state.get("world_size", 1) != self.info.world_size:
            raise ValueError(f"checkpoint was written by {state.get('world_size')} processes, this run has "
                             f"{self.info.world_size}: exact resume needs the same number")
        if state["config"] != self.model.config.to_dict():
            raise ValueError(f"the checkpoint's tokenizer config {state['config']} differs from this run's "
                             f"{self.model.config.to_dict()}: resume with the same --config/--codebook-size")
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        for name in ("opt_g", "opt_d", "sched_g", "sched_d", "scaler_g", "scaler_d"):
            key = name.replace("opt_", "optimizer_").replace("sched_", "scheduler_")
            getattr(self, name).load_state_dict(state[key])
        self.gate.load_state_dict(state["gate"])
        self.step = int(state["step"])
        self.history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}
        restore_rng_state(state["rng"][self.info.rank])
        if state["loader"][self.info.rank] is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(state["loader"][self.info.rank])

    def save(self, name: str = LATEST) -> None:
        state = self.state_dict()  # collective: every rank
        if D.is_main(self.info):
            save_checkpoint_atomic(self.out / name, state)
            _write_json_atomic(self.out / "history.json", state["history"])
        D.barrier()

    def init_weights_from(self, path: str | os.PathLike) -> None:
        """Start from another run's weights (e.g. the sharpening stage): model and, if present, discriminator."""
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        if "discriminator" in state:
            self.disc.load_state_dict(state["discriminator"])

    # ------------------------------------------------------------------------------------------------- loop
    def _log(self, terms: dict[str, float]) -> None:
        self.step_log.append(terms)
        self._window.append(terms)
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            for key in self._window[0]:
                value = sum(t[key] for t in self._window) / len(self._window)
                self.history.setdefault(f"train/{key}", []).append((self.step, value))
            self._window.clear()

    def validate(self) -> None:
        """Validation metrics into the history and every figure into ``out`` (rank 0; the others wait)."""
        if D.is_main(self.info):
            if self.val_images:
                result = validate_tokenizer(self.model, self.val_images, self.device, self.cfg.precision)
                for key in ("l1", "psnr", "kl_uniform"):
                    self.history.setdefault(f"val/{key}", []).append((self.step, getattr(result, key)))
                write_validation_figures(result, self.out)
            plot_curves(self.history, self.out / "progress.png", title=f"tokenizer, step {self.step}")
        D.barrier()

    def fit(self) -> None:
        """Train until ``cfg.steps`` (or ``cfg.stop_at``), checkpointing and validating on the way and at the end."""
        from tqdm import tqdm

        last = min(self.cfg.steps, self.cfg.stop_at or self.cfg.steps)
        bar = tqdm(total=last, initial=self.step, desc="tokenizer", disable=not D.is_main(self.info), dynamic_ncols=True)
        batches = iter(self.loader)
        while self.step < last:
            batch = next(batches)
            terms = self.train_step(batch.image, batch.aniso_d)
            self._log(terms)
            bar.update(1)
            bar.set_postfix(l1=f"{terms['l1']:.4f}", d=f"{terms['d_loss']:.3f}", gan=int(terms["gan_on"]))
            if self.step % self.cfg.val_every == 0 and self.step < last:
                self.validate()
            if self.step % self.cfg.ckpt_every == 0 and self.step < last:
                self.save()
        bar.close()
        self.validate()  # before saving, so that the checkpoint's history holds this validation
        self.save()
        if self.step >= self.cfg.steps:
            self.save(FINAL)


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def build_data(cfg: TokenizerTrainConfig, info: D.DistInfo):
    """This rank's loader and (rank 0) the held-out images; rank 0 converts a raw folder into a store first."""
    from pumit_nnunet.corpus.api import ensure_store
    from pumit_nnunet.corpus.loader import CropGrid, build_pretrain_loader, load_validation_images

    store = ensure_store(cfg.data, Path(cfg.out) / "corpus", num_workers=cfg.num_workers) if D.is_main(info) else None
    store = D.broadcast_object(str(store) if store is not None else None)
    crop = CropGrid(cfg.crop_depth_tokens, cfg.crop_inplane_tokens)
    loader = build_pretrain_loader(store, cfg.batch_size, crop, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size, num_workers=cfg.num_workers)
    val_images = []
    if D.is_main(info):
        try:
            val_images = load_validation_images(store, crop, cfg.max_val_images)
        except ValueError as error:  # a store without a held-out split still trains
            print(f"no validation images: {error}")
    return loader, val_images


def prepare_run(cfg: TokenizerTrainConfig, info: D.DistInfo, loader, val_images=None) -> TokenizerTrainer:
    """A trainer that has resumed (``cfg.resume``) or initialised (``cfg.init``); refuses to overwrite a run."""
    latest = Path(cfg.out) / LATEST
    if latest.exists() and not cfg.resume:
        raise FileExistsError(f"{cfg.out} already holds a run ({latest}); pass --resume or choose another --out")
    trainer = TokenizerTrainer(cfg, info, loader, val_images)
    if cfg.resume and latest.exists():
        trainer.load_state_dict(load_checkpoint(latest))
    elif cfg.init:
        trainer.init_weights_from(cfg.init)
    if D.is_main(info):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(Path(cfg.out) / "train_config.json", asdict(cfg))
    return trainer


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``pumit-nnunet pretrain tokenizer``."""
    cfg = TokenizerTrainConfig.from_args(args)
    info = D.init_distributed(cfg.device)
    try:
        loader, val_images = build_data(cfg, info)
        prepare_run(cfg, info, loader, val_images).fit()
    finally:
        D.cleanup_distributed()
    return 0
