"""Malicious checkpoints for the safety tests: unpickling them with ``weights_only=False`` creates a marker file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class MarkerPayload:
    """Pickles as ``open(marker, "w")``: any loader that runs pickled code creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def write_malicious_checkpoint(path: Path, marker: Path, like: dict[str, Any] | None = None, legacy: bool = False) -> Path:
    """A checkpoint that looks like ``like`` (e.g. a real results checkpoint) with the payload inside.

    ``legacy``: a bare pickle instead of torch's zip container (torch reads both)."""
    content = dict(like or {"network_weights": {"w": torch.zeros(2)}})
    content["init_args"] = {**content.get("init_args", {}), "payload": MarkerPayload(marker)}
    if legacy:
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    else:
        torch.save(content, path)
    return path
