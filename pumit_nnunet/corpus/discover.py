"""Finding what to convert under a source folder: nnU-Net/MSD raw datasets, catalog layouts, plain folders.

Every image file and every DICOM series becomes one ``SourceItem`` (a DICOM folder holding several series
yields one item per series; a one-file series is a 2D image). In a plain folder (no catalog layout) a file that
is not an image becomes an item with an ``error``, so that the run records it as a failure and goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from pumit_nnunet.corpus.catalog import (MODALITY_FROM_DATASET_JSON, MODALITY_FROM_DICOM, DatasetSpec,
                                         duplicate_group_weight)
from pumit_nnunet.corpus.metaimage import detached_data_name
from pumit_nnunet.corpus.readers import DICOM_SUFFIXES, is_image_path, looks_like_dicom

_IGNORED_NAMES = {"dataset.json", "README.md", "readme.txt", "LICENSE", ".DS_Store"}
_STRIP_SUFFIXES = (".nii.gz",) + tuple(f".{s}" for s in ("nii", "nrrd", "nhdr", "mha", "mhd", "png", "jpg", "jpeg", "tif",
                                                            "tiff", "bmp", "dcm", "dicom", "ima"))


@dataclass(frozen=True)
class SourceItem:
    """One thing to convert: an image file or a DICOM series, with everything the worker needs."""

    key: str
    dataset: str
    path: str
    modality: str = MODALITY_FROM_DICOM
    files: tuple[str, ...] = ()
    weight: float = 1.0
    depth_axis: str = "auto"
    sequence_4d: str = "duplicates"
    channel_modalities: tuple[str, ...] = ()
    min_slices: int = 0
    multiplier: float = 1.0
    error: str = ""
    fingerprint: str = ""  # set by the conversion run (``fingerprint.quick_fingerprint``)


def modality_from_channel_name(name: str) -> str:
    """nnU-Net ``channel_names`` -> corpus modality: CT stays CT, other channels of scans are MR sequences."""
    clean = name.strip()
    upper = clean.upper()
    if upper == "CT":
        return "CT"
    if upper in ("MR", "MRI"):
        return "MRI"
    if upper in ("R", "G", "B", "RGB"):
        return "RGB/photo"
    return f"MRI/{clean}"


def _strip_suffix(relative: str) -> str:
    lower = relative.lower()
    for suffix in _STRIP_SUFFIXES:
        if lower.endswith(suffix):
            return relative[: -len(suffix)]
    return relative


def _item(spec: DatasetSpec, root: Path, path: Path, modality: str, **extra) -> SourceItem:
    relative = path.relative_to(root).as_posix() if path != root else path.name
    return SourceItem(key=f"{spec.name}/{_strip_suffix(relative)}", dataset=spec.name, path=str(path), modality=modality,
                      depth_axis=spec.depth_axis, sequence_4d=spec.sequence_4d, multiplier=spec.multiplier, **extra)


def _dicom_series(folder: Path, files: list[Path]) -> list[tuple[Path, tuple[str, ...], str]]:
    """(path, series files, key suffix) per DICOM series in one folder; one-file series are plain files."""
    import SimpleITK as sitk

    if len(files) == 1:
        return [(files[0], (), "")]
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    out = []
    for uid in series_ids:
        names = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        if len(names) == 1:
            out.append((Path(names[0]), (), ""))
        else:
            suffix = "" if len(series_ids) == 1 else "/" + hashlib.sha1(uid.encode()).hexdigest()[:10]
            out.append((folder, names, suffix))
    grouped = {Path(n) for _, names, _ in out for n in names} | {p for p, names, _ in out if not names}
    out.extend((f, (), "") for f in files if f not in grouped)  # GDCM skipped these: let the worker report why
    return out


UNREADABLE = "unreadable"


def _folder_problem(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename}"
    return " ".join(f"unreadable folder: {error}".split())


def _walk(root: Path):
    """Yield (path, files of a DICOM series or (), key suffix, kind) for everything under ``root``; kind is
    "image", "other", or ``UNREADABLE`` with the reason (a folder that cannot be listed is reported, not
    silently left out, and the rest of the walk goes on)."""
    unreadable: list[OSError] = []
    for folder, dirs, names in os.walk(root, onerror=unreadable.append):
        yield from ((Path(e.filename), (), "", (UNREADABLE, _folder_problem(e))) for e in unreadable)
        unreadable.clear()
        dirs.sort()
        folder_path = Path(folder)
        dicoms, others = [], []
        for name in sorted(names):
            if name.startswith(".") or name in _IGNORED_NAMES:
                continue
            path = folder_path / name
            is_dicom = name.lower().endswith(DICOM_SUFFIXES) or ("." not in name and looks_like_dicom(path))
            (dicoms if is_dicom else others).append(path)
        detached = {detached_data_name(p) for p in others if p.suffix.lower() in (".mhd", ".nhdr")}
        others = [p for p in others if p.name not in detached]  # the data of a header beside it, read with it
        for path, files, suffix in (_dicom_series(folder_path, dicoms) if dicoms else ()):
            yield path, files, suffix, ("image", "")
        for path in others:
            yield path, (), "", ("image", "") if is_image_path(path) else ("other", "")
    yield from ((Path(e.filename), (), "", (UNREADABLE, _folder_problem(e))) for e in unreadable)


def _apply_duplicate_groups(items: list[SourceItem], patterns: dict[str, tuple[str, str | None]]) -> list[SourceItem]:
    """Near-duplicate files of one group weigh (2n-1)/n² each; a group's b0 file (``b0_pattern``) keeps 1 and
    the n others share, as the authors weight IXI DTI."""
    names = {item.key: Path(item.path).name for item in items}
    group_of = {}
    for key, (pattern, _) in patterns.items():
        match = re.search(pattern, names[key])
        if match:
            group_of[key] = match.group(1)
    is_b0 = {key: bool(b0 and re.search(b0, names[key])) for key, (_, b0) in patterns.items()}
    sizes = Counter(group_of[k] for k in group_of if not is_b0[k])
    out = []
    for item in items:
        if item.key in group_of:
            weight = 1.0 if is_b0[item.key] else duplicate_group_weight(max(sizes[group_of[item.key]], 1))
            item = replace(item, weight=weight)
        out.append(item)
    return out


def discover_layout(root: Path, spec: DatasetSpec) -> list[SourceItem]:
    """Items under ``root`` matched by the dataset's layout patterns (unmatched files are not its images)."""
    items, duplicate_patterns = [], {}
    for path, files, suffix, (kind, problem) in _walk(root):
        if kind == UNREADABLE:
            items.append(_item(spec, root, path, "", error=problem))
            continue
        layout = spec.match(path.relative_to(root).as_posix())
        if layout is None or (files and len(files) < layout.min_slices):
            continue
        item = _item(spec, root, path, layout.modality, files=files, min_slices=layout.min_slices)
        item = replace(item, key=item.key + suffix)
        if layout.duplicate_group:
            duplicate_patterns[item.key] = (layout.duplicate_group, layout.b0_pattern)
        items.append(item)
    return _apply_duplicate_groups(items, duplicate_patterns)


def discover_plain(root: Path, spec: DatasetSpec, modality: str = MODALITY_FROM_DICOM) -> list[SourceItem]:
    """Every image and DICOM series under ``root``; other files become failure items."""
    if root.is_file():
        return [_item(spec, root.parent, root, modality)]
    items = []
    for path, files, suffix, (kind, problem) in _walk(root):
        error = problem or ("" if kind == "image" else
                            f"not an image file (unsupported type {path.suffix or 'without extension'!r})")
        item = _item(spec, root, path, modality, files=files, error=error)
        items.append(replace(item, key=item.key + suffix))
    return items


def is_nnunet_raw(root: Path) -> bool:
    return (root / "dataset.json").is_file() and (root / "imagesTr").is_dir()


def discover_nnunet_raw(root: Path, spec: DatasetSpec, modality: str = "") -> list[SourceItem]:
    """nnU-Net v2 (``case_XXXX`` per channel) or MSD (4D multi-modal files) raw dataset: imagesTr and imagesTs."""
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    channels = {int(k): v for k, v in (meta.get("channel_names") or meta.get("modality") or {}).items()}
    channel_modalities = tuple(modality or modality_from_channel_name(channels[i]) for i in sorted(channels))
    ending = meta.get("file_ending", ".nii.gz")
    items = []
    for folder in ("imagesTr", "imagesTs"):
        for path in sorted((root / folder).glob(f"*{ending}")) if (root / folder).is_dir() else ():
            if path.name.startswith("."):
                continue
            match = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), path.name)
            channel = int(match.group(2)) if match and "channel_names" in meta else None
            if channel is not None:
                image_modality = channel_modalities[channel] if channel < len(channel_modalities) else "unknown"
                items.append(_item(spec, root, path, image_modality))
            else:  # MSD: one 4D file per case, the sequence axis holds the modalities
                item = _item(spec, root, path, channel_modalities[0] if channel_modalities else "unknown",
                             channel_modalities=channel_modalities)
                items.append(replace(item, sequence_4d="channels"))
    return items


def discover(root: str | os.PathLike, spec: DatasetSpec, modality: str = "") -> list[SourceItem]:
    """Items of one source folder (or file) for dataset ``spec``; ``modality`` overrides what layouts say."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"source not found: {root}")
    if root.is_dir() and is_nnunet_raw(root):
        return discover_nnunet_raw(root, spec, modality)
    if spec.layouts and root.is_dir():
        items = discover_layout(root, spec)
        return [replace(i, modality=modality) for i in items] if modality else items
    return discover_plain(root, spec, modality or MODALITY_FROM_DICOM)


def select_part(items: list[SourceItem], part: int, parts: int) -> list[SourceItem]:
    """The share of part ``part`` of ``parts`` (stable across machines: by a hash of the key)."""
    if not 0 <= part < parts:
        raise ValueError(f"--part must be in [0, {parts}), got {part}")
    return [i for i in items if int(hashlib.sha1(i.key.encode()).hexdigest(), 16) % parts == part]


__all__ = ["SourceItem", "discover", "select_part", "modality_from_channel_name", "MODALITY_FROM_DATASET_JSON"]
