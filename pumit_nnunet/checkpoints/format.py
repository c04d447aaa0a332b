"""Our own checkpoint format: writing and reading files of it.

The dict layout (``format``, ``kind``, ``architecture``, ``pretrain_plan``, ``adaptation``, ``extra``,
``state_dict``) and its validation live in :mod:`.layout`; this module adds the file side: atomic writes through
:mod:`pumit_nnunet.io` and reads through the one weights-only loader,
:func:`~pumit_nnunet.checkpoints.safety.load_weights_only` (via
:func:`~pumit_nnunet.checkpoints.readers.torch_load_checked`), with the weights checked for non-finite values.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from pumit_nnunet import __version__
from pumit_nnunet.checkpoints.layout import (CHECKPOINT_KINDS, FORMAT_NAME, FORMAT_VERSION, VIT_ADAPTATION,
                                             AdaptationPlan, CheckpointError, PretrainPlan, PumitCheckpoint,
                                             checkpoint_from_dict, is_pumit_checkpoint, storable)
from pumit_nnunet.checkpoints.readers import torch_load_checked
from pumit_nnunet.checkpoints.safety import require_finite
from pumit_nnunet.io import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CHECKPOINT_KINDS",
    "PretrainPlan",
    "AdaptationPlan",
    "PumitCheckpoint",
    "VIT_ADAPTATION",
    "CheckpointError",
    "save_pumit_checkpoint",
    "load_pumit_checkpoint",
    "is_pumit_checkpoint",
    "checkpoint_from_dict",
    "atomic_torch_save",
    "storable",
]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace`` (no half-written files)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())


def save_pumit_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    state_dict: Mapping[str, torch.Tensor],
    architecture: Mapping[str, Any],
    pretrain_plan: PretrainPlan | None = None,
    adaptation: AdaptationPlan | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint of our format atomically; it records the package version.

    ``architecture`` is the model's config dict (e.g. ``ViTConfig.to_dict()``); ``extra`` may hold anything plain
    (step, optimiser state, manifests); tensors are moved to the CPU.
    """
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {CHECKPOINT_KINDS}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not for {bad[:5]}")
    checkpoint = PumitCheckpoint(
        kind=kind,
        state_dict=dict(state_dict),
        architecture=dict(architecture),
        pretrain_plan=pretrain_plan,
        adaptation=adaptation,
        extra=dict(extra or {}),
        version=__version__,
    )
    atomic_torch_save(checkpoint.to_dict(), path)


def load_pumit_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PumitCheckpoint:
    """Read a checkpoint of our format (``weights_only=True``); clear errors for absent, broken or non-finite files."""
    checkpoint = checkpoint_from_dict(torch_load_checked(path, map_location=map_location), source=str(path))
    require_finite(checkpoint.state_dict, path)  # a diverged run's weights must not seed another run
    return checkpoint
