"""Build small real nnU-Net raw datasets from real scans (the demo, the end-to-end tests).

Cases are cropped around their label (keeping spacing, origin and direction consistent), so nnU-Net's real
planning, preprocessing, training and prediction run in CPU-minutes on real anatomy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from pumit_nnunet.io import write_image_atomic, write_json_atomic

__all__ = ["SourceCase", "crop_around_label", "write_raw_dataset"]


@dataclass(frozen=True)
class SourceCase:
    """One labelled scan: ``name`` becomes the nnU-Net case identifier."""

    name: str
    image: Path
    label: Path
    #: shift of the crop centre in voxels (z, y, x), to make extra cases from one scan
    shift: tuple[int, int, int] = (0, 0, 0)


def crop_around_label(image: sitk.Image, label: sitk.Image, size_zyx: Sequence[int],
                      shift: Sequence[int] = (0, 0, 0)) -> tuple[sitk.Image, sitk.Image]:
    """Crop both to ``size_zyx`` voxels centred on the label's foreground (clipped to the volume)."""
    array = sitk.GetArrayViewFromImage(label)
    if array.shape != sitk.GetArrayViewFromImage(image).shape:
        raise ValueError(f"image and label sizes differ: {image.GetSize()} vs {label.GetSize()}")
    foreground = np.argwhere(array > 0)
    centre = (foreground.min(0) + foreground.max(0)) // 2 if len(foreground) else np.array(array.shape) // 2
    start = []
    for c, s, n, d in zip(centre + np.asarray(shift), size_zyx, array.shape, range(3)):
        s = min(int(s), n)
        start.append(int(np.clip(c - s // 2, 0, n - s)))
    size = [min(int(s), n) for s, n in zip(size_zyx, array.shape)]
    # SimpleITK indexes (x, y, z)
    index_xyz, size_xyz = start[::-1], size[::-1]
    return (sitk.RegionOfInterest(image, size_xyz, index_xyz), sitk.RegionOfInterest(label, size_xyz, index_xyz))


def write_raw_dataset(cases: Sequence[SourceCase], raw_root: str | os.PathLike, dataset_id: int, name: str,
                      channel_name: str, label_names: dict[str, int], crop_zyx: Sequence[int],
                      splits: list[dict[str, list[str]]] | None = None) -> Path:
    """Write ``DatasetXXX_name`` (imagesTr, labelsTr, dataset.json, optional splits_final.json) under ``raw_root``.

    Refuses to write into an existing dataset folder that holds other files (never overwrites user data).
    """
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists() and any(folder.iterdir()) and not (folder / ".pumit_demo").is_file():
        raise FileExistsError(f"{folder} exists and was not made by pumit-nnunet; refusing to overwrite it")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    (folder / ".pumit_demo").touch()
    for case in cases:
        image, label = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))
        image, label = crop_around_label(image, label, crop_zyx, case.shift)
        label = sitk.Cast(label, sitk.sitkUInt8)
        label.CopyInformation(image)
        write_image_atomic(image, folder / "imagesTr" / f"{case.name}_0000.nii.gz")
        write_image_atomic(label, folder / "labelsTr" / f"{case.name}.nii.gz")
    dataset = {"channel_names": {"0": channel_name}, "labels": label_names, "numTraining": len(cases),
               "file_ending": ".nii.gz", "description": "made by pumit-nnunet from real scans (cropped around the label)"}
    write_json_atomic(folder / "dataset.json", dataset)
    if splits is not None:
        write_json_atomic(folder / "splits_final.json", splits)
    return folder
