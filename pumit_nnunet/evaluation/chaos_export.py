"""CHAOS MR submission: ``Task{3,5}/MR/<id>/{T1DUAL|T2SPIR}/Results/<dcm_stem>.png``, zipped.

One 8-bit grey PNG per DICOM slice, named after the slice's DICOM file so that the PNGs sort like the DICOM files
(the evaluator pairs them by sorted order), with the DICOM pixel array's rows x columns. Task 5 holds all organs
(63/126/189/252), Task 3 the liver only (63). The layout follows the challenge's submission template as used by
nnU-Net v1 and PUMIT (reconstructed from their code: nnU-Net v1's CHAOS conversion script and PUMIT's CHAOS export).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.evaluation.chaos import LABEL_TO_PNG, ORDER_SIDECAR, labels_to_png, png_to_labels, read_png_stack
from pumit_nnunet.evaluation.files import check_same_geometry, read_header, read_label_map
from pumit_nnunet.io import atomic_path

TASKS: tuple[int, ...] = (3, 5)


def load_order(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    path = Path(dataset_dir) / ORDER_SIDECAR
    if not path.is_file():
        raise DataError("not found: convert the dataset with 'pumit-nnunet convert chaos' first", path)
    return json.loads(path.read_text(encoding="utf-8"))


def result_dir(task: int, entry: dict[str, Any]) -> str:
    """Folder of one case's PNGs inside the submission."""
    return f"Task{task}/MR/{entry['patient_id']}/{entry['sequence']}/Results"


def png_bytes(grey: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def prediction_slices(pred_path: Path, reference_image: Path, entry: dict[str, Any]) -> np.ndarray:
    """The predicted label volume (k, rows, cols), checked against the case's grid and DICOM slice list."""
    prediction, labels = read_label_map(pred_path)  # float files must hold exact integers
    check_same_geometry(prediction, read_header(reference_image), str(pred_path))
    if labels.min() < 0 or labels.max() >= len(LABEL_TO_PNG):
        raise DataError(f"labels {np.unique(labels).tolist()} outside 0-4", pred_path)
    expected = (len(entry["dicom_files"]), entry["rows"], entry["cols"])
    if labels.shape != expected:
        raise DataError(f"shape {labels.shape} is not (slices, rows, cols) = {expected}", pred_path)
    return labels


def export_chaos(
    pred_dir: Path | str,
    dataset_dir: Path | str,
    out_zip: Path | str,
    tasks: Sequence[int] = TASKS,
    split: str = "test",
) -> list[str]:
    """Zip the submission for every case of ``split`` ("test", "train" or "all"); returns the case names."""
    pred_dir, dataset_dir = Path(pred_dir), Path(dataset_dir)
    order = load_order(dataset_dir)
    cases = {name: e for name, e in order.items() if split == "all" or e["split"] == split}
    if not cases:
        raise DataError(f"no {split} cases", dataset_dir / ORDER_SIDECAR)
    if unknown := sorted(set(tasks) - set(TASKS)):
        raise UsageError(f"unknown CHAOS tasks {unknown}: MR tasks are 3 and 5")
    missing = sorted(name for name in cases if not (pred_dir / f"{name}.nii.gz").is_file())
    if missing:
        raise DataError(f"no prediction for {', '.join(missing)}", pred_dir)
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, entry in sorted(cases.items()):
            images = "imagesTr" if entry["split"] == "train" else "imagesTs"
            labels = prediction_slices(pred_dir / f"{name}.nii.gz", dataset_dir / images / f"{name}_0000.nii.gz", entry)
            for task in tasks:
                for arcname, grey in _task_pngs(task, entry, labels):
                    archive.writestr(arcname, png_bytes(grey))
    return sorted(cases)


def _task_pngs(task: int, entry: dict[str, Any], labels: np.ndarray) -> Iterable[tuple[str, np.ndarray]]:
    folder = result_dir(task, entry)
    for dicom_name, label_slice in zip(entry["dicom_files"], labels):
        yield f"{folder}/{Path(dicom_name).stem}.png", labels_to_png(label_slice, liver_only=task == 3)


def read_submission_case(submission_dir: Path | str, task: int, entry: dict[str, Any]) -> np.ndarray:
    """Label volume of one case read back from an (unzipped) submission, in PNG file-name order."""
    grey, _ = read_png_stack(Path(submission_dir) / result_dir(task, entry))
    return png_to_labels(grey, f"{submission_dir}/{result_dir(task, entry)}")
