"""The official MedMNIST v2/v3 ``.npz`` files, read from a local path (nothing is ever downloaded).

A file ``{flag}.npz`` (28^3) or ``{flag}_64.npz`` (64^3) holds ``{train,val,test}_images`` (uint8, ``(N, 28, 28, 28)``
for the 3D sets) and ``{train,val,test}_labels`` (``(N, 1)`` for single-label tasks, ``(N, L)`` for multi-label).
The official loader divides by 255 and, with ``as_rgb``, replicates the grey channel three times; the authors'
fine-tuning then interpolates trilinearly to the pre-training scale (160^3). :func:`model_input` does exactly that.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pumit_nnunet.evaluation.medmnist_metrics import BINARY, MULTI_CLASS
from pumit_nnunet.io import atomic_path

__all__ = ["MedMNISTInfo", "MEDMNIST_3D", "SPLITS", "MedMNISTSplit", "medmnist_info", "npz_path",
           "load_medmnist", "save_medmnist_npz", "model_input"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class MedMNISTInfo:
    """What the official ``medmnist.INFO`` says about one dataset (facts only)."""

    flag: str
    task: str
    n_classes: int
    n_samples: Mapping[str, int]

    @property
    def n_outputs(self) -> int:
        """Width of the classifier head: one logit per class (binary tasks keep two, as the authors' code)."""
        return self.n_classes


def _info(flag: str, task: str, n_classes: int, train: int, val: int, test: int) -> MedMNISTInfo:
    return MedMNISTInfo(flag, task, n_classes, {"train": train, "val": val, "test": test})


#: the six 3D datasets of MedMNIST v2 (the paper's downstream classification benchmarks)
MEDMNIST_3D: dict[str, MedMNISTInfo] = {
    info.flag: info
    for info in (
        _info("organmnist3d", MULTI_CLASS, 11, 971, 161, 610),
        _info("nodulemnist3d", BINARY, 2, 1158, 165, 310),
        _info("adrenalmnist3d", BINARY, 2, 1188, 98, 298),
        _info("fracturemnist3d", MULTI_CLASS, 3, 1027, 103, 240),
        _info("vesselmnist3d", BINARY, 2, 1335, 191, 382),
        _info("synapsemnist3d", BINARY, 2, 1230, 177, 352),
    )
}


def medmnist_info(flag: str) -> MedMNISTInfo:
    """Info of a 3D dataset; ``organ`` and ``organmnist3d`` both work."""
    key = flag.lower()
    key = key if key.endswith("mnist3d") else f"{key}mnist3d"
    try:
        return MEDMNIST_3D[key]
    except KeyError:
        raise ValueError(f"unknown MedMNIST-3D dataset {flag!r}; one of {sorted(MEDMNIST_3D)}") from None


def npz_path(root: str | os.PathLike, flag: str, size: int = 28) -> Path:
    """Where the official file lies: ``root/{flag}.npz`` for 28^3, ``root/{flag}_{size}.npz`` otherwise."""
    info = medmnist_info(flag)
    if size not in (28, 64):
        raise ValueError(f"MedMNIST-3D comes in sizes 28 and 64, not {size}")
    return Path(root) / (f"{info.flag}.npz" if size == 28 else f"{info.flag}_{size}.npz")


@dataclass
class MedMNISTSplit:
    """One split: ``images`` uint8 ``(N, S, S, S)`` and integer ``labels`` ``(N, L)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _check_split(path: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or len(set(images.shape[1:])) != 1:
        raise ValueError(f"{path}: {split}_images has shape {images.shape}, expected (N, S, S, S) cubes")
    if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: {split}_labels has shape {labels.shape}, expected ({images.shape[0]}, L)")


def load_medmnist(path: str | os.PathLike, splits: Sequence[str] = SPLITS) -> dict[str, MedMNISTSplit]:
    """Read an official MedMNIST-3D ``.npz``; fails naming the file and the missing key or bad shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path} (download it yourself from the MedMNIST website)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from error
    with archive:
        missing = [f"{s}_{k}" for s in splits for k in ("images", "labels") if f"{s}_{k}" not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; found {sorted(archive.files)}")
        out = {}
        for split in splits:
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            _check_split(path, split, images, labels)
            out[split] = MedMNISTSplit(images, labels.astype(np.int64))
    return out


def save_medmnist_npz(path: str | os.PathLike, data: Mapping[str, MedMNISTSplit]) -> None:
    """Write splits in the official layout (uncompressed ``np.savez``, as the released files), atomically."""
    arrays = {}
    for split, part in data.items():
        arrays[f"{split}_images"] = np.asarray(part.images, dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(part.labels, dtype=np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def model_input(images: np.ndarray, size: int | None, channels: int = 3, device: str | None = None):
    """uint8 ``(B, S, S, S)`` -> float ``(B, channels, size, size, size)`` in [0, 1], trilinear (``align_corners=False``).

    ``size=None`` keeps the stored resolution.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(images), device=device).float().div_(255.0).unsqueeze(1)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size, size), mode="trilinear", align_corners=False)
    return x.expand(-1, channels, -1, -1, -1)
