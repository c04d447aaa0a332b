"""Reading one source (an image file or a DICOM series) into depth-first (C, D, H, W) arrays with spacing.

SimpleITK (GDCM inside) reads NIfTI, NRRD, MHA and DICOM, JPEG-family transfer syntaxes included; PIL reads
PNG/JPG/TIFF; pydicom is the fallback for a single DICOM file SimpleITK cannot decode. The depth axis is chosen
here (``choose_depth_axis``) and moved first, keeping its physical meaning; spacing is always (depth, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pumit_nnunet.anisotropy import SPACING_2D_DEPTH
from pumit_nnunet.corpus.catalog import sequence_weights
from pumit_nnunet.corpus.dicom import (check_pixel_bytes, describe_gaps, pixel_spacing, read_multiframe, resample_even,
                                       series_geometry)
from pumit_nnunet.corpus.integrity import check_source_file
from pumit_nnunet.corpus.nifti_raw import nonfinite_mask
from pumit_nnunet.errors import DataError

NATURAL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: DICOM Modality tag -> corpus modality string
DICOM_MODALITIES = {"CT": "CT", "MR": "MRI", "PT": "PET", "CR": "gray/XR", "DX": "gray/XR", "MG": "gray/MG", "US": "US"}
#: ITK's physical axes are LPS: x runs R->L, y A->P, z I->S
_ANATOMICAL_AXIS = {"R": 0, "A": 1, "S": 2}
_INPLANE_TOLERANCE = 0.01


@dataclass
class RawImage:
    """One image cut out of a source: depth-first array, (depth, h, w) spacing, and its share of the source."""

    array: np.ndarray  # (C, D, H, W), source dtype
    spacing: tuple[float, float, float]
    modality: str
    suffix: str = ""  # "" or "-m<i>" (channel/modality) or "-t<i>" (frame/direction)
    weight: float = 1.0
    is_2d: bool = False
    origin_shape: tuple[int, ...] = ()


@dataclass
class _Loaded:
    array: np.ndarray  # (T, C, k, j, i): T sequence entries, C components, numpy axis order of the file
    spacing: tuple[float, float, float]  # numpy axis order
    direction: np.ndarray  # 3x3, column a = physical direction of numpy axis a
    dicom_modality: str = ""
    is_2d: bool = False


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NATURAL_SUFFIXES + VOLUME_SUFFIXES + DICOM_SUFFIXES)


def looks_like_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry ``DICM`` at byte 128, whatever their extension."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def choose_depth_axis(spacing: Sequence[float], direction: np.ndarray, rule: str = "auto") -> int:
    """Numpy axis to use as depth, in the issue's priority: official description, metadata, anisotropy.

    ``rule`` "S"/"A"/"R" (the dataset's official orientation) picks the axis closest to that anatomical axis.
    "auto" keeps the file's slice axis (axis 0, how the volume was acquired) when the other two have equal
    spacing; otherwise the axis whose removal leaves the most similar in-plane spacings (ties: the coarser).
    """
    if rule in _ANATOMICAL_AXIS:
        return int(np.argmax(np.abs(np.asarray(direction)[_ANATOMICAL_AXIS[rule], :])))
    sp = [float(s) for s in spacing]

    def inplane_mismatch(axis: int) -> float:
        a, b = (sp[i] for i in range(3) if i != axis)
        return abs(a - b) / max(a, b)

    if inplane_mismatch(0) <= _INPLANE_TOLERANCE:
        return 0
    return min(range(3), key=lambda axis: (round(inplane_mismatch(axis), 6), -sp[axis]))


def nifti_pixdim(path: Path) -> tuple[float, ...] | None:
    """pixdim[1..dim] straight from a NIfTI-1 header; ITK silently replaces missing (0) spacing by 1."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            header = handle.read(348)
    except OSError:
        return None
    if len(header) < 348:
        return None
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == 348:
            dim = struct.unpack(order + "8h", header[40:56])
            pixdim = struct.unpack(order + "8f", header[76:108])
            return tuple(pixdim[1 : 1 + min(max(dim[0], 1), 3)])
    return None


def _check_spacing(spacing: Sequence[float], source: str) -> None:
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"missing or invalid spacing {tuple(spacing)} in {source}")


def _from_sitk(image, source: str) -> _Loaded:
    import SimpleITK as sitk

    dim = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    array = sitk.GetArrayFromImage(image)  # reversed index order, components last
    if components == 1:
        array = array[..., None]
    spacing = tuple(reversed(image.GetSpacing()))
    if dim == 2:
        array = array[None, None]  # T, D=1, H, W, C
        spacing = (SPACING_2D_DEPTH, *spacing)
        direction = np.eye(3)
    elif dim == 3:
        array = array[None]
        direction = np.asarray(image.GetDirection()).reshape(3, 3)[:, ::-1]
    elif dim == 4:
        spacing = spacing[1:]  # spacing of the sequence axis is meaningless here
        direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3][:, ::-1]
    else:
        raise ValueError(f"unsupported {dim}D image in {source}")
    is_2d = dim == 2 or (dim == 3 and array.shape[1] == 1)
    if is_2d:
        spacing = (SPACING_2D_DEPTH, *spacing[1:])
    else:
        _check_spacing(spacing, source)
    return _Loaded(np.moveaxis(array, -1, 1), tuple(float(s) for s in spacing), direction, is_2d=is_2d)


def _dicom_modality(reader_or_image) -> str:
    key = "0008|0060"
    return reader_or_image.GetMetaData(key).strip() if reader_or_image.HasMetaDataKey(key) else ""


def _read_natural(path: Path) -> _Loaded:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr"):
            image = image.convert("RGB")
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    array = np.moveaxis(array, -1, 0)[None, :, None]  # T=1, C, D=1, H, W
    return _Loaded(array, (SPACING_2D_DEPTH, 1.0, 1.0), np.eye(3), is_2d=True)


def _read_dicom_pydicom(path: Path) -> _Loaded:
    import pydicom

    dataset = pydicom.dcmread(str(path))
    check_pixel_bytes(dataset, str(path))
    array = np.asarray(dataset.pixel_array)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4) and getattr(dataset, "SamplesPerPixel", 1) > 1):
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
        array = array[:, None]
    else:
        raise ValueError(f"multi-frame DICOM not supported by the pydicom fallback: {path}")
    pixel = [float(v) for v in getattr(dataset, "PixelSpacing", [1.0, 1.0])]
    return _Loaded(array[None], (SPACING_2D_DEPTH, *pixel), np.eye(3), str(getattr(dataset, "Modality", "")), True)


def _dicom_frames(path: Path) -> int:
    import pydicom

    try:
        return int(getattr(pydicom.dcmread(str(path), stop_before_pixels=True), "NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable headers are reported by the reader below
        return 1


def _read_multiframe(path: Path, resample: bool) -> _Loaded:
    frames = read_multiframe(str(path), resample)
    is_2d = frames.array.shape[2] == 1
    spacing = (SPACING_2D_DEPTH, *frames.spacing[1:]) if is_2d else frames.spacing
    return _Loaded(frames.array, spacing, np.eye(3), frames.modality, is_2d)


def _read_file(path: Path, resample: bool = False) -> _Loaded:
    import SimpleITK as sitk

    if path.name.lower().endswith(NATURAL_SUFFIXES):
        return _read_natural(path)
    nonfinite = check_source_file(path)
    if looks_like_dicom(path) and _dicom_frames(path) > 1:
        return _read_multiframe(path, resample)  # GDCM would stack cine frames as depth with 1 mm spacing
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
    except RuntimeError as error:
        if looks_like_dicom(path):
            return _read_dicom_pydicom(path)
        raise ValueError(f"unreadable image {path}: {str(error).strip().splitlines()[-1]}") from error
    if path.name.lower().endswith((".nii", ".nii.gz")) and image.GetDimension() >= 3:
        _check_spacing(nifti_pixdim(path) or (0.0,), str(path))
    loaded = _from_sitk(image, str(path))
    loaded.dicom_modality = _dicom_modality(reader)
    if nonfinite:
        _restore_nonfinite(loaded, path)
    return loaded


def _restore_nonfinite(loaded: _Loaded, path: Path) -> None:
    """Put back the NaN that ITK's NIfTI reader turned into 0, so the finiteness check counts and replaces them."""
    mask = nonfinite_mask(path)
    if mask.shape != loaded.array.shape:
        raise DataError(f"cannot locate the NaN/Inf voxels: raw data {mask.shape} vs image {loaded.array.shape}", path)
    loaded.array = np.where(mask, np.float32(np.nan), loaded.array.astype(np.float32, copy=False)
                            if not np.issubdtype(loaded.array.dtype, np.floating) else loaded.array)


def _read_series(files: Sequence[str], source: str, resample: bool = False) -> _Loaded:
    """A DICOM series, refused when its slice positions are uneven (a missing slice) unless ``resample``."""
    import pydicom
    import SimpleITK as sitk

    geometry = series_geometry(files, source)
    if not geometry.uniform and not resample:
        raise DataError(f"DICOM series with missing or unevenly spaced slices: {describe_gaps(geometry.positions, geometry.step)}"
                        f"; pass --resample-uneven-series to interpolate onto an even grid", source)
    pixel_spacing(pydicom.dcmread(geometry.files[0], stop_before_pixels=True), geometry.files[0])
    files = geometry.files
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"unreadable DICOM series {source}: {str(error).strip().splitlines()[-1]}") from error
    loaded = _from_sitk(image, source)
    if not geometry.uniform:  # opted in: linear interpolation along the slice axis at the median step
        loaded.array = resample_even(loaded.array[0], geometry.positions, geometry.step)[None]
        loaded.spacing = (geometry.step, *loaded.spacing[1:])
    key = "0008|0060"
    loaded.dicom_modality = reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else ""
    return loaded


def _is_grey(channels: np.ndarray) -> bool:
    return bool(np.array_equal(channels[0], channels[1]) and np.array_equal(channels[0], channels[2]))


def is_natural(array: np.ndarray, is_2d: bool) -> bool:
    """8-bit 2D images are natural-format images (photos, screenshots of scans): 0-255 scaling, RGB kept."""
    return is_2d and array.dtype == np.uint8


def _split_channels(loaded: _Loaded) -> list[tuple[np.ndarray, int | None, int | None]]:
    """(array (C, k, j, i), sequence index, channel index) per output image; RGB stays together, others split."""
    sequence, components = loaded.array.shape[:2]
    natural = is_natural(loaded.array, loaded.is_2d)
    out = []
    for t in range(sequence):
        entry, frame = loaded.array[t], (t if sequence > 1 else None)
        if natural and components in (3, 4):
            rgb = entry[:3]
            out.append((rgb[:1] if _is_grey(rgb) else rgb, frame, None))
        elif components == 1:
            out.append((entry, frame, None))
        else:
            out.extend((entry[c : c + 1], frame, c) for c in range(components))
    return out


def load_source(path: str, files: Sequence[str] = (), *, depth_rule: str = "auto", sequence_4d: str = "duplicates",
                modality: str = "", channel_modalities: Sequence[str] = (), resample_uneven: bool = False
                ) -> list[RawImage]:
    """Read a file (or the DICOM series ``files``) into depth-first images, split per channel and frame.

    4D sequences become one image per entry: near-duplicates (cine frames, diffusion directions) weighted
    ``(2n-1)/n²`` each (``"b0+duplicates"``: entry 0 is the b0 volume and keeps weight 1, as the authors), or distinct modalities (``sequence_4d="channels"``, named by ``channel_modalities``).
    """
    loaded = _read_series(files, path, resample_uneven) if files else _read_file(Path(path), resample_uneven)
    if not modality or modality == "auto":
        modality = DICOM_MODALITIES.get(loaded.dicom_modality, loaded.dicom_modality or "unknown")
    depth = 0 if loaded.is_2d else choose_depth_axis(loaded.spacing, loaded.direction, depth_rule)
    order = [depth] + [a for a in range(3) if a != depth]
    spacing = tuple(loaded.spacing[a] for a in order)
    sequence = loaded.array.shape[0]
    images = []
    for array, frame, channel in _split_channels(loaded):
        image_modality, weight, suffix = modality, 1.0, "" if channel is None else f"-c{channel}"
        if frame is not None and sequence_4d == "channels":
            suffix = f"-m{frame}" + suffix
            if frame < len(channel_modalities):
                image_modality = channel_modalities[frame]
        elif frame is not None:
            suffix, weight = f"-t{frame}" + suffix, sequence_weights(sequence, sequence_4d == "b0+duplicates")[frame]
        array = np.ascontiguousarray(np.transpose(array, (0, *(a + 1 for a in order))))
        images.append(RawImage(array, spacing, image_modality, suffix, weight, loaded.is_2d, tuple(loaded.array.shape)))
    return images
