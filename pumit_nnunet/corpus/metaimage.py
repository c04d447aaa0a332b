"""MetaImage (``.mha``/``.mhd``) voxel data checked against its header before ITK reads it (issue 12 §2).

Measured with SimpleITK: a truncated MetaImage is refused, but with the misleading reason "No such file or
directory"; worse, a corrupted zlib stream (``CompressedData = True``) is read without an error as an image
full of wrong voxels ("Uncompress failed" goes to the console only). So the header is parsed here, raw data
is measured and compressed data is decompressed to its end (zlib's Adler-32 catches corruption). NRRD needs
no such check: teem refuses truncated raw and gzip data and corrupt gzip streams itself.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pumit_nnunet.corpus.nifti_raw import missing_data_error
from pumit_nnunet.errors import DataError

#: bytes per element of MetaIO's element types (metaTypes.h)
_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                  "MET_DOUBLE": 8}
_HEAD = 1 << 16
_READ = 1 << 22


@dataclass(frozen=True)
class MetaHeader:
    """The fields of a MetaImage header that say how many voxel bytes there are, and where."""

    dims: tuple[int, ...]
    data_bytes: int
    compressed: bool
    data_file: str  # "LOCAL" or a file name relative to the header
    header_end: int  # offset of the data in an attached (LOCAL) file
    skip: int  # HeaderSize of a detached data file (-1: the data is at its end)


def parse_meta_header(head: bytes) -> MetaHeader | None:
    """Parse ``Key = Value`` lines up to ``ElementDataFile`` (the last header line); None when the header is
    not one this check understands (unknown element type, lists of slice files): ITK alone decides then."""
    fields, offset = {}, 0
    for line in head.split(b"\n"):
        offset += len(line) + 1
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    element = _ELEMENT_BYTES.get(fields.get("ElementType", ""))
    data_file = fields["ElementDataFile"]
    if element is None or "DimSize" not in fields or data_file.upper().startswith("LIST") or "%" in data_file:
        return None
    dims = tuple(int(d) for d in fields["DimSize"].split())
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    compressed = fields.get("CompressedData", "False").lower() == "true"
    return MetaHeader(dims, int(np.prod(dims, dtype=np.int64)) * channels * element, compressed, data_file,
                      offset, int(fields.get("HeaderSize", "0")))


def _inflated_length(handle, path: Path) -> int:
    """Length of the zlib stream at the handle's position, read to its end (Adler-32 verified)."""
    inflater, total = zlib.decompressobj(), 0
    try:
        while not inflater.eof and (chunk := handle.read(_READ)):
            total += len(inflater.decompress(chunk))
    except zlib.error as error:
        raise DataError(f"corrupt compressed voxel data: {error}", path) from error
    if not inflater.eof:
        raise DataError(f"compressed voxel data ends early: it decompresses to {total} bytes before the stream "
                        f"stops (truncated file)", path)
    return total


def check_metaimage(path: Path) -> None:
    """Refuse a MetaImage whose voxel data is shorter than its header says, or whose compressed data is corrupt."""
    with open(path, "rb") as handle:
        header = parse_meta_header(handle.read(_HEAD))
    if header is None:
        return
    local = header.data_file.upper() == "LOCAL"
    data = path if local else path.parent / header.data_file
    with open(data, "rb") as handle:
        start = header.header_end if local else max(header.skip, 0)
        if header.skip < 0 and not local and not header.compressed:
            start = max(data.stat().st_size - header.data_bytes, 0)  # HeaderSize -1: the data ends the file
        handle.seek(start)
        have = _inflated_length(handle, data) if header.compressed else data.stat().st_size - start
    if have < header.data_bytes:
        raise missing_data_error(header.dims, header.data_bytes, have, data)


def detached_data_name(header: Path) -> str | None:
    """The data file a detached header (``.mhd`` ``ElementDataFile``, ``.nhdr`` ``data file``) names beside it,
    so that discovery does not list it as a file of its own; None when the data is attached or a list."""
    try:
        with open(header, "rb") as handle:
            lines = handle.read(_HEAD).decode("latin-1").splitlines()
    except OSError:
        return None
    for line in lines:
        key, separator, value = line.partition("=" if header.suffix.lower() == ".mhd" else ":")
        if separator and key.strip().lower() in ("elementdatafile", "data file", "datafile"):
            value = value.strip()
            return None if value.upper() == "LOCAL" or value.upper().startswith("LIST") else Path(value).name
    return None
