"""Read a DICOM slice series *in file-name order* into a SimpleITK image.

The CHAOS evaluator orders slices by file name, not by position tags (emrekavur/CHAOS-evaluation,
``CHAOSmetrics.py::transformToRealCoordinates``): slice k of a submission is the k-th ``*.dcm`` in sorted order, and
its index-to-world affine is built from the first and the last file. We therefore stack the pixel arrays in that
order and build the geometry the same way:

* origin = ImagePositionPatient of the first file;
* x (numpy last axis, DICOM column index) runs along ImageOrientationPatient[:3] with spacing PixelSpacing[1];
* y (numpy middle axis, DICOM row index) runs along ImageOrientationPatient[3:] with spacing PixelSpacing[0];
* z (numpy first axis, file order) runs along ±(x × y), the sign and spacing taken from the displacement between
  the first and the last file projected on the slice normal (an orthonormal direction even for a slightly sheared
  stack; for an unsheared stack this equals the evaluator's affine).

So numpy ``array[k, r, c]`` is pixel (row r, column c) of the k-th file, and a PNG slice written from
``array[k]`` has exactly the DICOM pixel array's rows × columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pumit_nnunet.errors import DataError


@dataclass(frozen=True)
class DicomSeries:
    """A series read in file-name order: the volume (k, rows, cols), its SimpleITK image and the file names."""

    array: np.ndarray
    image: Any
    files: tuple[str, ...]


def sorted_dicom_files(folder: Path) -> list[Path]:
    """``*.dcm`` files of a folder in file-name order (the CHAOS convention)."""
    if not folder.is_dir():
        raise DataError("DICOM folder does not exist", folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not files:
        raise DataError("no .dcm files", folder)
    return files


def _read_slice(path: Path) -> tuple[np.ndarray, Any]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many kinds; the file name is what the user needs
        raise DataError(f"cannot read DICOM slice: {error}", path) from error
    slope, intercept = float(getattr(dataset, "RescaleSlope", 1)), float(getattr(dataset, "RescaleIntercept", 0))
    if slope != 1 or intercept != 0:
        pixels = apply_modality_lut(pixels, dataset).astype(np.float32)
    return pixels, dataset


def slice_geometry(first: Any, last: Any, n_slices: int) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in SimpleITK (x, y, z) order from the first and last slice headers."""
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    displacement = float(np.dot(np.asarray(last.ImagePositionPatient, dtype=float) - origin, normal))
    if n_slices > 1:
        z_spacing, z_sign = abs(displacement) / (n_slices - 1), (1.0 if displacement >= 0 else -1.0)
    else:
        z_spacing, z_sign = float(getattr(first, "SliceThickness", 1.0) or 1.0), 1.0
    if z_spacing <= 0:
        raise DataError("DICOM slices share one position: cannot derive the slice spacing", getattr(first, "filename", None))
    direction = np.stack([row_dir, col_dir, z_sign * normal], axis=1)  # columns = axis directions
    return tuple(origin), (col_spacing, row_spacing, z_spacing), tuple(direction.ravel())


def read_dicom_series(folder: Path, files: Sequence[Path] | None = None) -> DicomSeries:
    """Stack a folder's slices in file-name order (or the given order) with the evaluator's geometry."""
    import SimpleITK as sitk

    files = list(files) if files is not None else sorted_dicom_files(Path(folder))
    slices, headers = zip(*(_read_slice(f) for f in files))
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise DataError(f"slices differ in size {sorted(shapes)}", folder)
    array = np.stack(slices)
    origin, spacing, direction = slice_geometry(headers[0], headers[-1], len(files))
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return DicomSeries(array, image, tuple(f.name for f in files))
