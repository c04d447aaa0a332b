"""Held-out evaluation of the tokenizer and the figures people look at (reconstructions, code usage, sharpness)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pumit_nnunet.layers.quantize import kl_from_uniform
from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_input
from pumit_nnunet.pretrain.plots import plot_histogram, save_image_grid
from pumit_nnunet.pretrain.precision import autocast_context

__all__ = ["ValidationResult", "psnr_unit_range", "validate_tokenizer", "write_validation_figures"]

#: one held-out image: (key, modality, image (C, D, H, W) in [0, 1], aniso_d), as ``load_validation_images`` yields
ValImage = tuple[str, str, Tensor, int]


@dataclass
class ValidationResult:
    """Mean reconstruction error and token statistics over the held-out images, plus middle slices to show."""

    l1: float
    psnr: float
    kl_uniform: float
    log_k: float
    code_usage: np.ndarray  # (K,) fraction of tokens whose most likely code is k
    token_kl: np.ndarray  # per-token KL(p_i || U)
    rows: list[list[np.ndarray]] = field(default_factory=list)
    row_titles: list[str] = field(default_factory=list)


def psnr_unit_range(x: Tensor, y: Tensor) -> float:
    """PSNR (dB) of images in [0, 1]: ``10 log10(1 / MSE)``."""
    mse = float((x.float() - y.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _middle_slice(volume: Tensor) -> np.ndarray:
    """Channel-mean of the middle depth slice of ``(C, D, H, W)``."""
    return volume[:, volume.shape[1] // 2].float().mean(0).cpu().numpy()


@torch.no_grad()
def validate_tokenizer(model: UniversalTokenizer, images: list[ValImage], device: torch.device,
                       precision: str = "fp32") -> ValidationResult:
    """Reconstruct every held-out image one at a time (they differ in shape and aniso_d)."""
    was_training = model.training
    model.eval()
    l1s, psnrs, kls, usage = [], [], [], torch.zeros(model.config.num_embeddings, dtype=torch.float64)
    rows, titles = [], []
    for key, modality, image, aniso_d in images:
        x = tokenizer_input(image[None].to(device))
        with autocast_context(device, precision):
            out = model(x, aniso_d)
        recon = out.reconstruction.float()
        l1s.append(float((recon - x).abs().mean()))
        x01, recon01 = (x[0] + 1) / 2, ((recon[0] + 1) / 2).clamp(0, 1)
        psnrs.append(psnr_unit_range(x01, recon01))
        probs = out.probs.reshape(-1, out.probs.shape[-1])
        kls.append(kl_from_uniform(probs, out.log_probs.reshape(probs.shape)).cpu())
        usage += torch.bincount(probs.argmax(-1).cpu(), minlength=usage.numel()).double()
        rows.append([_middle_slice(x01), _middle_slice(recon01), _middle_slice((recon01 - x01).abs())])
        titles.append(f"{modality}\n{key}"[:60])
    model.train(was_training)
    token_kl = torch.cat(kls).numpy() if kls else np.zeros(0)
    return ValidationResult(
        l1=float(np.mean(l1s)) if l1s else float("nan"), psnr=float(np.mean(psnrs)) if psnrs else float("nan"),
        kl_uniform=float(token_kl.mean()) if token_kl.size else float("nan"),
        log_k=math.log(model.config.num_embeddings), code_usage=(usage / usage.sum().clamp_min(1)).numpy(),
        token_kl=token_kl, rows=rows, row_titles=titles)


def write_validation_figures(result: ValidationResult, out_dir: str | Path) -> None:
    """``reconstructions.png``, ``codebook_usage.png`` and ``sharpness.png`` in ``out_dir`` (overwritten atomically)."""
    out_dir = Path(out_dir)
    if result.rows:
        save_image_grid(result.rows, out_dir / "reconstructions.png", row_titles=result.row_titles,
                        col_titles=["input", "reconstruction", "|difference|"])
    used = int((result.code_usage > 0).sum())
    plot_histogram(result.code_usage, out_dir / "codebook_usage.png", as_bars=True, xlabel="code",
                   title=f"codebook usage (argmax) on held-out images: {used}/{result.code_usage.size} codes used")
    if result.token_kl.size:
        plot_histogram(result.token_kl, out_dir / "sharpness.png", xlabel="KL(p_i || uniform) (nats)",
                       title=f"token sharpness: mean KL from uniform {result.kl_uniform:.3f} (max log K {result.log_k:.3f})",
                       vlines={"mean KL": result.kl_uniform, "log K": result.log_k})
