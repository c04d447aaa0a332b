"""Mixed precision switches: autocast and the gradient scaler, both active on CUDA only."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from pumit_nnunet.pretrain.config import PRECISIONS

__all__ = ["PRECISIONS", "autocast_context", "default_precision", "make_grad_scaler"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """``torch.autocast`` in bf16/fp16 on CUDA; a null context for fp32 and on CPU (CPU runs stay exact fp32)."""
    _check(precision)
    if precision == "fp32" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=_DTYPES[precision])


def default_precision(device: torch.device | str) -> str:
    """What fine-tuning runs in when nobody chose: ``bf16`` on CUDA (``fp16`` on GPUs without bf16), ``fp32`` on CPU."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler that is enabled only for fp16 on CUDA (bf16 and fp32 need none); its state is checkpointable."""
    _check(precision)
    enabled = precision == "fp16" and torch.device(device).type == "cuda"
    return torch.amp.GradScaler("cuda" if enabled else "cpu", enabled=enabled)
