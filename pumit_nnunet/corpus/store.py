"""The corpus store: one chunked, compressed blosc2 array per image plus a parquet manifest.

Layout of a store folder::

    store.json                      format marker and version
    catalog.json                    the user's own datasets (``corpus add``), same schema as the built-in catalog
    data/<dataset>/<name>.b2nd      (C, D, H, W) uint8/uint16, value = q / levels in [0, 1]
    manifest/segments/*.parquet     records appended by conversion runs (one writer per part, never shared)
    manifest.parquet                the consolidated manifest (latest record per key, with the split)

blosc2 was chosen by measurement (``benchmarks/bench_corpus_store.py``): slicing an NDArray decompresses only
the chunks a crop touches; zarr is not needed for that and is one more dependency.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from pumit_nnunet.io import write_text_atomic

STORE_FORMAT = "pumit-corpus"
STORE_VERSION = 1
MANIFEST = "manifest.parquet"
SEGMENTS = Path("manifest") / "segments"
#: chunk and block edge lengths (depth, in-plane) and codec chosen by measurement for 80-160 voxel crops
#: (benchmarks/bench_corpus_store.py; zstd compresses ~15% better but decodes crops 2-3x slower than lz4hc)
CHUNK = (16, 128)
BLOCK = (16, 32)
CLEVEL = 5


@dataclass
class CorpusRecord:
    """One manifest row: one stored image, or one source that failed (status ``failed``, with the reason)."""

    key: str
    dataset: str
    source: str
    item: str = ""  # the source item's key (one file or DICOM series may yield several images)
    status: str = "ok"
    error: str = ""
    modality: str = ""
    channels: int = 0
    shape_d: int = 0
    shape_h: int = 0
    shape_w: int = 0
    spacing_d: float = 0.0
    spacing_h: float = 0.0
    spacing_w: float = 0.0
    origin_shape: str = ""
    levels: int = 0
    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    min: float = 0.0
    max: float = 0.0
    p0_5: float = 0.0
    p99_5: float = 0.0
    weight: float = 1.0
    multiplier: float = 1.0
    split: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.shape_d, self.shape_h, self.shape_w

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.spacing_d, self.spacing_h, self.spacing_w


RECORD_FIELDS = tuple(f.name for f in fields(CorpusRecord))


def is_store(path: str | os.PathLike) -> bool:
    marker = Path(path) / "store.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("format") == STORE_FORMAT
    except ValueError:
        return False


def init_store(path: str | os.PathLike) -> Path:
    """Create (or reuse) a store folder; refuses a non-empty folder that is not a store."""
    path = Path(path)
    if path.exists() and not is_store(path) and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not empty and is not a corpus store; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    if not is_store(path):
        write_text_atomic(path / "store.json", json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))
    return path


def array_path(store: Path, key: str) -> Path:
    return store / "data" / f"{key}.b2nd"


def chunk_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """blosc2 chunks and blocks for a (C, D, H, W) array: all channels together, clipped to the shape."""
    c, d, h, w = shape
    chunks = (c, min(d, CHUNK[0]), min(h, CHUNK[1]), min(w, CHUNK[1]))
    blocks = (c, min(d, BLOCK[0]), min(h, BLOCK[1]), min(w, BLOCK[1]))
    return chunks, blocks


def write_array(path: Path, data: np.ndarray) -> None:
    """Store ``data`` (C, D, H, W) as a blosc2 NDArray (lz4hc + bit shuffle), atomically."""
    import blosc2

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    chunks, blocks = chunk_shape(data.shape)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": CLEVEL, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}
    try:
        blosc2.asarray(np.ascontiguousarray(data), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_array(path: Path):
    """Open a stored image lazily (slicing reads only the touched chunks)."""
    import blosc2

    if not path.is_file():
        raise FileNotFoundError(f"stored image missing: {path}")
    return blosc2.open(str(path), mode="r")


def read_box(array, start: Iterable[int], size: Iterable[int]) -> np.ndarray:
    """Read the spatial box ``start:start+size`` of a (C, D, H, W) array; outside the image reads as 0."""
    start, size = list(start), list(size)
    shape = array.shape[1:]
    lo = [max(s, 0) for s in start]
    hi = [min(s + n, dim) for s, n, dim in zip(start, size, shape)]
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    if all(h > l for l, h in zip(lo, hi)):
        dst = tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))
        out[(slice(None), *dst)] = array[(slice(None), *(slice(l, h) for l, h in zip(lo, hi)))]
    return out


# ----------------------------------------------------------------------------------------------------- manifest
def segment_name(part: int, parts: int, sequence: int) -> str:
    """Segment file names sort in write order: nanosecond timestamp, then part and sequence number."""
    return f"{time.time_ns():020d}-part{part:04d}of{parts:04d}-{sequence:06d}"


def write_segment(store: Path, name: str, records: list[CorpusRecord]) -> None:
    """Append records as one new parquet segment (atomic; each conversion part writes its own names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not records:
        return
    table = pa.Table.from_pylist([asdict(r) for r in records])
    path = store / SEGMENTS / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_segments(store: Path):
    """All segment rows in write order (a pandas DataFrame with the record columns)."""
    import pandas as pd

    paths = sorted((store / SEGMENTS).glob("*.parquet"))  # names start with a write timestamp
    frames = [pd.read_parquet(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=list(RECORD_FIELDS))
    return pd.concat(frames, ignore_index=True)


def holdout_rank(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def assign_split(frame):
    """One held-out image per (dataset, modality) with at least two images: the smallest key hash."""
    frame = frame.copy()
    ok = frame["status"] == "ok"
    frame["split"] = np.where(ok, "train", "")
    groups = frame[ok].assign(_rank=frame.loc[ok, "key"].map(holdout_rank)).groupby(["dataset", "modality"])
    for _, group in groups:
        if len(group) >= 2:
            frame.loc[group["_rank"].idxmin(), "split"] = "val"
    return frame


def consolidate_manifest(store: Path):
    """Merge the segments (latest record per key wins; a source's failure is dropped once it converts)."""
    frame = read_segments(store).drop_duplicates("key", keep="last")
    converted = set(frame.loc[frame["status"] == "ok", "item"])
    frame = frame[(frame["status"] == "ok") | ~frame["item"].isin(converted)]
    frame = assign_split(frame.sort_values("key").reset_index(drop=True))
    tmp = store / f".{MANIFEST}.tmp"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, store / MANIFEST)
    return frame


def read_manifest(store: str | os.PathLike):
    """The consolidated manifest of a store (consolidating first when only segments exist)."""
    store = Path(store)
    if not is_store(store):
        raise FileNotFoundError(f"{store} is not a corpus store (no store.json); create one with `pumit-nnunet corpus convert`")
    import pandas as pd

    path = store / MANIFEST
    if not path.is_file():
        return consolidate_manifest(store)
    return pd.read_parquet(path)
