"""Atomic file writes shared by every layer: readers never see half a file, an interrupted write loses nothing.

Everything is written to a temporary file in the target's folder (same file system), flushed, then moved over
the target with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["IMAGE_ENDINGS", "atomic_path", "atomic_write_bytes", "write_text_atomic", "write_json_atomic",
           "write_image_atomic"]

#: file endings SimpleITK reads (longest first so ".nii.gz" wins over ".gz")
IMAGE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff")


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target`` in one step."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: Path | str, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, data: Any, indent: int = 2) -> None:
    """JSON; NaN and inf are written as ``NaN``/``Infinity`` (as nnU-Net's summary.json)."""
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_image_atomic(image: Any, path: Path | str, compress: bool = True) -> None:
    """Write a SimpleITK image atomically; the temporary file keeps the ending so the format is chosen right."""
    import SimpleITK as sitk

    path = Path(path)
    ending = next((e for e in IMAGE_ENDINGS if path.name.endswith(e)), path.suffix)
    with atomic_path(path) as tmp:
        with_ending = tmp.with_name(tmp.name + ending)
        try:
            sitk.WriteImage(image, str(with_ending), compress)
            os.replace(with_ending, tmp)
        finally:
            if with_ending.exists():
                with_ending.unlink()
