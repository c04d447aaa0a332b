"""Optimiser parameter groups and per-iteration warm-up schedules shared by fine-tuning and pre-training."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["NO_DECAY_MODULES", "no_decay_parameter_names", "split_decay_groups", "build_adamw", "warmup_cosine_factor", "warmup_poly_factor", "WarmupDecaySchedule"]

#: module types whose weights are never decayed (the authors exclude by type: the codebook is an ``nn.Embedding``)
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding,)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the parameters the model declares exempt from weight decay.

    Every submodule with a ``no_weight_decay()`` method (the timm contract: names relative to that module, e.g. the
    ViT's ``cls_token``, ``pos_embed``, ``mask_token``) contributes its names under its own prefix, so a wrapper
    (classifier, segmentation network, MIM model) needs no list of its own; the weights of every
    :data:`NO_DECAY_MODULES` module (the tokenizer's codebook ``quantize.embedding.weight``) are added.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        lead = f"{prefix}." if prefix else ""
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{lead}{name}" for name in declared()}
        if isinstance(module, NO_DECAY_MODULES):
            names |= {f"{lead}{name}" for name, _ in module.named_parameters(recurse=False)}
    return names


def split_decay_groups(
    model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()
) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases / norm weights / 1-D params / what the model declares
    (:func:`no_decay_parameter_names`) / ``extra_no_decay`` (full names)."""
    exempt = no_decay_parameter_names(model) | set(extra_no_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
    extra_no_decay: Iterable[str] = (),
) -> torch.optim.AdamW:
    """AdamW over :func:`split_decay_groups` (fused on CUDA when every parameter is on CUDA)."""
    groups = split_decay_groups(model, weight_decay, extra_no_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio`` at ``total_steps``.

    Unlike the original (timm's scheduler with a warm-up prefix and ``t_initial = max_steps``, updated every 100
    steps), the cosine spans the steps after the warm-up and reaches ``min_ratio`` exactly at the end of the run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_poly_factor(step: int, warmup_steps: int, total_steps: int, exponent: float = 0.9) -> float:
    """lr multiplier: linear warm-up, then nnU-Net's polynomial decay ``(1 - t)^0.9``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return (1 - min(max(step - warmup_steps, 0) / span, 1.0)) ** exponent


class WarmupDecaySchedule(LambdaLR):
    """Per-iteration schedule that scales every parameter group's own initial lr (unlike nnU-Net's PolyLR).

    Args:
        optimizer: the optimiser.
        warmup_steps: linear warm-up iterations.
        total_steps: iterations of the whole run.
        kind: ``"cosine"`` or ``"poly"``.
        min_ratio: final lr / initial lr for the cosine decay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, kind: str = "cosine",
                 min_ratio: float = 0.0) -> None:
        if kind not in ("cosine", "poly"):
            raise ValueError(f"unknown schedule kind {kind!r}")
        self.warmup_steps, self.total_steps, self.kind, self.min_ratio = warmup_steps, total_steps, kind, min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if self.kind == "poly":
            return warmup_poly_factor(step, self.warmup_steps, self.total_steps)
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)

    def set_step(self, step: int) -> None:
        """Jump to iteration ``step`` (exact after a resume: the lr is a pure function of the step)."""
        self.last_epoch = step
        self._last_lr = [base * self._factor(step) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; the factor is fully described by these fields
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
