"""Checks that a source really holds the image its header describes, before anything is stored.

ITK zero-fills what a file lacks: a truncated ``.nii.gz`` or a header whose dimensions exceed the data reads as
an image padded with zeros, which the foreground crop then hides. So the gzip stream is decompressed to its end
(CRC and length verified) and the voxel bytes the header promises are counted before ITK sees the file
(NIfTI: ``nifti_raw``; MetaImage: ``metaimage``). Non-finite voxels are counted, reported and refused above a
threshold; those of NIfTI files on the raw data, since ITK's NIfTI reader turns them into 0.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pumit_nnunet.corpus.metaimage import check_metaimage
from pumit_nnunet.corpus.nifti_raw import missing_data_error, scan_nifti
from pumit_nnunet.errors import DataError

#: refuse images with more than this fraction of NaN/Inf voxels (below it they are replaced by the finite minimum)
MAX_NONFINITE_FRACTION = 0.01
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_READ = 1 << 20


def gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file, read to its end so that truncation and CRC errors surface."""
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(_READ):
                total += len(chunk)
    except EOFError as error:
        raise DataError(f"truncated gzip stream ({error}); the file is incomplete", path) from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"corrupt gzip stream: {error}", path) from error
    return total


def check_source_file(path: Path) -> int:
    """Refuse a file that holds less than its header promises (NIfTI, MetaImage), whose gzip stream is broken
    (any ``.gz``) or whose compressed MetaImage data is corrupt. Returns the number of NaN/Inf voxels of a float
    NIfTI, counted on the raw data because ITK reads them as 0 (0 for other formats, whose readers keep them)."""
    name = path.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        scan = scan_nifti(path)
        if scan.available < scan.layout.data_bytes:
            raise missing_data_error(scan.layout.dims, scan.layout.data_bytes, scan.available, path)
        return scan.nonfinite
    if name.endswith(".gz"):
        gzip_length(path)
    elif name.endswith((".mha", ".mhd")):
        check_metaimage(path)
    return 0


@dataclass(frozen=True)
class FiniteReport:
    """How many voxels of an image were not finite (and were replaced by the finite minimum)."""

    fraction: float
    replaced: int


def replace_nonfinite(array: np.ndarray, source: str | Path, max_fraction: float = MAX_NONFINITE_FRACTION
                      ) -> tuple[np.ndarray, FiniteReport]:
    """Replace NaN/Inf by the finite minimum (the background of scans); refuse when none or too many are finite."""
    if not np.issubdtype(array.dtype, np.floating):
        return array, FiniteReport(0.0, 0)
    finite = np.isfinite(array)
    bad = int(array.size - np.count_nonzero(finite))
    if bad == 0:
        return array, FiniteReport(0.0, 0)
    if bad == array.size:
        raise DataError("no finite voxels (every voxel is NaN or Inf)", source)
    fraction = bad / array.size
    if fraction > max_fraction:
        raise DataError(f"{fraction:.2%} of the voxels are NaN or Inf (more than the {max_fraction:.2%} allowed; "
                        f"raise it with --max-nonfinite)", source)
    return np.where(finite, array, array[finite].min()), FiniteReport(fraction, bad)
