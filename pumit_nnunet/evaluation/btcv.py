"""BTCV (Synapse "Multi-Atlas Labeling Beyond the Cranial Vault", abdomen): conversion, splits, leaderboard export.

Source layout (the public ``RawData.zip``): ``RawData/Training/img/img0001.nii.gz``,
``RawData/Training/label/label0001.nii.gz`` and ``RawData/Testing/img/img0061.nii.gz``; ``Training/``/``Testing/``
directly under the root and a flat ``img/`` + ``label/`` pair (images without a label are test cases) work too.
Target: an nnU-Net v2 raw dataset with ``imagesTr/BTCV_0001_0000.nii.gz``, ``labelsTr/BTCV_0001.nii.gz`` and
``imagesTs/BTCV_0061_0000.nii.gz``, a ``dataset.json`` and the split files of the three protocols people report.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.evaluation.files import check_same_geometry, list_images, read_header, read_label_map

from pumit_nnunet.io import atomic_path
from pumit_nnunet.evaluation.nnunet_raw import (
    Fold,
    PlaceMode,
    check_folds,
    place_file,
    write_dataset_json,
    write_splits,
)

#: the 13 organs (nnU-Net v1 Task017 and the Synapse challenge page); 0 is background
BTCV_LABELS: dict[str, int] = {
    "background": 0,
    "spleen": 1,
    "right kidney": 2,
    "left kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior vena cava": 9,
    "portal vein and splenic vein": 10,
    "pancreas": 11,
    "right adrenal gland": 12,
    "left adrenal gland": 13,
}
CASE_PREFIX = "BTCV"
SPLIT_PROTOCOLS: tuple[str, ...] = ("smit", "nnunet5fold", "monai")


def _ids(*ranges: tuple[int, int]) -> list[str]:
    return [f"{i:04d}" for first, last in ranges for i in range(first, last + 1)]


# SMIT's dataset_0.json as stored in PUMIT (downstream/data/BTCV/smit.json): 21 train / 9 validation; the paper
# reports on the 9 validation cases.
SMIT_TRAIN = _ids((1, 10), (21, 28), (33, 33), (35, 35), (38, 38))
SMIT_VAL = _ids((29, 32), (34, 34), (36, 37), (39, 40))
# MONAI's BTCV dataset_0.json (UNETR/SwinUNETR tutorials): 24 training cases 0001-0010 + 0021-0034, validation
# 0035-0040. Verified against several public copies of that file found through the code search (they carry the
# tutorial's "btcv yucheng" description and the same training/validation lists).
MONAI_TRAIN = _ids((1, 10), (21, 34))
MONAI_VAL = _ids((35, 40))


def case_name(case_id: str) -> str:
    return f"{CASE_PREFIX}_{case_id}"


@dataclass(frozen=True)
class BtcvSource:
    """Located BTCV files by 4-digit case id."""

    train_images: dict[str, Path]
    train_labels: dict[str, Path]
    test_images: dict[str, Path]


def _by_case_id(folder: Path, prefix: str) -> dict[str, Path]:
    found = {}
    for stem, path in list_images(folder).items():
        match = re.fullmatch(rf"{prefix}(\d+)", stem)
        if match:
            found[match.group(1).zfill(4)] = path
    return found


def find_btcv_source(root: Path | str) -> BtcvSource:
    """Locate images and labels in any of the accepted layouts; fail naming what is missing."""
    root = Path(root)
    for base in (root / "RawData", root):
        if (base / "Training" / "img").is_dir():
            images = _by_case_id(base / "Training" / "img", "img")
            labels = _by_case_id(base / "Training" / "label", "label")
            test_dir = base / "Testing" / "img"
            tests = _by_case_id(test_dir, "img") if test_dir.is_dir() else {}
            return _checked_source(images, labels, tests, base / "Training")
    if (root / "img").is_dir() and (root / "label").is_dir():
        images, labels = _by_case_id(root / "img", "img"), _by_case_id(root / "label", "label")
        tests = {case: path for case, path in images.items() if case not in labels}
        return _checked_source({c: images[c] for c in labels if c in images}, labels, tests, root)
    raise DataError("no BTCV layout: expected RawData/Training/img, Training/img or img/+label/", root)


def _checked_source(images: dict, labels: dict, tests: dict, where: Path) -> BtcvSource:
    missing = sorted(set(labels) ^ set(images))
    if missing:
        raise DataError(f"cases with an image but no label or vice versa: {', '.join(missing)}", where)
    if not images:
        raise DataError("no imgXXXX/labelXXXX training files found", where)
    return BtcvSource(images, labels, tests)


def smit_split() -> list[Fold]:
    return [{"train": [case_name(c) for c in SMIT_TRAIN], "val": [case_name(c) for c in SMIT_VAL]}]


def monai_split() -> list[Fold]:
    return [{"train": [case_name(c) for c in MONAI_TRAIN], "val": [case_name(c) for c in MONAI_VAL]}]


def nnunet5fold_split(case_names: Sequence[str]) -> list[Fold]:
    """nnU-Net's own default split: ``generate_crossval_split`` over the sorted cases, seed 12345, 5 folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folds = generate_crossval_split(sorted(case_names), seed=12345, n_splits=5)
    return [{"train": [str(c) for c in f["train"]], "val": [str(c) for c in f["val"]]} for f in folds]


def btcv_splits(case_names: Sequence[str]) -> dict[str, list[Fold]]:
    """The protocols that the given cases support (a fixed split needs all its cases; 5-fold needs five)."""
    present = set(case_names)
    splits = {}
    for protocol, folds in (("smit", smit_split()), ("monai", monai_split())):
        if set(folds[0]["train"] + folds[0]["val"]) <= present:
            splits[protocol] = folds
    if len(present) >= 5:
        splits["nnunet5fold"] = nnunet5fold_split(case_names)
    return {p: splits[p] for p in SPLIT_PROTOCOLS if p in splits}


@dataclass(frozen=True)
class BtcvConversion:
    """What a conversion wrote."""

    dataset_dir: Path
    train_cases: list[str]
    test_cases: list[str]
    split_protocols: list[str]
    splits_final: str | None


def convert_btcv(
    source_root: Path | str, dataset_dir: Path | str, mode: PlaceMode = "symlink", split: str | None = "smit"
) -> BtcvConversion:
    """Place the BTCV files into an nnU-Net raw dataset and write ``dataset.json`` and the split files.

    ``split`` picks the protocol copied to ``splits_final.json`` (None: no ``splits_final.json``, nnU-Net then
    makes its own 5-fold split); all protocols the cases support go to ``splits/<protocol>.json``.
    """
    from tqdm import tqdm

    source, dataset_dir = find_btcv_source(source_root), Path(dataset_dir)
    if split is not None and split not in SPLIT_PROTOCOLS:
        raise UsageError(f"unknown split protocol {split!r}: choose from {', '.join(SPLIT_PROTOCOLS)}")
    jobs = [(p, dataset_dir / "imagesTr" / f"{case_name(c)}_0000.nii.gz") for c, p in source.train_images.items()]
    jobs += [(p, dataset_dir / "labelsTr" / f"{case_name(c)}.nii.gz") for c, p in source.train_labels.items()]
    jobs += [(p, dataset_dir / "imagesTs" / f"{case_name(c)}_0000.nii.gz") for c, p in source.test_images.items()]
    for src, _ in jobs:
        _check_nifti_gz(src)
    for case_id, label_path in source.train_labels.items():  # headers only: a mis-paired label is caught here
        check_same_geometry(read_header(label_path), read_header(source.train_images[case_id]), str(label_path))
    for src, dst in tqdm(jobs, desc="BTCV files", unit="file"):
        place_file(src, dst, mode)
    train_cases = sorted(case_name(c) for c in source.train_images)
    write_dataset_json(
        dataset_dir, {0: "CT"}, BTCV_LABELS, len(train_cases), ".nii.gz", dataset_name=dataset_dir.name,
        reference="https://www.synapse.org/Synapse:syn3193805", release="RawData (2015)",
        description="BTCV abdomen, 13 organs", converted_by="pumit-nnunet convert btcv",
    )
    splits = btcv_splits(train_cases)
    for protocol, folds in splits.items():
        check_folds(folds, train_cases)
        write_splits(dataset_dir / "splits" / f"{protocol}.json", folds)
    if split is not None:
        if split not in splits:
            raise UsageError(f"split {split!r} needs cases missing from this source; use --split none", source_root)
        write_splits(dataset_dir / "splits_final.json", splits[split])
    test_cases = sorted(case_name(c) for c in source.test_images)
    return BtcvConversion(dataset_dir, train_cases, test_cases, list(splits), split)


def _check_nifti_gz(path: Path) -> None:
    if not path.name.endswith(".nii.gz"):
        raise DataError("BTCV files are expected as .nii.gz (nnU-Net needs one file ending per dataset)", path)


# --- leaderboard export --------------------------------------------------------------------------------------------
# The Synapse submission naming could not be confirmed from a public source (the challenge wiki is not in the
# searchable material): we assume one label map per test image, named like the test image (``img0061.nii.gz``) and
# zipped flat. ``name_pattern`` changes it, e.g. "label{case_id}.nii.gz".
DEFAULT_NAME_PATTERN = "img{case_id}.nii.gz"


def export_btcv(
    pred_dir: Path | str,
    dataset_dir: Path | str,
    out_zip: Path | str,
    name_pattern: str = DEFAULT_NAME_PATTERN,
) -> list[str]:
    """Zip the predictions of every test case (``imagesTs``) under the leaderboard names; returns the names.

    Each prediction must exist (``BTCV_0061.nii.gz`` in ``pred_dir``, as ``nnUNetv2_predict`` names it), match the
    test image's voxel grid and hold only labels 0-13; it is written as an 8-bit NIfTI.
    """
    import SimpleITK as sitk

    pred_dir, dataset_dir = Path(pred_dir), Path(dataset_dir)
    test_images = _test_images(dataset_dir)
    _check_name_pattern(name_pattern, list(test_images))
    missing = [c for c in test_images if not (pred_dir / f"{case_name(c)}.nii.gz").is_file()]
    if missing:
        raise DataError(f"no prediction for test cases {', '.join(case_name(c) for c in missing)}", pred_dir)
    names = []
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for case_id, image_path in test_images.items():
            pred_path = pred_dir / f"{case_name(case_id)}.nii.gz"
            prediction, labels = read_label_map(pred_path)  # 0.75 is refused, not truncated to 0 by the cast
            check_same_geometry(prediction, read_header(image_path), str(pred_path))
            values = np.unique(labels)
            if values.min() < 0 or values.max() > max(BTCV_LABELS.values()):
                raise DataError(f"labels {values.tolist()} outside 0-13", pred_path)
            name = name_pattern.format(case_id=case_id)
            archive.writestr(name, _nifti_bytes(sitk.Cast(prediction, sitk.sitkUInt8)))
            names.append(name)
    return names


def _check_name_pattern(pattern: str, case_ids: list[str]) -> None:
    """``--name-pattern`` must give every test case its own name."""
    try:
        names = {pattern.format(case_id=c) for c in case_ids}
    except (KeyError, IndexError, ValueError) as error:
        raise UsageError(f"--name-pattern {pattern!r}: {error!r}; use {{case_id}} for the 4-digit id") from None
    if len(names) != len(case_ids):
        raise UsageError(f"--name-pattern {pattern!r} gives several cases one name; include {{case_id}}")


def _test_images(dataset_dir: Path) -> dict[str, Path]:
    folder = dataset_dir / "imagesTs"
    images = {}
    for stem, path in list_images(folder).items():
        match = re.fullmatch(rf"{CASE_PREFIX}_(\d+)_0000", stem)
        if match:
            images[match.group(1)] = path
    if not images:
        raise DataError(f"no test images {CASE_PREFIX}_XXXX_0000.nii.gz", folder)
    return images


def _nifti_bytes(image: object) -> bytes:
    import tempfile

    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.nii.gz"
        sitk.WriteImage(image, str(path), True)
        return path.read_bytes()
