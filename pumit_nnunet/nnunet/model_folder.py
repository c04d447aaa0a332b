"""Certify an nnU-Net results folder before predicting with it: every ``fold_*/checkpoint_*.pth`` must load
weights-only (no pickled code can run) and hold finite network weights.

nnU-Net's predictor reads checkpoints with ``torch.load(weights_only=False)``, which runs whatever a crafted file
pickled. Under ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` PyTorch refuses such files instead; this check applies the same
rule ahead of time (and adds finiteness), so a folder it certifies predicts under that variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pumit_nnunet.checkpoints.format import CheckpointError
from pumit_nnunet.checkpoints.safety import load_weights_only, require_finite
from pumit_nnunet.errors import DataError

__all__ = ["CheckpointVerdict", "model_folder_checkpoints", "check_results_checkpoint", "check_model_folder"]

#: what nnU-Net's predictor reads from a checkpoint
REQUIRED_KEYS = ("network_weights", "trainer_name", "init_args")


@dataclass(frozen=True)
class CheckpointVerdict:
    """The outcome for one checkpoint file: ``problem`` is ``None`` when it is safe to predict with."""

    path: Path
    problem: str | None = None
    tensors: int = 0
    trainer: str = ""
    epoch: int | None = None

    def line(self) -> str:
        """One report line: ``ok  <file> (...)`` or ``BAD <file>: <problem>``."""
        if self.problem is not None:
            return f"BAD {self.path}: {self.problem}"
        return f"ok  {self.path} ({self.tensors} tensors, trainer {self.trainer}, epoch {self.epoch})"


def model_folder_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Every ``fold_*/checkpoint_*.pth`` below ``folder`` (an nnU-Net results root, dataset or model folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(folder)) if folder.exists() else \
            FileNotFoundError(2, "No such file or directory", str(folder))
    return sorted(p for p in folder.rglob("checkpoint_*.pth") if p.parent.name.startswith("fold_"))


def check_results_checkpoint(path: Path) -> CheckpointVerdict:
    """Load one results checkpoint weights-only and check what the predictor needs is there and finite."""
    try:
        checkpoint = load_weights_only(path)
        if not isinstance(checkpoint, Mapping) or any(key not in checkpoint for key in REQUIRED_KEYS):
            keys = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
            raise CheckpointError(f"not an nnU-Net results checkpoint (needs {', '.join(REQUIRED_KEYS)}; has {keys})")
        weights = checkpoint["network_weights"]
        if not isinstance(weights, Mapping) or not weights:
            raise CheckpointError("'network_weights' holds no state dict")
        require_finite(weights)
    except (CheckpointError, OSError) as error:
        return CheckpointVerdict(path, getattr(error, "problem", None) or str(error))
    return CheckpointVerdict(path, None, len(weights), str(checkpoint["trainer_name"]), checkpoint.get("current_epoch"))


def check_model_folder(folder: str | os.PathLike) -> list[CheckpointVerdict]:
    """Check every checkpoint of ``folder``; raises :class:`DataError` when it holds none."""
    paths = model_folder_checkpoints(folder)
    if not paths:
        raise DataError("no fold_*/checkpoint_*.pth below this folder; is it an nnU-Net results folder?", folder)
    return [check_results_checkpoint(path) for path in paths]
