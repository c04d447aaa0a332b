"""The tokenizer stage: generator and discriminator steps, validation figures, the ``tokenizer`` artefact.

The run folder, resume rules, per-rank state, loop and progress are :mod:`pumit_nnunet.pretrain.run`'s, shared with
MIM. Exact resume: every checkpoint holds both models, both optimisers, schedules and scalers, the GAN gate, every
rank's RNG and loader state, and the step; the per-step randomness of the loss (LPIPS slice choice) comes from a
generator seeded by ``(seed, rank, step)``, so N steps + resume + M steps equals N + M steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from pumit_nnunet.checkpoints.format import PretrainPlan, save_pumit_checkpoint
from pumit_nnunet.checkpoints.layout import CheckpointError
from pumit_nnunet.checkpoints.tokenizer import read_tokenizer_weights
from pumit_nnunet.corpus.loader import CropGrid, load_validation_images
from pumit_nnunet.errors import PumitError
from pumit_nnunet.layers.lpips import LPIPS
from pumit_nnunet.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from pumit_nnunet.models.tokenizer import TokenizerConfig, UniversalTokenizer, tokenizer_config, tokenizer_input
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw
from pumit_nnunet.pretrain import distributed as D
from pumit_nnunet.pretrain import run as R
from pumit_nnunet.pretrain.checkpoint import save_checkpoint_atomic
from pumit_nnunet.pretrain.config import ConfigError, TokenizerTrainConfig
from pumit_nnunet.pretrain.losses_tokenizer import GanGate, TokenizerLossWeights, generator_loss, hinge_discriminator_loss
from pumit_nnunet.pretrain.plots import plot_curves
from pumit_nnunet.pretrain.precision import autocast_context, make_grad_scaler
from pumit_nnunet.pretrain.tokenizer_validation import validate_tokenizer, write_validation_figures

__all__ = ["TokenizerTrainConfig", "TokenizerTrainer", "model_config", "loss_weights", "prepare_run", "run_tokenizer",
           "LATEST", "FINAL"]

#: the artefacts in our checkpoint format (kind ``tokenizer``): what ``pretrain mim --tokenizer`` loads
LATEST, FINAL = R.artefact_names("tokenizer")


def model_config(cfg: TokenizerTrainConfig) -> TokenizerConfig:
    """The tokenizer's sizes: the preset with ``--codebook-size``."""
    try:
        return tokenizer_config(cfg.preset, num_embeddings=cfg.codebook_size)
    except ValueError as error:
        raise ConfigError(f"--preset: {error}") from None


def loss_weights(cfg: TokenizerTrainConfig) -> TokenizerLossWeights:
    """The generator objective's weights and the p̄ averaging the run asks for."""
    return TokenizerLossWeights(cfg.perceptual_weight, cfg.quant_weight, cfg.entropy_weight, cfg.gan_weight,
                                cfg.gan_threshold, cfg.max_perceptual_slices, cfg.prior_mean)


def _lpips(cfg: TokenizerTrainConfig) -> LPIPS | None:
    if not cfg.perceptual or cfg.perceptual_weight == 0:
        return None
    if not cfg.vgg16 or not cfg.lpips_lin:
        raise ConfigError("the perceptual loss needs --vgg16 (torchvision vgg16-397923af.pth) and --lpips-lin "
                          "(lpips weights/v0.1/vgg.pth); pass both, or --no-perceptual")
    return LPIPS(cfg.vgg16, cfg.lpips_lin)


class TokenizerTrainer:
    """Holds the models, optimisers and state of one tokenizer run on one rank (a :class:`~.run.Stage`).

    Args:
        config: the run configuration.
        info: this process's place in the process group (:func:`~pumit_nnunet.pretrain.distributed.init_distributed`).
        loader: iterable of ``PretrainBatch`` with ``state_dict``/``load_state_dict`` (this rank's share).
        val_images: held-out images (``load_validation_images`` output); used on rank 0 only.
    """

    def __init__(self, config: TokenizerTrainConfig, info: D.DistInfo, loader: Iterable | None = None,
                 val_images: list | None = None) -> None:
        self.config, self.info, self.loader, self.val_images = config, info, loader, val_images or []
        self.out, self.device = Path(config.out), info.device
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = UniversalTokenizer(model_config(config)).to(self.device)
        disc_channels = self.model.config.down_channels
        self.disc = PatchDiscriminator(DiscriminatorConfig(layer_channels=disc_channels)).to(self.device)
        self.lpips = _lpips(config)
        if self.lpips is not None:
            self.lpips.to(self.device)
        self.weights = loss_weights(config)
        self.opt_g = build_adamw(self.model, config.lr, config.weight_decay)
        self.opt_d = build_adamw(self.disc, config.lr_disc, config.weight_decay)
        self.sched_g = WarmupDecaySchedule(self.opt_g, config.warmup_steps, config.steps, "cosine",
                                           config.min_lr / config.lr)
        self.sched_d = WarmupDecaySchedule(self.opt_d, config.warmup_steps, config.steps, "cosine",
                                           config.min_lr_disc / config.lr_disc)
        self.scaler_g = make_grad_scaler(self.device, config.precision)
        self.scaler_d = make_grad_scaler(self.device, config.precision)
        self.gate = GanGate(config.gan_threshold)
        self.step = 0
        self.history: R.History = {}
        self.step_log: list[dict[str, float]] = []  # this process's per-step terms (tests, debugging)
        self._window: list[dict[str, float]] = []
        self.ddp_model = D.wrap_ddp(self.model, info)
        self.ddp_disc = D.wrap_ddp(self.disc, info)

    # ----------------------------------------------------------------------------------------------- one step
    def _step_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.config.seed, self.info.rank, self.step)) & 0x7FFF_FFFF_FFFF)

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
        with autocast_context(self.device, self.config.precision):
            out = self.ddp_model(x, aniso_d)
            fake_logits = None
            if gan_on:  # the raw discriminator, frozen: the generator's GAN gradient reaches the reconstruction only
                self.disc.requires_grad_(False)
                fake_logits = self.disc(out.reconstruction, aniso_d)
            loss, terms = generator_loss(x, out, self.weights, self.lpips, fake_logits, generator=self._step_generator())
        self.disc.requires_grad_(True)
        self._backward_step(loss, self.opt_g, self.scaler_g, self.sched_g)
        with autocast_context(self.device, self.config.precision):
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

    # ------------------------------------------------------------------------------------- the Stage protocol
    def train_batch(self, batch) -> dict[str, float]:
        return self.train_step(batch.image, batch.aniso_d)

    def after_step(self, terms: dict[str, float], last: bool) -> dict[str, str]:
        """Curves (averaged over ``log_every`` steps), validation every ``val_every`` steps and where the run stops."""
        self.step_log.append(terms)
        self._window.append(terms)
        if self.step % self.config.log_every == 0 or self.step == self.config.steps:
            for key in self._window[0]:
                value = sum(t[key] for t in self._window) / len(self._window)
                self.history.setdefault(f"train/{key}", []).append((self.step, value))
            self._window.clear()
        if self.step % self.config.val_every == 0 or last:
            self.validate()  # before the checkpoint of this step, so that its history holds the validation
        return {"l1": f"{terms['l1']:.4f}", "d": f"{terms['d_loss']:.3f}", "gan": str(int(terms["gan_on"]))}

    def validate(self) -> None:
        """Validation metrics into the history and every figure into ``out`` (rank 0; the others wait)."""
        if D.is_main(self.info):
            if self.val_images:
                result = validate_tokenizer(self.model, self.val_images, self.device, self.config.precision)
                for key in ("l1", "psnr", "kl_uniform"):
                    self.history.setdefault(f"val/{key}", []).append((self.step, getattr(result, key)))
                write_validation_figures(result, self.out)
            plot_curves(self.history, self.out / "progress.png", title=f"tokenizer, step {self.step}")
        D.barrier()

    def save(self) -> None:
        """The training state, the latest artefact and the history (rank 0 writes; every rank takes part)."""
        state = self.state_dict()  # collective: every rank
        if D.is_main(self.info):
            save_checkpoint_atomic(self.out / R.TRAIN_STATE, state)
            self.export(self.out / LATEST)
            R.write_run_files(self.out, self.config, self.history)
        D.barrier()

    def finish(self) -> Path:
        if D.is_main(self.info):
            self.export(self.out / FINAL)
        D.barrier()
        return self.out / FINAL

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The training state (rank 0's copy); call on every rank (it gathers every rank's RNG and loader state)."""
        return {
            **R.state_header(self, self.history),
            "model": self.model.state_dict(), "discriminator": self.disc.state_dict(),
            "optimizer_g": self.opt_g.state_dict(), "optimizer_d": self.opt_d.state_dict(),
            "scheduler_g": self.sched_g.state_dict(), "scheduler_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "gate": self.gate.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a training state of :meth:`state_dict`; :func:`~.run.check_resume` has compared the recipes
        (and refused the ``pumit-nnunet/tokenizer/1`` states of earlier releases, which name ``--init`` instead)."""
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        for name in ("opt_g", "opt_d", "sched_g", "sched_d", "scaler_g", "scaler_d"):
            key = name.replace("opt_", "optimizer_").replace("sched_", "scheduler_")
            getattr(self, name).load_state_dict(state[key])
        self.gate.load_state_dict(state["gate"])
        self.history = R.restore_header(self, state)

    def export(self, path: Path) -> None:
        """The tokenizer as a checkpoint of our format (kind ``tokenizer``); the discriminator rides along in
        ``extra`` so that a sharpening stage (``--init``) continues the GAN game where this run left it."""
        crop = [self.config.crop_depth_tokens * 16] + [self.config.crop_inplane_tokens * 16] * 2
        save_pumit_checkpoint(
            path, kind="tokenizer", state_dict=self.model.state_dict(), architecture=self.model.config.to_dict(),
            pretrain_plan=PretrainPlan(in_channels=3, intensity="minus1-1", patch_size=crop,
                                       notes="each image scaled to [0, 1] (percentiles 0.5-99.5), grey replicated "
                                             "to RGB, then 2x - 1"),
            extra={"step": self.step, "train_config": self.config.to_plain(),
                   "discriminator": self.disc.state_dict(), "discriminator_config": self.disc.config.to_dict()})

    def init_weights_from(self, path: str | os.PathLike) -> None:
        """Start from another run's weights (e.g. the sharpening stage): tokenizer and, if kept, discriminator."""
        weights = read_tokenizer_weights(path)
        if weights.config != self.model.config:
            raise CheckpointError(f"the --init tokenizer {weights.config.to_dict()} differs from this run's "
                                  f"{self.model.config.to_dict()}; pass the matching --preset/--codebook-size", path)
        self.model.load_state_dict(weights.state_dict)
        if weights.discriminator is not None:
            self.disc.load_state_dict(weights.discriminator)


def _validation_images(store: str, cfg: TokenizerTrainConfig) -> list:
    try:
        return load_validation_images(store, CropGrid(cfg.crop_depth_tokens, cfg.crop_inplane_tokens),
                                      cfg.max_val_images)
    except (ValueError, PumitError) as error:  # a store without a held-out split still trains
        print(f"no validation images: {error}")
        return []


def prepare_run(cfg: TokenizerTrainConfig, info: D.DistInfo, loader: Iterable | None,
                val_images: list | None = None, state: dict | None = None) -> TokenizerTrainer:
    """A trainer resumed from ``state`` (:func:`~.run.preflight`'s, which has made the refusals) or initialised
    from ``cfg.init``."""
    trainer = TokenizerTrainer(cfg, info, loader, val_images)
    R.resume_or_init(trainer, state)
    return trainer


def _build(cfg: TokenizerTrainConfig, info: D.DistInfo, resume: bool) -> TokenizerTrainer:
    state = R.preflight(cfg, info, resume)  # before converting any data
    loader, store = R.build_corpus_loader(cfg, info)
    val_images = _validation_images(store, cfg) if D.is_main(info) else []
    return prepare_run(cfg, info, loader, val_images, state)


def run_tokenizer(config: TokenizerTrainConfig, resume: bool = False) -> Path | None:
    """Entry point of ``pumit-nnunet pretrain tokenizer``: the final artefact's path (``None`` after ``--stop-at``)."""
    return R.run_stage(config, lambda cfg, info: _build(cfg, info, resume))
