"""Atomic, ``weights_only``-loadable training checkpoints and the RNG state needed for exact resume.

Everything stored is tensors, numbers, strings, lists, tuples and dicts, so ``torch.load(weights_only=True)``
reads it: no pickled classes, and a checkpoint can never run code on load.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from pumit_nnunet.checkpoints.format import CheckpointError, atomic_torch_save
from pumit_nnunet.checkpoints.readers import torch_load_checked

__all__ = ["save_checkpoint_atomic", "load_checkpoint", "capture_rng_state", "restore_rng_state"]


def save_checkpoint_atomic(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` with ``torch.save`` to a temp file beside ``path``, then ``os.replace`` it into place.

    A crash mid-write leaves the previous checkpoint intact (``os.replace`` is atomic within one folder).
    """
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A training state written by :func:`save_checkpoint_atomic`, read by the package's one weights-only loader
    (:func:`~pumit_nnunet.checkpoints.readers.torch_load_checked`: ``FileNotFoundError`` or ``CheckpointError``,
    a ``ValueError``, naming the file)."""
    state = torch_load_checked(path, map_location=map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"holds a {type(state).__name__}, expected a dict (a training state)", path)
    return state


def _numpy_state_to_plain(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and (when present) every CUDA generator, as weights-only-safe plain types."""
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states are restored only when this process has as many GPUs)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
