"""CHAOS MR (ISBI 2019, tasks 3 and 5): conversion of the DICOM/PNG release to an nnU-Net v2 raw dataset.

Source layout: ``<root>/Train_Sets/MR/<id>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm``,
``T1DUAL/Ground/*.png``, ``T2SPIR/DICOM_anon/*.dcm``, ``T2SPIR/Ground/*.png``; ``Test_Sets`` has no ``Ground``.

Each (patient, sequence) becomes one case, ``CHAOS_<id>_T1DUAL`` and ``CHAOS_<id>_T2SPIR``, with two channels:
in/out phase for T1-DUAL, the T2-SPIR image twice (as PUMIT and nnU-Net v1's variant 1 did). Slices are stacked in
DICOM *file-name* order (see :mod:`pumit_nnunet.evaluation.dicom_series`), ground-truth PNGs in their own file-name
order, and the per-case sorted DICOM file list is stored in ``chaos_dicom_order.json`` for the export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pumit_nnunet.errors import DataError
from pumit_nnunet.evaluation.dicom_series import read_dicom_series
from pumit_nnunet.evaluation.files import check_same_geometry
from pumit_nnunet.io import write_image_atomic, write_json_atomic
from pumit_nnunet.evaluation.nnunet_raw import write_dataset_json

CHAOS_LABELS: dict[str, int] = {"background": 0, "liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4}
#: PNG grey value written for each label (the release's encoding)
LABEL_TO_PNG: tuple[int, ...] = (0, 63, 126, 189, 252)
#: PNG grey-value ranges read as each foreground label (nnU-Net v1 Task037/038 tolerances)
PNG_RANGES: dict[int, tuple[int, int]] = {1: (55, 70), 2: (110, 135), 3: (175, 200), 4: (240, 255)}
SEQUENCES: tuple[str, ...] = ("T1DUAL", "T2SPIR")
ORDER_SIDECAR = "chaos_dicom_order.json"


def case_name(patient_id: str, sequence: str) -> str:
    return f"CHAOS_{patient_id}_{sequence}"


def png_to_labels(grey: np.ndarray, where: str = "PNG") -> np.ndarray:
    """Map ground-truth grey values to labels 0-4; any value outside the known ranges is an error."""
    labels = np.zeros(grey.shape, dtype=np.uint8)
    known = grey == 0
    for label, (low, high) in PNG_RANGES.items():
        inside = (grey >= low) & (grey <= high)
        labels[inside] = label
        known |= inside
    if not known.all():
        raise DataError(f"grey values {sorted(set(np.unique(grey[~known]).tolist()))} are no CHAOS label", where)
    return labels


def labels_to_png(labels: np.ndarray, liver_only: bool = False) -> np.ndarray:
    """8-bit grey values of a label slice (Task 5: all organs; Task 3: liver only, 63)."""
    if labels.min() < 0 or labels.max() >= len(LABEL_TO_PNG):
        raise DataError(f"labels {np.unique(labels).tolist()} outside 0-4")
    grey = np.asarray(LABEL_TO_PNG, dtype=np.uint8)[labels]
    return np.where(labels == 1, grey, 0).astype(np.uint8) if liver_only else grey


def read_png_stack(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Grey-value volume (k, rows, cols) of a folder's ``*.png`` in file-name order, and the file names."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError("no .png files", folder)
    slices = []
    for path in files:
        with Image.open(path) as image:
            slices.append(np.asarray(image if image.mode == "L" else image.convert("L")))
    return np.stack(slices), [p.name for p in files]


@dataclass(frozen=True)
class ChaosCase:
    """One (patient, sequence) of the release: its DICOM channel folders and ground-truth folder."""

    patient_id: str
    sequence: str
    split: str  # "train" or "test"
    channel_dirs: tuple[Path, Path]
    ground_dir: Path | None

    @property
    def name(self) -> str:
        return case_name(self.patient_id, self.sequence)


def find_chaos_cases(root: Path | str) -> list[ChaosCase]:
    """All MR cases under ``Train_Sets`` and ``Test_Sets`` (either may be absent, not both)."""
    root = Path(root)
    cases = [case for split, folder in (("train", "Train_Sets"), ("test", "Test_Sets"))
             for case in _cases_in(root / folder / "MR", split)]
    if not cases:
        raise DataError("no CHAOS MR cases (expected Train_Sets/MR/<id>/T1DUAL/...)", root)
    return cases


def _cases_in(mr_dir: Path, split: str) -> Iterator[ChaosCase]:
    if not mr_dir.is_dir():
        return
    for patient in sorted(p for p in mr_dir.iterdir() if p.is_dir()):
        t1, t2 = patient / "T1DUAL", patient / "T2SPIR"
        channels = {"T1DUAL": (t1 / "DICOM_anon" / "InPhase", t1 / "DICOM_anon" / "OutPhase"),
                    "T2SPIR": (t2 / "DICOM_anon", t2 / "DICOM_anon")}
        for sequence in SEQUENCES:
            ground = patient / sequence / "Ground"
            if split == "train" and not ground.is_dir():
                raise DataError("training case without ground truth (no folder)", ground)
            yield ChaosCase(patient.name, sequence, split, channels[sequence], ground if split == "train" else None)


def _checked_second_channel(first: Any, second: Any, second_dir: Path) -> Any:
    """The out-phase series shares the in-phase grid; tiny header differences are forgiven, sizes are not."""
    check_same_geometry(second.image, first.image, str(second_dir), atol_mm=1e-2, atol_direction=1e-3)
    second.image.CopyInformation(first.image)
    return second.image


def convert_case(case: ChaosCase, dataset_dir: Path) -> dict[str, Any]:
    """Write one case's two channels (and label) and return its sidecar entry."""
    import SimpleITK as sitk

    images_dir = dataset_dir / ("imagesTr" if case.split == "train" else "imagesTs")
    first = read_dicom_series(case.channel_dirs[0])
    second = first if case.channel_dirs[1] == case.channel_dirs[0] else read_dicom_series(case.channel_dirs[1])
    second_image = first.image if second is first else _checked_second_channel(first, second, case.channel_dirs[1])
    write_image_atomic(first.image, images_dir / f"{case.name}_0000.nii.gz")
    write_image_atomic(second_image, images_dir / f"{case.name}_0001.nii.gz")
    if case.ground_dir is not None:
        grey, png_files = read_png_stack(case.ground_dir)
        if grey.shape != first.array.shape:
            raise DataError(
                f"{case.ground_dir}: {len(png_files)} PNGs of {grey.shape[1:]} do not match "
                f"{len(first.files)} DICOM slices of {first.array.shape[1:]} in {case.channel_dirs[0]}"
            )
        label = sitk.GetImageFromArray(png_to_labels(grey, str(case.ground_dir)))
        label.CopyInformation(first.image)
        write_image_atomic(label, dataset_dir / "labelsTr" / f"{case.name}.nii.gz")
    rows, cols = first.array.shape[1:]
    return {"patient_id": case.patient_id, "sequence": case.sequence, "split": case.split,
            "dicom_dir": str(case.channel_dirs[0]), "dicom_files": list(first.files), "rows": rows, "cols": cols}


@dataclass(frozen=True)
class ChaosConversion:
    """What a conversion wrote."""

    dataset_dir: Path
    train_cases: list[str]
    test_cases: list[str]


def convert_chaos(source_root: Path | str, dataset_dir: Path | str) -> ChaosConversion:
    """Convert all MR cases; cases whose files already exist (per the sidecar) are skipped, so it resumes."""
    import json

    from tqdm import tqdm

    dataset_dir = Path(dataset_dir)
    sidecar_path = dataset_dir / ORDER_SIDECAR
    order = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.is_file() else {}
    cases = find_chaos_cases(source_root)
    for case in tqdm(cases, desc="CHAOS cases", unit="case"):
        if case.name in order and _case_files_exist(case, dataset_dir):
            continue
        order[case.name] = convert_case(case, dataset_dir)
        write_json_atomic(sidecar_path, order)  # after every case: an interrupted run resumes where it stopped
    train = sorted(c.name for c in cases if c.split == "train")
    write_dataset_json(
        dataset_dir, {0: "MR", 1: "MR"}, CHAOS_LABELS, len(train), ".nii.gz", dataset_name=dataset_dir.name,
        reference="https://chaos.grand-challenge.org", release="CHAOS 2019 MR",
        description="CHAOS MR: T1-DUAL (in/out phase) and T2-SPIR (duplicated) as 2 channels",
        converted_by="pumit-nnunet convert chaos",
    )
    return ChaosConversion(dataset_dir, train, sorted(c.name for c in cases if c.split == "test"))


def _case_files_exist(case: ChaosCase, dataset_dir: Path) -> bool:
    images_dir = dataset_dir / ("imagesTr" if case.split == "train" else "imagesTs")
    needed = [images_dir / f"{case.name}_000{i}.nii.gz" for i in (0, 1)]
    if case.split == "train":
        needed.append(dataset_dir / "labelsTr" / f"{case.name}.nii.gz")
    return all(p.is_file() for p in needed)
