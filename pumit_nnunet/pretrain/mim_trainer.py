"""MIM pre-training loop: the ViT learns to predict the frozen tokenizer's soft tokens at masked positions.

One :class:`MIMTrainer` per process (torchrun starts one per GPU). Each step: crops in [0, 1] -> (ImageNet RGB for
the ViT, ``2x - 1`` for the tokenizer) -> soft-token targets from the frozen tokenizer (eval mode, no grad) ->
masked forward -> soft-label cross-entropy -> AdamW with gradient clipping, warm-up + cosine. Masks for the whole
*global* batch are drawn from one generator shared by every rank and each rank takes its slice, so a run on N
processes makes the same updates as one process holding the global batch.

Files in the run folder: ``checkpoint_latest.pth`` (training state for exact resume: model, optimiser, schedule,
scaler, step, history, and per rank the RNG and loader state), ``pumit_mim_latest.pth`` / ``pumit_mim_final.pth``
(our PUMIT checkpoint format, kind ``"mim"``: what ``nnUNetv2_train ... -tr PumitTrainer -pretrained_weights``
loads), ``progress.png`` (loss, KL, masked-token accuracy, lr) and ``pictures/step_N.png``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from pumit_nnunet.models.mim import (ViTForMIM, flatten_token_grid, merge_token_distributions, mim_inputs,
                                     random_token_mask)
from pumit_nnunet.models.vit import vit_config
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw
from pumit_nnunet.pretrain.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state,
                                             save_checkpoint_atomic)
from pumit_nnunet.pretrain.distributed import (DistInfo, all_reduce_mean, broadcast_object, gather_objects, is_main,
                                               wrap_ddp)
from pumit_nnunet.pretrain.mim_cli import MIMTrainConfig  # the run's dataclass lives torch-free beside its parser
from pumit_nnunet.pretrain.precision import autocast_context, make_grad_scaler

__all__ = [
    "MIMTrainConfig", "MIMTrainer", "MIMStepResult", "load_frozen_tokenizer", "mim_pretrain_plan", "save_mim_pictures",
    "run_mim",
]

TRAIN_STATE = "checkpoint_latest.pth"
PUMIT_LATEST = "pumit_mim_latest.pth"
PUMIT_FINAL = "pumit_mim_final.pth"
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
    """The tokenizer of a ``pumit-nnunet pretrain tokenizer`` checkpoint (or of our format, kind ``"tokenizer"``),
    in eval mode with gradients off: it only supplies targets."""
    from pumit_nnunet.checkpoints.format import CheckpointError, checkpoint_from_dict, is_pumit_checkpoint
    from pumit_nnunet.models.tokenizer import TokenizerConfig, UniversalTokenizer
    from pumit_nnunet.pretrain.tokenizer_trainer import load_tokenizer

    state = load_checkpoint(path)
    if not is_pumit_checkpoint(state):
        return load_tokenizer(path).to(device)
    checkpoint = checkpoint_from_dict(state, str(path))
    if checkpoint.kind != "tokenizer":
        raise CheckpointError(f"{path} is a {checkpoint.kind!r} checkpoint, expected a tokenizer checkpoint")
    tokenizer = UniversalTokenizer(TokenizerConfig.from_dict(checkpoint.architecture))
    tokenizer.load_state_dict(checkpoint.state_dict)
    return tokenizer.to(device).eval().requires_grad_(False)


def mim_pretrain_plan(config: MIMTrainConfig):
    """What the MIM weights were trained with, stored in every PUMIT checkpoint the trainer writes."""
    from pumit_nnunet.checkpoints.format import PretrainPlan

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
    from pumit_nnunet.pretrain.plots import save_image_grid

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


#: settings that do not change the optimisation, so a resumed run may differ in them
RESUME_MAY_CHANGE = frozenset({"data", "out", "device", "num_workers", "log_every", "ckpt_every", "image_every",
                               "resume", "init", "steps"})


class MIMTrainer:
    """One process's share of a MIM run.

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
        self.loader = loader if loader is not None else self._build_loader()
        self._batches: Iterator | None = None
        self.step = 0
        self.history: dict[str, list[tuple[int, float]]] = {name: [] for name in METRICS}

    def _build_model(self) -> ViTForMIM:
        cfg = self.config
        vit = vit_config(cfg.vit, mask_token=True)
        if vit.patch_size != self.tokenizer.config.stride:
            raise ValueError(f"the tokenizer's stride {self.tokenizer.config.stride} must equal the ViT patch size "
                             f"{vit.patch_size}: targets align one-to-one with patch tokens")
        layers = None if cfg.mask_layers_from is None else range(cfg.mask_layers_from, vit.depth)
        model = ViTForMIM(vit, self.tokenizer.config.num_embeddings, cfg.mask_ratio, layers)
        if cfg.init:
            self._load_init(model, cfg.init)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        return model

    def _load_init(self, model: ViTForMIM, source: str) -> None:
        """ViT weights from EVA-02 / PUMIT / our checkpoints; the MIM head too when the source has a matching one."""
        from pumit_nnunet.checkpoints import CheckpointError, load_vit_weights, read_weights

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
            raise CheckpointError(f"--init {source} does not fit the MIM ViT:\n{report.summary()}")

    def _build_loader(self):
        from pumit_nnunet.corpus.api import ensure_store
        from pumit_nnunet.corpus.loader import CropGrid, build_pretrain_loader

        cfg = self.config
        # rank 0 converts a raw dataset once; the others wait and use the store it names
        store = ensure_store(cfg.data, self.out / "corpus", num_workers=cfg.num_workers) if is_main(self.info) else None
        store = broadcast_object(os.fspath(store) if store is not None else None)
        return build_pretrain_loader(store, cfg.batch_size, CropGrid(cfg.crop_depth_tokens, cfg.crop_inplane_tokens),
                                     seed=cfg.seed, rank=self.info.rank, world_size=self.info.world_size,
                                     num_workers=cfg.num_workers, augment=cfg.augment)

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

    # --- the loop -------------------------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> Path:
        """Train to ``config.steps`` (or stop after step ``until``, as an interruption would), from wherever the state
        says; checkpoint every ``ckpt_every`` steps and at the end; return the final PUMIT checkpoint's path."""
        from tqdm.auto import tqdm

        cfg, main = self.config, is_main(self.info)
        stop = cfg.steps if until is None else min(until, cfg.steps)
        progress = tqdm(total=cfg.steps, initial=self.step, desc="MIM", disable=not main, dynamic_ncols=True)
        while self.step < stop:
            batch = self._next_batch()
            result = self.train_step(batch.image, batch.aniso_d)
            metrics, last = result.metrics, self.step == cfg.steps
            progress.update(1)
            if self.step % cfg.log_every == 0 or last:
                self._log(metrics)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            if main and (self.step % cfg.image_every == 0 or last):
                save_mim_pictures(self.out / "pictures" / f"step_{self.step:07d}.png", result, self.tokenizer)
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
        progress.close()
        if main and self.step == cfg.steps:
            self.export(self.out / PUMIT_FINAL)
        return self.out / PUMIT_FINAL

    def _next_batch(self):
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def _log(self, metrics: dict[str, float]) -> None:
        for name in METRICS:
            self.history[name].append((self.step, float(metrics[name])))
        if is_main(self.info):
            from pumit_nnunet.pretrain.plots import plot_curves

            plot_curves(self.history, self.out / "progress.png", title="MIM pre-training")

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Training state of the whole run (per-rank parts gathered in rank order). Collective under DDP."""
        per_rank = gather_objects({"rng": capture_rng_state(), "loader": self.loader.state_dict()})
        return {
            "config": asdict(self.config), "step": self.step, "world_size": self.info.world_size,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "mask_generator": self.mask_generator.get_state(), "history": self.history, "per_rank": per_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = {k: (v, getattr(self.config, k, None)) for k, v in state["config"].items()
                   if k not in RESUME_MAY_CHANGE and getattr(self.config, k, None) != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ValueError(f"--resume with a different recipe would not continue the same run ({detail}); "
                             "start a new run folder (use --init with its checkpoint) instead")
        if state["config"].get("steps") != self.config.steps and is_main(self.info):
            print(f"note: --steps changed from {state['config'].get('steps')} to {self.config.steps}: the cosine "
                  "schedule is stretched from here on")
        if state["world_size"] != self.info.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                             f"{self.info.world_size}: exact resume needs the same number")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.mask_generator.set_state(state["mask_generator"])
        self.history = {name: [tuple(p) for p in points] for name, points in state["history"].items()}
        self.step = int(state["step"])
        mine = state["per_rank"][self.info.rank]
        self.loader.load_state_dict(mine["loader"])
        self._batches = None
        restore_rng_state(mine["rng"])

    def save(self) -> None:
        """Write the resumable training state and the PUMIT checkpoint (rank 0 writes; all ranks take part)."""
        state = self.state_dict()
        if is_main(self.info):
            save_checkpoint_atomic(self.out / TRAIN_STATE, state)
            self.export(self.out / PUMIT_LATEST)
            tmp = self.out / ".history.json.tmp"
            tmp.write_text(json.dumps(self.history), encoding="utf-8")
            os.replace(tmp, self.out / "history.json")

    def resume(self) -> bool:
        """Load ``checkpoint_latest.pth`` from the run folder if there is one."""
        path = self.out / TRAIN_STATE
        if not path.is_file():
            return False
        self.load_state_dict(load_checkpoint(path, map_location=self.device))
        return True

    def export(self, path: Path) -> None:
        """The model as a PUMIT checkpoint (kind ``"mim"``): ViT weights under the released names, ``mask_token``,
        ``mim_head.*``; the architecture is the ``ViTConfig``, MIM details go to ``extra``."""
        from pumit_nnunet.checkpoints.format import VIT_ADAPTATION, save_pumit_checkpoint

        model = self.model
        save_pumit_checkpoint(
            path, kind="mim", state_dict=model.state_dict(), architecture=model.config.to_dict(),
            pretrain_plan=mim_pretrain_plan(self.config), adaptation=VIT_ADAPTATION,
            extra={"step": self.step, "codebook_size": model.codebook_size, "mask_ratio": model.mask_ratio,
                   "mask_layer_ids": list(model.mask_layer_ids), "tokenizer": os.fspath(self.config.tokenizer),
                   "train_config": asdict(self.config)},
        )


def run_mim(config: MIMTrainConfig, resume: bool = False) -> Path:
    """Run (or resume) MIM pre-training in this process, under torchrun or alone; return the final checkpoint."""
    from pumit_nnunet.pretrain.distributed import barrier, cleanup_distributed, init_distributed

    if (Path(config.out) / TRAIN_STATE).exists() and not resume:
        raise FileExistsError(f"{config.out} already holds a MIM run ({TRAIN_STATE}); pass --resume or another --out")
    info = init_distributed(config.device)
    try:
        trainer = MIMTrainer(config, info)
        if resume and trainer.resume() and is_main(info):
            print(f"resumed MIM pre-training at step {trainer.step} from {trainer.out / TRAIN_STATE}")
        final = trainer.fit()
        barrier()
        return final
    finally:
        cleanup_distributed()
