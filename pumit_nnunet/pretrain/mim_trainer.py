"""The MIM stage: the ViT learns to predict the frozen tokenizer's soft tokens at masked positions.

One :class:`MIMTrainer` per process (torchrun starts one per GPU). Each step: crops in [0, 1] -> (ImageNet RGB for
the ViT, ``2x - 1`` for the tokenizer) -> soft-token targets from the frozen tokenizer (eval mode, no grad) ->
masked forward -> soft-label cross-entropy -> AdamW with gradient clipping, warm-up + cosine. Masks for the whole
*global* batch are drawn from one generator shared by every rank and each rank takes its slice, so a run on N
processes makes the same updates as one process holding the global batch.

The run folder, resume rules, per-rank state, loop and progress are :mod:`pumit_nnunet.pretrain.run`'s, shared with
the tokenizer stage. The artefacts ``pumit_mim_latest.pth`` / ``pumit_mim_final.pth`` are our checkpoint format,
kind ``"mim"``: what ``nnUNetv2_train ... -tr PumitTrainer -pretrained_weights`` loads; ``progress.png`` shows loss,
KL, masked-token accuracy and lr, ``pictures/step_N.png`` the predictions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pumit_nnunet.checkpoints import CheckpointError, load_vit_weights, read_weights
from pumit_nnunet.checkpoints.format import VIT_ADAPTATION, PretrainPlan, save_pumit_checkpoint
from pumit_nnunet.checkpoints.tokenizer import load_tokenizer
from pumit_nnunet.models.mim import (ViTForMIM, flatten_token_grid, merge_token_distributions, mim_inputs,
                                     random_token_mask)
from pumit_nnunet.models.vit import vit_config
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw
from pumit_nnunet.pretrain import run as R
from pumit_nnunet.pretrain.checkpoint import save_checkpoint_atomic
from pumit_nnunet.pretrain.config import ConfigError, MIMTrainConfig
from pumit_nnunet.pretrain.distributed import DistInfo, all_reduce_mean, barrier, is_main, wrap_ddp
from pumit_nnunet.pretrain.plots import plot_curves, save_image_grid
from pumit_nnunet.pretrain.precision import autocast_context, make_grad_scaler

__all__ = [
    "MIMTrainConfig", "MIMTrainer", "MIMStepResult", "load_frozen_tokenizer", "mim_pretrain_plan", "save_mim_pictures",
    "run_mim", "PUMIT_LATEST", "PUMIT_FINAL", "TRAIN_STATE",
]

TRAIN_STATE = R.TRAIN_STATE
PUMIT_LATEST, PUMIT_FINAL = R.artefact_names("mim")
METRICS = ("loss", "kl", "accuracy", "grad_norm", "lr")


@dataclass
class MIMStepResult:
    """One training step: global-mean ``metrics`` and this rank's tensors (for the pictures)."""

    metrics: dict[str, float]
    image: Tensor  # (B, C, D, H, W) in [0, 1]
    target: Tensor  # (B, N, K) tokenizer distributions
    mask: Tensor  # (B, N) True = masked
    logits: Tensor  # (B*M, K) predictions at the masked tokens
    aniso_d: int


def load_frozen_tokenizer(path: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """The frozen tokenizer (eval mode, gradients off: it only supplies targets) from any file
    :func:`pumit_nnunet.checkpoints.tokenizer.load_tokenizer` reads."""
    return load_tokenizer(path).to(device)


def mim_pretrain_plan(config: MIMTrainConfig):
    """What the MIM weights were trained with, stored in every PUMIT checkpoint the trainer writes."""
    return PretrainPlan(
        in_channels=3, intensity="unit-range-imagenet", spacing=None,
        patch_size=[config.crop_depth_tokens * 16, config.crop_inplane_tokens * 16, config.crop_inplane_tokens * 16],
        notes="MIM on soft tokens: each image scaled to [0, 1] (percentiles 0.5-99.5), grey replicated to RGB, "
        "ImageNet-normalised for the ViT; the tokenizer sees 2x - 1. Crop depth shown for aniso_d 0; SAC patch 16^3.",
    )


@torch.no_grad()
def save_mim_pictures(path: str | os.PathLike, result: MIMStepResult, tokenizer: torch.nn.Module,
                      max_rows: int = 4) -> None:
    """Middle slices: input | visible tokens | tokenizer decode of the targets | decode of the predicted tokens
    (predictions at masked positions, targets at visible ones)."""
    image, target, mask, aniso_d = result.image, result.target, result.mask, result.aniso_d
    n = min(max_rows, image.shape[0])
    rows_of_first_n = int(mask[:n].sum())  # logits are in (sample, position) order
    pred = merge_token_distributions(result.logits[:rows_of_first_n].float().softmax(-1), target[:n], mask[:n])
    grid = tokenizer.token_grid(tuple(image.shape[2:]), aniso_d)
    probs = torch.cat([target[:n], pred]).transpose(1, 2).reshape(2 * n, -1, *grid)
    decoded = ((tokenizer.decode(probs.float(), aniso_d) + 1) / 2).clamp(0, 1).mean(1).cpu()
    grey = image[:n].float().mean(1).cpu()
    token = [s // g for s, g in zip(image.shape[2:], grid)]
    visible = (~mask[:n]).view(n, *grid).cpu()
    for axis, size in enumerate(token, start=1):
        visible = visible.repeat_interleave(size, dim=axis)
    mid = image.shape[2] // 2
    rows = [[grey[i, mid], (grey[i] * visible[i])[mid], decoded[i, mid], decoded[n + i, mid]] for i in range(n)]
    save_image_grid([[a.numpy() for a in row] for row in rows], path,
                    col_titles=["input", "visible tokens", "tokenizer: targets", "decoded prediction"])


class MIMTrainer:
    """One process's share of a MIM run (a :class:`~pumit_nnunet.pretrain.run.Stage`).

    Args:
        config: the run.
        info: this process's place (``init_distributed()``).
        loader: an iterator of ``PretrainBatch`` with ``state_dict``/``load_state_dict``; built from
            ``config.data`` when omitted (the corpus loader, sharded by rank).
    """

    def __init__(self, config: MIMTrainConfig, info: DistInfo, loader: Any | None = None) -> None:
        self.config, self.info, self.device = config, info, info.device
        self.out = Path(config.out)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.tokenizer = load_frozen_tokenizer(config.tokenizer, self.device)
        self.model = self._build_model().to(self.device)
        self.ddp_model = wrap_ddp(self.model, info)
        self.optimizer = build_adamw(self.model, config.lr, config.weight_decay)
        self.scheduler = WarmupDecaySchedule(self.optimizer, config.warmup_steps, config.steps, "cosine",
                                             min_ratio=config.min_lr / config.lr)
        self.scaler = make_grad_scaler(self.device, config.precision)
        self.mask_generator = torch.Generator().manual_seed(config.seed)
        self.loader = loader if loader is not None else R.build_corpus_loader(config, info)[0]
        self.step = 0
        self.history: R.History = {name: [] for name in METRICS}

    def _build_model(self) -> ViTForMIM:
        cfg = self.config
        try:
            vit = vit_config(cfg.vit, mask_token=True)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"--vit: {error}") from None
        if vit.patch_size != self.tokenizer.config.stride:
            raise ConfigError(f"the tokenizer's stride {self.tokenizer.config.stride} must equal the ViT patch size "
                              f"{vit.patch_size}: targets align one-to-one with patch tokens", cfg.tokenizer)
        layers = None if cfg.mask_layers_from is None else range(cfg.mask_layers_from, vit.depth)
        model = ViTForMIM(vit, self.tokenizer.config.num_embeddings, cfg.mask_ratio, layers)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        return model

    def init_weights_from(self, source: str) -> None:
        """ViT weights from EVA-02 / PUMIT / our checkpoints; the MIM head too when the source has a matching one."""
        model = self.model
        weights = read_weights(source)
        report = load_vit_weights(model, weights, allow_partial=True, log=print if is_main(self.info) else None)
        head = {k.removeprefix("mim_head."): v for k, v in weights.encoder_state_dict().items()
                if k.startswith("mim_head.")}
        head_fits = head.keys() == model.mim_head.state_dict().keys() and all(
            v.shape == model.mim_head.state_dict()[k].shape for k, v in head.items())
        if head_fits:
            model.mim_head.load_state_dict(head)
        backbone_missing = [k for k in report.missing if not k.startswith("mim_head.")]
        if report.mismatched or report.unexpected or backbone_missing:
            raise CheckpointError(f"the --init weights do not fit the MIM ViT:\n{report.summary()}", source)

    # --- one step -------------------------------------------------------------------------------------------------
    def draw_mask(self, batch: int, num_tokens: int) -> Tensor:
        """This rank's slice of a mask drawn for the global batch (the same generator state on every rank)."""
        world, rank = self.info.world_size, self.info.rank
        mask = random_token_mask(batch * world, num_tokens, self.config.mask_ratio, generator=self.mask_generator)
        return mask[rank * batch:(rank + 1) * batch].to(self.device)

    @torch.no_grad()
    def targets(self, tokenizer_in: Tensor, aniso_d: int) -> Tensor:
        """The frozen tokenizer's token distributions ``(B, N, K)`` (float32)."""
        with autocast_context(self.device, self.config.precision):
            return flatten_token_grid(self.tokenizer.encode(tokenizer_in, aniso_d)).float()

    def train_step(self, image: Tensor, aniso_d: int) -> MIMStepResult:
        """One optimisation step on this rank's crops ``(B, C, D, H, W)`` in [0, 1]; metrics are global means."""
        self.ddp_model.train()
        vit_in, tokenizer_in = mim_inputs(image.to(self.device, non_blocking=True))
        target = self.targets(tokenizer_in, aniso_d)
        mask = self.draw_mask(image.shape[0], target.shape[1])
        with autocast_context(self.device, self.config.precision):
            logits = self.ddp_model(vit_in, aniso_d, mask)
        out = self.model.objective(logits, target, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        stats = torch.stack([out.loss.detach(), out.kl, out.accuracy, grad_norm.float()])
        metrics = dict(zip(METRICS, all_reduce_mean(stats).tolist()))
        metrics["lr"] = lr
        return MIMStepResult(metrics, image, target, mask, out.logits.detach(), aniso_d)

    # --- the Stage protocol ---------------------------------------------------------------------------------------
    def train_batch(self, batch) -> MIMStepResult:
        return self.train_step(batch.image, batch.aniso_d)

    def after_step(self, result: MIMStepResult, last: bool) -> dict[str, str]:
        """Curves every ``log_every`` steps, pictures every ``image_every`` steps, both where the run stops."""
        cfg, metrics, end = self.config, result.metrics, last or self.step == self.config.steps
        if self.step % cfg.log_every == 0 or end:
            for name in METRICS:
                self.history[name].append((self.step, float(metrics[name])))
            if is_main(self.info):
                plot_curves(self.history, self.out / "progress.png", title="MIM pre-training")
        if is_main(self.info) and (self.step % cfg.image_every == 0 or end):
            save_mim_pictures(self.out / "pictures" / f"step_{self.step:07d}.png", result, self.tokenizer)
        return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['accuracy']:.3f}"}

    def fit(self, until: int | None = None) -> Path | None:
        """Train to ``config.steps`` (or stop after step ``until`` / ``--stop-at``, as an interruption would); the
        final artefact's path when the run is complete."""
        return R.fit(self, until)

    def save(self) -> None:
        """Write the resumable training state and the PUMIT checkpoint (rank 0 writes; all ranks take part)."""
        state = self.state_dict()
        if is_main(self.info):
            save_checkpoint_atomic(self.out / TRAIN_STATE, state)
            self.export(self.out / PUMIT_LATEST)
            R.write_run_files(self.out, self.config, self.history)
        barrier()

    def finish(self) -> Path:
        if is_main(self.info):
            self.export(self.out / PUMIT_FINAL)
        barrier()
        return self.out / PUMIT_FINAL

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Training state of the whole run (per-rank parts gathered in rank order). Collective under DDP."""
        return {
            **R.state_header(self, self.history),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "mask_generator": self.mask_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also of earlier releases); :func:`~.run.check_resume` compared the
        recipes."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.mask_generator.set_state(state["mask_generator"])
        self.history = R.restore_header(self, state)

    def resume(self) -> bool:
        """Continue from ``checkpoint_latest.pth`` in the run folder if there is one (recipe checked)."""
        return R.resume_from_folder(self)

    def export(self, path: Path) -> None:
        """The model as a PUMIT checkpoint (kind ``"mim"``): ViT weights under the released names, ``mask_token``,
        ``mim_head.*``; the architecture is the ``ViTConfig``, MIM details go to ``extra``."""
        model = self.model
        save_pumit_checkpoint(
            path, kind="mim", state_dict=model.state_dict(), architecture=model.config.to_dict(),
            pretrain_plan=mim_pretrain_plan(self.config), adaptation=VIT_ADAPTATION,
            extra={"step": self.step, "codebook_size": model.codebook_size, "mask_ratio": model.mask_ratio,
                   "mask_layer_ids": list(model.mask_layer_ids), "tokenizer": os.fspath(self.config.tokenizer),
                   "train_config": self.config.to_plain()},
        )


def _build(config: MIMTrainConfig, info: DistInfo, resume: bool) -> MIMTrainer:
    state = R.preflight(config, info, resume)  # before converting any data
    trainer = MIMTrainer(config, info)
    R.resume_or_init(trainer, state)
    return trainer


def run_mim(config: MIMTrainConfig, resume: bool = False) -> Path | None:
    """Entry point of ``pumit-nnunet pretrain mim``: the final artefact's path (``None`` after ``--stop-at``)."""
    return R.run_stage(config, lambda cfg, info: _build(cfg, info, resume))
