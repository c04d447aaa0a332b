"""Writing nnU-Net v2 raw datasets: placing source files, ``dataset.json`` and ``splits_final.json``.

Sources are never modified: files are symlinked (default) or copied into the dataset, and an existing target is
left alone when it already is that source (so a conversion can be re-run to resume) and refused otherwise.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import atomic_path, atomic_write_bytes, symlink_atomic, write_json_atomic

PlaceMode = Literal["symlink", "copy"]
Fold = dict[str, list[str]]


def raw_dataset_dir(dataset_id: int, name: str, nnunet_raw: str | os.PathLike | None = None) -> Path:
    """``$nnUNet_raw/DatasetXXX_Name`` (or under ``nnunet_raw``), failing clearly when the variable is unset."""
    root = nnunet_raw or os.environ.get("nnUNet_raw")
    if not root:
        raise UsageError("nnUNet_raw is not set: export it or give the output folder explicitly")
    return Path(root) / f"Dataset{dataset_id:03d}_{name}"


def place_file(source: Path, target: Path, mode: PlaceMode = "symlink") -> None:
    """Symlink or copy ``source`` to ``target``; a target that already is the source is kept (resumable)."""
    source = Path(source).resolve()
    if not source.is_file():
        raise DataError("source file does not exist", source)
    if target.exists() or target.is_symlink():
        if _is_same_placement(source, target, mode):
            return
        raise DataError(f"exists and is not {source}; remove it or choose another output folder", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        symlink_atomic(source, target)
    elif mode == "copy":
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    else:
        raise ValueError(f"unknown mode {mode!r}: use 'symlink' or 'copy'")


def _is_same_placement(source: Path, target: Path, mode: PlaceMode) -> bool:
    if mode == "symlink":
        return target.is_symlink() and target.resolve() == source
    return target.is_file() and filecmp.cmp(source, target, shallow=False)


def write_dataset_json(
    dataset_dir: Path,
    channel_names: Mapping[int, str],
    labels: Mapping[str, int],
    num_training_cases: int,
    file_ending: str = ".nii.gz",
    **extra: Any,
) -> Path:
    """``dataset.json`` through nnU-Net's own ``generate_dataset_json`` (written to a temp folder, then moved)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    dataset_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dataset_dir, prefix=".dataset_json.") as tmp:
        generate_dataset_json(
            tmp,
            channel_names={str(k): v for k, v in channel_names.items()},
            labels=dict(labels),
            num_training_cases=num_training_cases,
            file_ending=file_ending,
            **extra,
        )
        atomic_write_bytes(dataset_dir / "dataset.json", (Path(tmp) / "dataset.json").read_bytes())
    return dataset_dir / "dataset.json"


def check_folds(folds: Sequence[Fold], cases: Sequence[str]) -> None:
    """Every fold's train and val must be disjoint and drawn from ``cases``."""
    known = set(cases)
    for index, fold in enumerate(folds):
        train, val = set(fold["train"]), set(fold["val"])
        if train & val:
            raise DataError(f"fold {index}: cases in both train and val: {sorted(train & val)}")
        unknown = (train | val) - known
        if unknown:
            raise DataError(f"fold {index}: cases not in the dataset: {sorted(unknown)}")


def write_splits(path: Path, folds: Sequence[Fold]) -> None:
    """A ``splits_final.json``-style list of ``{"train": [...], "val": [...]}`` folds, written atomically."""
    write_json_atomic(path, [{"train": list(f["train"]), "val": list(f["val"])} for f in folds])
