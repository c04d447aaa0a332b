"""Pre-trained weights: our checkpoint format, readers for the released PUMIT, EVA-02 (original and timm) and
nnU-Net checkpoints, pure conversions to any :class:`~pumit_nnunet.models.vit.ViTConfig`, and load reports.

Names are imported lazily (PEP 562) so that ``pumit-nnunet --help``, which imports :mod:`.cli`, stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaptationPlan": "format",
    "CheckpointError": "format",
    "PretrainPlan": "format",
    "PumitCheckpoint": "format",
    "VIT_ADAPTATION": "format",
    "load_pumit_checkpoint": "format",
    "save_pumit_checkpoint": "format",
    "LoadReport": "report",
    "SourceWeights": "readers",
    "read_weights": "readers",
    "load_vit_weights": "load",
    "convert_checkpoint": "tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
