"""The real-demo datasets: which registered scans make each nnU-Net raw dataset, and how its labels are made.

``RAW_DATASETS`` is the table (name -> :class:`RawDataset`); :func:`write_dataset` writes one of them into a folder
(``imagesTr/``, ``labelsTr/``, ``dataset.json`` with per-case provenance and statistics that nnU-Net ignores).
Voxels are the sources' own except where a case's provenance says it was resampled or bin-shrunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from pumit_nnunet.data.cache import fetch
from pumit_nnunet.data.labels import BONE_HU, SOFT_TISSUE_HU, brain_mask, ct_tissue_classes, tissue_argmax
from pumit_nnunet.io import write_image_atomic, write_json_atomic

__all__ = ["Case", "RawDataset", "RAW_DATASETS", "write_dataset", "coronal_acquisition", "CORONAL_DIRECTION"]

PYRADIOMICS, MNI152 = "pyradiomics-data", "nilearn-mni152"
MNI_T1, MNI_GM, MNI_WM = (f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm"))
#: file axes of a coronal acquisition (ITK's LPS, row-major), as ITK's example head T1 (KmeansTest_T1) is stored:
#: i = +x (towards the left), j = +z (towards the head), k = -y (towards the front): slices run along A-P
CORONAL_DIRECTION = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Case:
    """One labelled scan of a dataset (``image`` and ``label`` share their geometry)."""

    name: str
    image: sitk.Image
    label: sitk.Image
    provenance: str


@dataclass(frozen=True)
class RawDataset:
    """A real-demo dataset: its nnU-Net name, channel, labels, what made it and the function that yields its cases."""

    name: str
    channel: str
    labels: dict[str, int]
    description: str
    sources: tuple[str, ...]
    cases: Callable[[], Iterator[Case]]


def _label_like(array: np.ndarray, image: sitk.Image) -> sitk.Image:
    label = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    label.CopyInformation(image)
    return label


def _pyradiomics_cases(names: tuple[str, ...]) -> Callable[[], Iterator[Case]]:
    def cases() -> Iterator[Case]:
        folder = fetch(PYRADIOMICS)
        for name in names:
            image = sitk.ReadImage(str(folder / f"{name}_image.nrrd"))
            roi = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}_label.nrrd"))) > 0
            yield Case(name, image, _label_like(roi, image), f"pyradiomics-3.0.1.tar.gz:data/{name}_{{image,label}}.nrrd")
    return cases


def coronal_acquisition(image: sitk.Image, spacing_xyz: tuple[float, float, float], size_xyz: tuple[int, int, int],
                        is_label: bool) -> sitk.Image:
    """Resample ``image`` onto a coronal grid (:data:`CORONAL_DIRECTION`) centred on the image's centre."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    direction = np.array(CORONAL_DIRECTION).reshape(3, 3)
    half_extent = np.asarray(spacing_xyz) * (np.asarray(size_xyz) - 1) / 2
    origin = centre - direction @ half_extent
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, [int(n) for n in size_xyz], sitk.Transform(), interpolator, origin.tolist(),
                         [float(s) for s in spacing_xyz], CORONAL_DIRECTION, 0.0, image.GetPixelID())


def _mni_brain_cases() -> Iterator[Case]:
    folder = fetch(MNI152)
    t1 = sitk.ReadImage(str(folder / MNI_T1))
    grey, white = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))) for name in (MNI_GM, MNI_WM))
    mask = _label_like(brain_mask(grey, white), t1)
    yield Case("mni152_2009a", t1, mask, f"nilearn-0.10.3 wheel: {MNI_T1}; mask = fill_holes(closing_r3(GM + WM >= 0.5))")
    spacing, size = (2.0, 2.0, 3.0), (96, 96, 62)
    yield Case("mni152_coronal", coronal_acquisition(t1, spacing, size, False), coronal_acquisition(mask, spacing, size, True),
               "mni152_2009a resampled (linear; mask nearest) to 2 x 2 x 3 mm, stored as a coronal acquisition "
               "(slices along anterior-posterior, 96 x 96 x 62)")


def _mni_tissue_cases() -> Iterator[Case]:
    folder = fetch(MNI152)
    t1 = sitk.ReadImage(str(folder / MNI_T1))
    grey, white = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / name))) for name in (MNI_GM, MNI_WM))
    yield Case("mni152_2009a", t1, _label_like(tissue_argmax(grey, white), t1),
               f"nilearn-0.10.3 wheel: {MNI_T1}; label = argmax(255 - GM - WM, GM, WM) of the uint8 probability maps")


def _chest_tissue_cases() -> Iterator[Case]:
    image = sitk.BinShrink(sitk.ReadImage(str(fetch(PYRADIOMICS) / "lung1_image.nrrd")), [2, 2, 1])
    label = _label_like(ct_tissue_classes(sitk.GetArrayViewFromImage(image)), image)
    yield Case("lung1", image, label, "pyradiomics-3.0.1.tar.gz:data/lung1_image.nrrd, 2 x 2 in-plane bin-shrunk "
               f"(mean); label = thresholds {SOFT_TISSUE_HU} <= HU < {BONE_HU} soft tissue, HU >= {BONE_HU} bone")


RAW_DATASETS: dict[str, RawDataset] = {d.name: d for d in (
    RawDataset("Dataset901_RealBrainMaskT1", "T1", {"background": 0, "brain": 1},
               "Brain mask on the MNI ICBM152 2009a T1 template (average of 152 heads, with skull): 1 mm isotropic, "
               "and the same template resampled to 2 x 2 x 3 mm and stored as a coronal acquisition. Template masks.",
               (MNI152,), _mni_brain_cases),
    RawDataset("Dataset902_RealCTLungNodule", "CT", {"background": 0, "nodule": 1},
               "pyradiomics test cases ('lung1', 'lung2'): real chest CTs with one expert nodule ROI each",
               (PYRADIOMICS,), _pyradiomics_cases(("lung1", "lung2"))),
    RawDataset("Dataset903_RealMRBrainLesion", "T1c", {"background": 0, "lesion": 1},
               "pyradiomics test cases ('brain1', 'brain2'): real contrast T1 brain MRIs with one expert lesion ROI each",
               (PYRADIOMICS,), _pyradiomics_cases(("brain1", "brain2"))),
    RawDataset("Dataset904_RealCTChestTissue", "CT", {"background": 0, "soft_tissue": 1, "bone": 2},
               f"pyradiomics chest CT 'lung1' at 1.14 x 1.14 x 5 mm with threshold tissue classes (soft tissue "
               f"{SOFT_TISSUE_HU} <= HU < {BONE_HU}, bone >= {BONE_HU} HU), not manual labels",
               (PYRADIOMICS,), _chest_tissue_cases),
    RawDataset("Dataset905_RealMNI152Tissue", "T1", {"background": 0, "grey_matter": 1, "white_matter": 2},
               "MNI ICBM152 2009a T1 template with grey/white matter labels: argmax of the template's probability maps",
               (MNI152,), _mni_tissue_cases),
)}


def _case_stats(case: Case) -> dict:
    values = sitk.GetArrayViewFromImage(case.image)
    labels, counts = np.unique(sitk.GetArrayViewFromImage(case.label), return_counts=True)
    return {"size_xyz": list(case.image.GetSize()), "spacing": [round(s, 4) for s in case.image.GetSpacing()],
            "direction": [round(d, 6) for d in case.image.GetDirection()],
            "intensity": [float(values.min()), float(values.max())], "provenance": case.provenance,
            "label_voxels": {str(int(k)): int(n) for k, n in zip(labels, counts)}}


def write_dataset(dataset: RawDataset, folder: Path) -> Path:
    """Write every case of ``dataset`` and its ``dataset.json`` into ``folder`` (created); ``folder``."""
    cases = {}
    for case in dataset.cases():
        write_image_atomic(case.image, folder / "imagesTr" / f"{case.name}_0000.nii.gz")
        write_image_atomic(case.label, folder / "labelsTr" / f"{case.name}.nii.gz")
        cases[case.name] = _case_stats(case)
    write_json_atomic(folder / "dataset.json", {
        "channel_names": {"0": dataset.channel}, "labels": dataset.labels, "numTraining": len(cases),
        "file_ending": ".nii.gz", "description": dataset.description,
        "source": ", ".join(dataset.sources) + " (pumit-nnunet data list)", "cases": cases})
    return folder
