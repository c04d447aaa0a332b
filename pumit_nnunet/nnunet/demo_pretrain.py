"""``pumit-nnunet demo --pretrain``: the whole PUMIT chain at toy scale on the fetched unlabelled scans.

corpus store (``pumit-nnunet corpus convert``) -> visual tokenizer (``pretrain tokenizer``, tiny preset, no
perceptual loss: its VGG16/LPIPS weights are never downloaded) -> MIM of the tiny ViT on the tokenizer's soft
tokens (``pretrain mim --vit T``). The result, ``pumit_mim_final.pth``, is what the demo fine-tunes from.
The held-out test scan is never part of the corpus. Each stage resumes (``--resume``) or is skipped when done.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pumit_nnunet.nnunet.demo_steps import run_logged

__all__ = ["PretrainBudget", "PRETRAIN_BUDGETS", "PRETRAIN_SCANS", "pretrain_chain"]

#: unlabelled scans of the pyradiomics data the chain learns from: one chest CT (the training patient) and two
#: brain MRIs; ``lung2`` (the demo's test patient) is left out
PRETRAIN_SCANS: tuple[str, ...] = ("lung1_image.nrrd", "brain1_image.nrrd", "brain2_image.nrrd")


@dataclass(frozen=True)
class PretrainBudget:
    """Steps of each stage (batch 2, crops of 1x4x4 tokens for the tokenizer and 2x4x4 for MIM)."""

    tokenizer_steps: int
    mim_steps: int


PRETRAIN_BUDGETS = {"standard": PretrainBudget(300, 300), "quick": PretrainBudget(4, 4)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pumit_nnunet.cli", *args]


def _stage(command: list[str], run: Path, final: str, log: Path) -> Path:
    """Run one pre-training stage unless its final file exists; continue a stopped run with ``--resume``."""
    if (run / final).is_file():
        print(f"(done before: {run / final})", flush=True)
        return run / final
    resume = ["--resume"] if (run / "checkpoint_latest.pth").is_file() else []
    run_logged(command + resume, dict(os.environ, PYTHONUNBUFFERED="1"), log)
    return run / final


def _common(steps: int, depth_tokens: int, device: str) -> list[str]:
    return ["--steps", str(steps), "--warmup-steps", str(max(steps // 10, 1)), "--batch-size", "2",
            "--crop-depth-tokens", str(depth_tokens), "--crop-inplane-tokens", "4", "--device", device,
            "--precision", "fp32", "--ckpt-every", str(max(steps // 3, 1)), "--seed", "0"]


def pretrain_chain(data: Path, work: Path, budget: PretrainBudget, device: str = "cpu") -> Path:
    """Run corpus -> tokenizer -> MIM under ``work``; returns the MIM checkpoint (our format, ViT-T)."""
    store, tokenizer, mim, log = work / "corpus", work / "tokenizer", work / "mim", work / "pretrain.log"
    # convert resumes by itself (unchanged items are skipped), so it always runs: seconds
    run_logged(_cli("corpus", "convert", "--out", str(store), *[str(data / s) for s in PRETRAIN_SCANS]),
               dict(os.environ, PYTHONUNBUFFERED="1"), log)
    steps = budget.tokenizer_steps
    tok = _stage(_cli("pretrain", "tokenizer", "--data", str(store), "--out", str(tokenizer), "--preset", "tiny",
                      "--no-perceptual", "--val-every", str(steps), "--max-val-images", "2",
                      "--log-every", str(max(steps // 20, 1)), *_common(steps, 1, device)),
                 tokenizer, "pumit_tokenizer_final.pth", log)
    steps = budget.mim_steps
    return _stage(_cli("pretrain", "mim", "--data", str(store), "--tokenizer", str(tok), "--out", str(mim),
                       "--vit", "T", "--image-every", str(steps), "--log-every", str(max(steps // 20, 1)),
                       *_common(steps, 2, device)),
                  mim, "pumit_mim_final.pth", log)
