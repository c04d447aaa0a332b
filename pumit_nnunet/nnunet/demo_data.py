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

__all__ = ["SourceCase", "crop_around_label", "write_raw_dataset", "lung_field_mask", "resample_to_spacing",
           "crop_to_foreground", "lung_case", "claim_dataset_folder", "write_case", "build_lung_demo", "LUNG_DEMO"]


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
    folder = claim_dataset_folder(raw_root, dataset_id, name)
    for case in cases:
        image, label = sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label))
        write_case(folder, "Tr", case.name, *crop_around_label(image, label, crop_zyx, case.shift))
    dataset = {"channel_names": {"0": channel_name}, "labels": label_names, "numTraining": len(cases),
               "file_ending": ".nii.gz", "description": "made by pumit-nnunet from real scans (cropped around the label)"}
    write_json_atomic(folder / "dataset.json", dataset)
    if splits is not None:
        write_json_atomic(folder / "splits_final.json", splits)
    return folder


# --- the demo's task: lung fields on chest CT, one patient for training, another held out ----------------------
#: HU below which a voxel inside the body counts as air (lung parenchyma is about -900..-500 HU)
AIR_HU = -400.0
#: air pockets smaller than this (mL) are bowel gas or noise, not lung
MIN_LUNG_ML = 20.0


def lung_field_mask(image: sitk.Image) -> sitk.Image:
    """The lung fields of a chest CT, by threshold: air (< ``AIR_HU``) inside the body's cross-section, in
    connected pieces of at least ``MIN_LUNG_ML``, with each slice's holes (vessels, nodules) filled.

    A reproducible threshold label, not an expert one: it includes the central airways, which a radiologist's
    lung mask would leave out. uint8, same geometry as ``image``."""
    from scipy import ndimage

    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    body = np.stack([ndimage.binary_fill_holes(s) for s in hu > AIR_HU])  # the table and outside air stay out
    air = ndimage.binary_opening((hu < AIR_HU) & body, structure=np.ones((1, 3, 3), bool))
    pieces, count = ndimage.label(air)
    sizes_ml = ndimage.sum(air, pieces, range(1, count + 1)) * float(np.prod(image.GetSpacing())) / 1000.0
    keep = [i + 1 for i, size in enumerate(np.atleast_1d(sizes_ml)) if size >= MIN_LUNG_ML]
    lungs = np.isin(pieces, keep)
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in lungs])
    mask = sitk.GetImageFromArray(lungs.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def resample_to_spacing(image: sitk.Image, spacing_xyz: Sequence[float], is_label: bool) -> sitk.Image:
    """Resample onto a grid of ``spacing_xyz`` covering the same extent (linear for images, nearest for labels)."""
    old_spacing, old_size = np.array(image.GetSpacing()), np.array(image.GetSize())
    size = [max(int(round(n)), 1) for n in old_size * old_spacing / np.asarray(spacing_xyz, float)]
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), tuple(float(s) for s in spacing_xyz),
                         image.GetDirection(), 0 if is_label else float(sitk.GetArrayViewFromImage(image).min()),
                         image.GetPixelID())


def crop_to_foreground(image: sitk.Image, label: sitk.Image, mask: sitk.Image, margin_zyx: Sequence[int]) -> tuple[sitk.Image, sitk.Image]:
    """Crop image and label to ``mask``'s bounding box grown by ``margin_zyx`` voxels (clipped to the volume)."""
    array = sitk.GetArrayViewFromImage(mask)
    found = np.argwhere(array > 0)
    if not len(found):
        return image, label
    low = np.maximum(found.min(0) - np.asarray(margin_zyx), 0)
    high = np.minimum(found.max(0) + np.asarray(margin_zyx) + 1, array.shape)
    index_xyz, size_xyz = [int(v) for v in low[::-1]], [int(v) for v in (high - low)[::-1]]
    return sitk.RegionOfInterest(image, size_xyz, index_xyz), sitk.RegionOfInterest(label, size_xyz, index_xyz)


def lung_case(image_path: Path, spacing_xyz: Sequence[float]) -> tuple[sitk.Image, sitk.Image]:
    """One chest CT as a demo case: resampled to ``spacing_xyz``, lung-field label, cropped to the body."""
    from scipy import ndimage

    image = resample_to_spacing(sitk.ReadImage(str(image_path)), spacing_xyz, is_label=False)
    label = lung_field_mask(image)
    hu = sitk.GetArrayViewFromImage(image)
    body = sitk.GetImageFromArray(np.stack([ndimage.binary_fill_holes(s) for s in hu > AIR_HU]).astype(np.uint8))
    body.CopyInformation(image)
    return crop_to_foreground(image, label, body, (0, 2, 2))


def claim_dataset_folder(raw_root: str | os.PathLike, dataset_id: int, name: str) -> Path:
    """``raw_root/DatasetXXX_name``, created and marked as ours; refuses a folder with files we did not write."""
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists() and any(folder.iterdir()) and not (folder / ".pumit_demo").is_file():
        raise FileExistsError(f"{folder} exists and was not made by pumit-nnunet; refusing to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".pumit_demo").touch()
    return folder


def write_case(folder: Path, split: str, name: str, image: sitk.Image, label: sitk.Image) -> None:
    """``images<split>/<name>_0000.nii.gz`` and ``labels<split>/<name>.nii.gz`` (split ``Tr`` or ``Ts``), atomically."""
    label = sitk.Cast(label, sitk.sitkUInt8)
    label.CopyInformation(image)
    write_image_atomic(image, folder / f"images{split}" / f"{name}_0000.nii.gz")
    write_image_atomic(label, folder / f"labels{split}" / f"{name}.nii.gz")


@dataclass(frozen=True)
class LungDemo:
    """The demo dataset's fixed choices: which scan trains, which is held out, the common grid."""

    train_scan: str = "lung1"
    test_scan: str = "lung2"
    spacing_xyz: tuple[float, float, float] = (4.0, 4.0, 5.0)
    name: str = "PumitDemoLungFields"


LUNG_DEMO = LungDemo()


def build_lung_demo(scans: dict[str, Path], raw_root: str | os.PathLike, dataset_id: int, folds: int = 1,
                    demo: LungDemo = LUNG_DEMO) -> Path:
    """Write the demo's nnU-Net raw dataset: ``imagesTr`` holds one patient's chest CT, ``imagesTs``/``labelsTs``
    another patient's (never seen in training), both with lung-field threshold labels on a 4x4x5 mm grid (a 32x64x64 patch then sees most of the chest).

    ``splits_final.json`` repeats the one split (train and validate on the training scan) ``folds`` times, so
    each demo row (from scratch, fine-tuned...) can train in its own fold on identical data."""
    folder = claim_dataset_folder(raw_root, dataset_id, demo.name)
    for split, scan in (("Tr", demo.train_scan), ("Ts", demo.test_scan)):
        image_file = folder / f"images{split}" / f"{scan}_0000.nii.gz"
        if not image_file.is_file() or not (folder / f"labels{split}" / f"{scan}.nii.gz").is_file():
            write_case(folder, split, scan, *lung_case(scans[scan], demo.spacing_xyz))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1}, "numTraining": 1,
               "file_ending": ".nii.gz",
               "description": f"pumit-nnunet demo: lung fields (threshold label) on chest CT; trained on "
                              f"{demo.train_scan}, tested on {demo.test_scan} (another patient)"}
    write_json_atomic(folder / "dataset.json", dataset)
    write_json_atomic(folder / "splits_final.json", [{"train": [demo.train_scan], "val": [demo.train_scan]}] * folds)
    return folder
