"""DICOM geometry that must be right before a series or a multi-frame file becomes a volume.

GDCM stacks whatever slices it finds and spaces them evenly, so a missing slice silently misplaces every slice
after it. Here each slice's position is projected on the slice normal: gaps, duplicates and uneven spacing are
errors naming the series and the gap, unless the user opts in to resampling onto an even grid. Every slice must
be readable with all its pixel bytes. Multi-frame files are read here (pydicom): frames at distinct positions are
depth, frames at one position (cine, dynamic) are time and become separate images; pixel spacing must be present.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pumit_nnunet.errors import DataError

#: relative deviation of one slice step from the median step that counts as uneven spacing
SPACING_TOLERANCE = 0.05
#: transfer syntaxes whose pixel bytes can be counted (uncompressed)
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _read_header(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
    except PermissionError:
        raise
    except Exception as error:  # noqa: BLE001 - pydicom raises many types for broken files
        raise DataError(f"unreadable DICOM slice: {type(error).__name__}: {error}", path) from error


def check_pixel_bytes(dataset, path: str) -> None:
    """An uncompressed slice must hold Rows x Columns x Samples x Frames x BitsAllocated/8 pixel bytes."""
    if "PixelData" not in dataset:
        raise DataError("DICOM file without pixel data", path)
    syntax = str(getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", ""))
    if syntax not in _UNCOMPRESSED:
        return  # compressed: the decoder checks the stream
    expected = (int(dataset.Rows) * int(dataset.Columns) * int(getattr(dataset, "SamplesPerPixel", 1))
                * int(getattr(dataset, "NumberOfFrames", 1) or 1) * int(dataset.BitsAllocated) // 8)
    try:
        actual = len(dataset.PixelData)
    except Exception as error:  # noqa: BLE001 - a deferred read past the end of a truncated file
        raise DataError(f"truncated DICOM slice: pixel data unreadable ({error})", path) from error
    if actual < expected:
        raise DataError(f"truncated DICOM slice: {actual} of {expected} pixel bytes", path)


def pixel_spacing(dataset, path: str) -> tuple[float, float]:
    """(row, column) spacing in mm from PixelSpacing, the functional groups, or ImagerPixelSpacing; else an error."""
    candidates = [getattr(dataset, "PixelSpacing", None)]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = getattr(dataset, group, None)
        if sequence and "PixelMeasuresSequence" in sequence[0]:
            candidates.append(getattr(sequence[0].PixelMeasuresSequence[0], "PixelSpacing", None))
    candidates.append(getattr(dataset, "ImagerPixelSpacing", None))
    for value in candidates:
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    raise DataError("no pixel spacing in the DICOM header (PixelSpacing 0028,0030); refusing to assume 1 mm", path)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    return np.cross(row, column)


@dataclass(frozen=True)
class SeriesGeometry:
    """Slices sorted along the normal, their positions on it (mm) and the (median) slice step."""

    files: tuple[str, ...]
    positions: np.ndarray
    step: float

    @property
    def uniform(self) -> bool:
        return bool(np.all(np.abs(np.diff(self.positions) - self.step) <= SPACING_TOLERANCE * self.step))


def describe_gaps(positions: np.ndarray, step: float) -> str:
    """The uneven steps of a sorted position list, e.g. 'gap of 10 mm between 25 and 35 mm (step 5 mm)'."""
    diffs = np.diff(positions)
    bad = np.flatnonzero(np.abs(diffs - step) > SPACING_TOLERANCE * step)
    parts = [f"{'gap' if diffs[i] > step else 'step'} of {diffs[i]:.4g} mm between slices at {positions[i]:.4g} and "
             f"{positions[i + 1]:.4g} mm" for i in bad[:3]]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return "; ".join(parts) + more + f" (regular step {step:.4g} mm)"


def series_geometry(files: Sequence[str], series: str) -> SeriesGeometry:
    """Read every slice header, check its pixel bytes, and sort the slices along the slice normal."""
    headers = [_read_header(f) for f in files]
    for header, path in zip(headers, files):
        check_pixel_bytes(header, path)
    try:
        normal = _normal([float(v) for v in headers[0].ImageOrientationPatient])
        positions = np.array([float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers])
    except AttributeError as error:
        raise DataError("DICOM series without ImagePositionPatient/ImageOrientationPatient: slice order unknown",
                        series) from error
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    diffs = np.diff(positions)
    if len(diffs) and diffs.min() <= 1e-6 * max(abs(diffs).max(), 1.0):
        raise DataError(f"DICOM series has {int(np.sum(diffs <= 1e-6))} slices at an already used position "
                        f"(duplicates or several stacks in one series)", series)
    step = float(np.median(diffs)) if len(diffs) else 1.0
    return SeriesGeometry(tuple(files[i] for i in order), positions, step)


def resample_even(volume: np.ndarray, positions: np.ndarray, step: float) -> np.ndarray:
    """Linear interpolation of ``volume`` (axis 1 = slices at ``positions``) onto an even grid of ``step``."""
    count = int(np.floor((positions[-1] - positions[0]) / step + 1e-6)) + 1
    target = positions[0] + step * np.arange(count)
    upper = np.clip(np.searchsorted(positions, target, side="right"), 1, len(positions) - 1)
    lower = upper - 1
    t = ((target - positions[lower]) / (positions[upper] - positions[lower])).astype(np.float32)
    shape = (1, count) + (1,) * (volume.ndim - 2)
    a = volume[:, lower].astype(np.float32)
    b = volume[:, upper].astype(np.float32)
    return a + (b - a) * t.reshape(shape)


# ------------------------------------------------------------------------------------------------ multi-frame
def _frame_positions(dataset, normal: np.ndarray | None) -> np.ndarray | None:
    groups = getattr(dataset, "PerFrameFunctionalGroupsSequence", None)
    if not groups or normal is None:
        return None
    try:
        return np.array([float(np.dot(normal, [float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient]))
                         for g in groups])
    except (AttributeError, IndexError):
        return None


def _orientation(dataset) -> np.ndarray | None:
    value = getattr(dataset, "ImageOrientationPatient", None)
    shared = getattr(dataset, "SharedFunctionalGroupsSequence", None)
    if value is None and shared and "PlaneOrientationSequence" in shared[0]:
        value = shared[0].PlaneOrientationSequence[0].ImageOrientationPatient
    return _normal([float(v) for v in value]) if value is not None else None


def is_temporal(dataset) -> bool:
    """Frames indexed by time: the frame increment points at Frame Time (Vector) or a temporal index, or cine tags."""
    pointers = set()
    if "FrameIncrementPointer" in dataset:
        element = dataset["FrameIncrementPointer"]
        pointers = {int(v) for v in (element.value if element.VM > 1 else [element.value])}
    temporal_tags = {0x00181063, 0x00181065, 0x00209128, 0x00200100}  # FrameTime, FrameTimeVector, TemporalPosition
    return bool(pointers & temporal_tags) or "FrameTime" in dataset or "CineRate" in dataset


@dataclass
class MultiFrame:
    """A multi-frame file as (T, C, D, H, W) with spacing (depth, row, column); T > 1 for temporal frames."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str


def read_multiframe(path: str, resample: bool = False) -> MultiFrame:
    """Frames at distinct, evenly spaced positions are depth; frames in time (cine) are a sequence of 2D images."""
    dataset = _read_header(path)
    check_pixel_bytes(dataset, path)
    row, column = pixel_spacing(dataset, path)
    pixels = np.asarray(dataset.pixel_array)
    if pixels.ndim == 4:  # frames, rows, columns, samples
        pixels = np.moveaxis(pixels, -1, 1)
    else:
        pixels = pixels[:, None]
    modality = str(getattr(dataset, "Modality", ""))
    positions = _frame_positions(dataset, _orientation(dataset))
    spatial = positions is not None and np.ptp(positions) > 0
    if spatial and not is_temporal(dataset):
        order = np.argsort(positions, kind="stable")
        positions, volume = positions[order], np.moveaxis(pixels[order], 0, 1)  # C, D, H, W
        geometry = SeriesGeometry(tuple(str(i) for i in order), positions, float(np.median(np.diff(positions))))
        if not geometry.uniform:
            if not resample:
                raise DataError(f"multi-frame DICOM with uneven frame positions: {describe_gaps(positions, geometry.step)}; "
                                f"pass --resample-uneven-series to interpolate", path)
            volume = resample_even(volume, positions, geometry.step)
        return MultiFrame(volume[None], (geometry.step, row, column), modality)
    if spatial or not is_temporal(dataset):
        raise DataError("multi-frame DICOM whose frames are neither evenly positioned slices nor timed frames "
                        "(no per-frame positions, no frame time): cannot tell depth from time", path)
    # cine / dynamic: every frame is one 2D image of the same plane, never depth
    return MultiFrame(pixels[:, :, None], (0.0, row, column), modality)
