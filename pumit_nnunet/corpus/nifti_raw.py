"""NIfTI voxel data read straight from the file, before ITK sees it (issue 12 §2).

Two things ITK's NIfTI reader hides: a header whose dimensions exceed the data (ITK zero-fills the rest), and
NaN/Inf voxels (ITK turns them into 0, so they cannot be counted after reading). So the header is parsed here,
the voxel bytes are streamed once (counting how many there are and, for float data, how many are not finite),
and the gzip stream of a ``.nii.gz`` is read to its end so that truncation and CRC errors surface.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pumit_nnunet.errors import DataError

#: NIfTI datatype codes of real float voxels (complex and float128 are not counted)
_FLOAT_CODES = {16: "f4", 64: "f8"}
_READ = 1 << 22


@dataclass(frozen=True)
class NiftiLayout:
    """What a NIfTI header promises: array dimensions, datatype, bytes per voxel, where the data starts."""

    dims: tuple[int, ...]
    bits_per_voxel: int
    data_offset: int
    datatype: int = 0
    byteorder: str = "<"

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.dims, dtype=np.int64)) * self.bits_per_voxel // 8

    @property
    def float_dtype(self) -> np.dtype | None:
        """The numpy dtype of float voxels (whose NaN/Inf ITK hides); None for other datatypes."""
        code = _FLOAT_CODES.get(self.datatype)
        return np.dtype(self.byteorder + code) if code else None


def _dims(dim: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(d, 1) for d in dim[1 : 1 + max(min(dim[0], 7), 1)])


def parse_nifti_header(header: bytes) -> NiftiLayout | None:
    """The layout of a NIfTI-1 (348-byte) or NIfTI-2 (540-byte) header; None when it is neither."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(order + "2h", header[70:74])
            offset = struct.unpack(order + "f", header[108:112])[0]
            return NiftiLayout(_dims(struct.unpack(order + "8h", header[40:56])), bitpix, max(int(offset), 352),
                               datatype, order)
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", header[12:16])
            offset = struct.unpack(order + "q", header[168:176])[0]
            return NiftiLayout(_dims(struct.unpack(order + "8q", header[16:80])), bitpix, max(int(offset), 544),
                               datatype, order)
    return None


def missing_data_error(dims: tuple[int, ...], need: int, have: int, path: Path) -> DataError:
    """The one message for a file whose header promises more voxel bytes than it holds."""
    return DataError(f"header dimensions {'x'.join(map(str, dims))} need {need} bytes of voxel data, the file holds "
                     f"{max(have, 0)} (truncated, or dimensions exceed the data)", path)


@dataclass(frozen=True)
class NiftiScan:
    """The result of streaming a NIfTI file: its layout, the voxel bytes present, the non-finite voxels."""

    layout: NiftiLayout
    available: int
    nonfinite: int


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _count_nonfinite(handle: BinaryIO, layout: NiftiLayout) -> tuple[int, int]:
    """(voxel bytes read, non-finite float voxels among them), reading at most ``layout.data_bytes``."""
    dtype, available, bad, carry = layout.float_dtype, 0, 0, b""
    while available < layout.data_bytes and (chunk := handle.read(min(_READ, layout.data_bytes - available))):
        available += len(chunk)
        if dtype is not None:
            chunk = carry + chunk
            usable = len(chunk) - len(chunk) % dtype.itemsize
            values = np.frombuffer(chunk, dtype, usable // dtype.itemsize)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            carry = chunk[usable:]
    return available, bad


def scan_nifti(path: Path) -> NiftiScan:
    """Parse the header, stream the voxel data once (to the end of a gzip stream, so its CRC is checked)."""
    try:
        with _open(path) as handle:
            layout = parse_nifti_header(handle.read(544))
            if layout is None:
                raise DataError("not a NIfTI file (bad header size field)", path)
            handle.seek(layout.data_offset)
            available, bad = _count_nonfinite(handle, layout)
            while handle.read(_READ):  # the rest (extensions after the data are legal): reach the gzip trailer
                pass
    except EOFError as error:
        raise DataError(f"truncated gzip stream ({error}); the file is incomplete", path) from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"corrupt gzip stream: {error}", path) from error
    return NiftiScan(layout, available, bad)


def nonfinite_mask(path: Path) -> np.ndarray:
    """Where the NaN/Inf voxels of a float NIfTI are, as a boolean (T, C, k, j, i) array: sequence entries
    (dim 4), components (dim 5), then the reversed spatial axes, the order of the corpus readers' arrays."""
    with _open(path) as handle:
        layout = parse_nifti_header(handle.read(544))
        if layout is None or layout.float_dtype is None or len(layout.dims) > 5:
            raise DataError("cannot locate the NaN/Inf voxels of this NIfTI (not float data of at most 5 dimensions)", path)
        handle.seek(layout.data_offset)
        data = handle.read(layout.data_bytes)
    nx, ny, nz, nt, nu = (*layout.dims, 1, 1, 1, 1)[:5]
    values = np.frombuffer(data, layout.float_dtype).reshape(nu, nt, nz, ny, nx)  # x varies fastest on disk
    return ~np.isfinite(values).transpose(1, 0, 2, 3, 4)
