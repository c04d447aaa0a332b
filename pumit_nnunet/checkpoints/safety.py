"""Checks every checkpoint passes before its weights are used: loads weights-only, holds a torch file, is finite.

- :func:`load_weights_only` is the one checkpoint loader: ``torch.load(weights_only=True)`` with, by default, no
  extra allowed globals: exactly what PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` makes nnU-Net's predictor do,
  so a file it accepts is a file the safe prediction path accepts. Its refusals are one-line
  :class:`CheckpointError` instances. (The general reader, :func:`~pumit_nnunet.checkpoints.readers.torch_load_checked`,
  calls it with inert stand-ins for foreign classes to read third-party Lightning files.)
- :func:`torch_file_problem` recognises files that are not torch checkpoints at all (a text file once gave
  ``KeyError: 101``, the byte ``e``).
- :func:`first_nonfinite` / :func:`require_finite` name the tensors holding NaN or Inf.
- Values are made weights-only loadable by :func:`~pumit_nnunet.checkpoints.layout.storable` (the bottom module,
  so the checkpoint layout can use it too).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from pumit_nnunet.checkpoints.layout import CheckpointError

__all__ = ["NonFiniteWeightsError", "torch_file_problem", "load_weights_only", "first_nonfinite", "require_finite"]

#: how many offending tensors an error names
_NAMED = 3
#: a legacy (non-zip) torch file is a pickle of protocol 2 or higher: it starts with the PROTO opcode
_PICKLE_PROTO = 0x80
_ZIP_MAGIC = b"PK\x03\x04"


class NonFiniteWeightsError(CheckpointError):
    """Weights hold NaN or Inf values (a diverged run, a corrupted file)."""


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint (absent problems: ``None``); looks at the first bytes only."""
    if not path.is_file():
        return "is not a file"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes), not a torch checkpoint"
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO:
        return None
    kind = "a text file" if _looks_like_text(head) else "an unknown binary file"
    return f"is not a torch checkpoint ({size} bytes of {kind}, starting {head[:12]!r})"


def _looks_like_text(head: bytes) -> bool:
    try:
        return head.decode("utf-8").isprintable() or "\n" in head.decode("utf-8")
    except UnicodeDecodeError:
        return False


def load_weights_only(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                      stand_ins: Callable[[Path], list[tuple[type, str]]] | None = None) -> Any:
    """``torch.load(weights_only=True)``; refusals are :class:`CheckpointError`\\ s naming the file and the first
    forbidden global (the payload is never run).

    ``stand_ins`` (zip files only) lists the ``(class, "module.name")`` pairs allowed for this one load, computed
    from the file; it may refuse by raising :class:`pickle.UnpicklingError`. Without it no extra global is allowed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    problem = torch_file_problem(path)
    if problem is not None:  # a text file once surfaced as "KeyError: 101" (the byte 'e')
        raise CheckpointError(problem, path)
    try:
        if stand_ins is None or not zipfile.is_zipfile(path):
            return torch.load(path, map_location=map_location, weights_only=True)
        with torch.serialization.safe_globals(stand_ins(path)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise CheckpointError(
            "refused: the file holds pickled objects that weights-only loading does not run"
            f" ({f'first: {blocked.group(1)}' if blocked else _first_line(error)}); they may execute code, so do not"
            " load it with weights_only=False unless you trust its author", path) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot be read; it is truncated or not a torch checkpoint: {_first_line(error)}",
                              path) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def first_nonfinite(state: Mapping[str, Any], limit: int = _NAMED) -> list[str]:
    """Names (with counts) of the first ``limit`` floating tensors holding NaN or Inf, in state-dict order."""
    bad = []
    for name, value in _tensors(state):
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad.append(f"{name} ({int((~finite).sum())} of {value.numel()} values non-finite)")
                if len(bad) == limit:
                    break
    return bad


def _tensors(state: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Tensor]]:
    for key, value in state.items():
        if isinstance(value, Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, Mapping):
            yield from _tensors(value, f"{prefix}{key}.")


def require_finite(state: Mapping[str, Any], source: str | os.PathLike | None = None) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first non-finite tensors of ``state``."""
    bad = first_nonfinite(state)
    if bad:
        raise NonFiniteWeightsError(f"weights hold NaN/Inf values: {', '.join(bad)}"
                                    + (" ..." if len(bad) == _NAMED else ""), source)
