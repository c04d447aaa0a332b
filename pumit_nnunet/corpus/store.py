"""The corpus store: one chunked, compressed blosc2 array per image plus a parquet manifest.

Layout of a store folder::

    store.json                      format marker and version
    catalog.json                    the user's own datasets (``corpus add``), same schema as the built-in catalog
    data/<dataset>/<name>.<tag>.b2nd  (C, D, H, W) uint8/uint16, value = q / levels in [0, 1]; ``tag`` is the
                                    source's fingerprint, so a changed source gets new files and the manifest
                                    switches to them in one atomic replace (version 1 stores: no tag)
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
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from pumit_nnunet.errors import DataError
from pumit_nnunet.io import atomic_path, write_text_atomic

if TYPE_CHECKING:  # imported where used: both are slow to import
    import blosc2
    import pandas as pd

STORE_FORMAT = "pumit-corpus"
#: 2: per-record ``file`` (fingerprint-tagged names), source fingerprints, data checksums. Version 1 stores are
#: read as they are (missing columns get defaults; their files are ``data/<key>.b2nd``).
STORE_VERSION = 2
MANIFEST = "manifest.parquet"
SEGMENTS = Path("manifest") / "segments"
#: chunk and block edge lengths (depth, in-plane), codec and filter chosen by measurement for 80-160 voxel
#: crops with the files evicted from the page cache (benchmarks/bench_corpus_store.py, median of 5 on the
#: shared 2-core machine, vs a float16 .npy memmap): 256-voxel in-plane chunks halve the reads per crop
#: (cold 0.72x -> 0.93x with BITSHUFFLE), and byte SHUFFLE decodes faster than BITSHUFFLE (warm 0.61x -> 0.81x)
#: at 0.48x instead of 0.45x of the memmap's disk; ZSTD level 1 and DELTA decode 1.5-2x slower than LZ4HC,
#: 32-deep chunks and 64-voxel blocks read more than a crop needs. Every file records its own layout, so
#: stores written with another one (before: 16/128 chunks, BITSHUFFLE) are read as they are.
CHUNK = (16, 256)
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
    file: str = ""  # store-relative path of the array ("" in version 1 stores: data/<key>.b2nd)
    fingerprint: str = ""  # size, mtime and head/tail hash of the source files (skip test of re-runs)
    attempt_ns: int = 0  # when this item was converted; the latest attempt of an item supersedes older ones
    nonfinite_fraction: float = 0.0  # share of NaN/Inf voxels replaced by the finite minimum
    data_sha1: str = ""  # checksum of the stored array (LZ4 has no checksum of its own; validate compares it)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.shape_d, self.shape_h, self.shape_w

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.spacing_d, self.spacing_h, self.spacing_w


RECORD_FIELDS = tuple(f.name for f in fields(CorpusRecord))


def is_store(path: str | os.PathLike) -> bool:
    """A folder with our ``store.json``; a store written by a newer release is refused with a message."""
    marker = Path(path) / "store.json"
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if info.get("format") != STORE_FORMAT:
        return False
    if int(info.get("version", 1)) > STORE_VERSION:
        raise DataError(f"corpus store version {info.get('version')} is newer than this release reads "
                        f"({STORE_VERSION}); upgrade pumit-nnunet", marker)
    return True


def init_store(path: str | os.PathLike) -> Path:
    """Create (or reuse) a store folder; refuses a non-empty folder that is not a store."""
    path = Path(path)
    if path.exists() and not is_store(path) and any(path.iterdir()):
        raise FileExistsError(f"{path} exists, is not empty and is not a corpus store; choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    if not is_store(path):
        write_text_atomic(path / "store.json", json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))
    return path


def array_path(store: Path, key: str, tag: str = "") -> Path:
    """Where the array of ``key`` lives: ``data/<key>.<tag>.b2nd`` (version 1 stores: no tag)."""
    return store / "data" / (f"{key}.{tag}.b2nd" if tag else f"{key}.b2nd")


def member_path(store: str | os.PathLike, row: Any) -> Path:
    """The array file of a manifest row (record, namedtuple or pandas row)."""
    file = getattr(row, "file", "") or ""
    return Path(store) / file if isinstance(file, str) and file else array_path(Path(store), row.key)


def data_checksum(data: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()


def chunk_shape(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """blosc2 chunks and blocks for a (C, D, H, W) array: all channels together, clipped to the shape."""
    c, d, h, w = shape
    chunks = (c, min(d, CHUNK[0]), min(h, CHUNK[1]), min(w, CHUNK[1]))
    blocks = (c, min(d, BLOCK[0]), min(h, BLOCK[1]), min(w, BLOCK[1]))
    return chunks, blocks


def write_array(path: Path, data: np.ndarray) -> None:
    """Store ``data`` (C, D, H, W) as a blosc2 NDArray (lz4hc + byte shuffle), atomically."""
    import blosc2

    chunks, blocks = chunk_shape(data.shape)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": CLEVEL, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
    with atomic_path(path, suffix=".b2nd") as tmp:
        blosc2.asarray(np.ascontiguousarray(data), urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def open_array(path: Path) -> blosc2.NDArray:
    """Open a stored image lazily (slicing reads only the touched chunks)."""
    import blosc2

    if not path.is_file():
        raise FileNotFoundError(f"stored image missing: {path}")
    return blosc2.open(str(path), mode="r")


def read_box(array: blosc2.NDArray | np.ndarray, start: Iterable[int], size: Iterable[int],
             slab: tuple[int, int] | None = None) -> np.ndarray:
    """Read the spatial box ``start:start+size`` of a (C, D, H, W) array; outside the image (and outside the
    depth ``slab`` [first, last) when given) reads as 0."""
    start, size = list(start), list(size)
    first, last = slab if slab is not None else (0, array.shape[1])
    bounds = [(first, last), (0, array.shape[2]), (0, array.shape[3])]
    lo = [max(s, b[0]) for s, b in zip(start, bounds)]
    hi = [min(s + n, b[1]) for s, n, b in zip(start, size, bounds)]
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
    with atomic_path(store / SEGMENTS / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)


def read_segments(store: Path) -> pd.DataFrame:
    """All segment rows in write order (a pandas DataFrame with the record columns)."""
    import pandas as pd

    paths = sorted((store / SEGMENTS).glob("*.parquet"))  # names start with a write timestamp
    frames = [pd.read_parquet(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=list(RECORD_FIELDS))
    return with_defaults(pd.concat(frames, ignore_index=True))


def with_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the columns a version 1 store lacks, with their record defaults."""
    defaults = CorpusRecord(key="", dataset="", source="")
    for name in RECORD_FIELDS:
        if name not in frame.columns:
            frame[name] = getattr(defaults, name)
    return frame


def holdout_rank(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def assign_split(frame: pd.DataFrame) -> pd.DataFrame:
    """One held-out image per (dataset, modality) with at least two images: the smallest key hash."""
    frame = frame.copy()
    ok = frame["status"] == "ok"
    frame["split"] = np.where(ok, "train", "")
    groups = frame[ok].assign(_rank=frame.loc[ok, "key"].map(holdout_rank)).groupby(["dataset", "modality"])
    for _, group in groups:
        if len(group) >= 2:
            frame.loc[group["_rank"].idxmin(), "split"] = "val"
    return frame


def latest_records(frame: pd.DataFrame) -> pd.DataFrame:
    """Per item, the records of its latest conversion. A failure that read the source (it has a fingerprint:
    the source changed and is now broken) supersedes older images, so no stale image outlives its source; a
    failure that could not read it (permission denied, vanished) leaves the converted images in place."""
    ok = frame["status"] == "ok"
    last_ok = frame[ok].groupby("item")["attempt_ns"].max()
    read_failures = frame[~ok & (frame["fingerprint"] != "")].groupby("item")["attempt_ns"].max()
    stale = read_failures[read_failures > last_ok.reindex(read_failures.index, fill_value=-1)].index
    keep_ok = ok & (frame["attempt_ns"] == frame["item"].map(last_ok)) & ~frame["item"].isin(stale)
    keep_failed = ~ok & ~frame["item"].isin(set(frame.loc[keep_ok, "item"]))
    return frame[keep_ok | keep_failed].drop_duplicates("key", keep="last")


def consolidate_manifest(store: Path) -> pd.DataFrame:
    """Merge the segments into the manifest (one atomic replace), then delete the files it no longer names."""
    everything = read_segments(store)
    frame = assign_split(latest_records(everything).sort_values("key").reset_index(drop=True))
    with atomic_path(store / MANIFEST) as tmp:
        frame.to_parquet(tmp, index=False)
    kept = {str(member_path(store, row)) for row in frame[frame["status"] == "ok"].itertuples(index=False)}
    for row in everything[everything["status"] == "ok"].itertuples(index=False):
        if str(member_path(store, row)) not in kept:
            member_path(store, row).unlink(missing_ok=True)
    return frame


def read_manifest(store: str | os.PathLike) -> pd.DataFrame:
    """The consolidated manifest of a store (consolidating first when only segments exist)."""
    store = Path(store)
    if not is_store(store):
        raise FileNotFoundError(f"{store} is not a corpus store (no store.json); create one with `pumit-nnunet corpus convert`")
    import pandas as pd

    path = store / MANIFEST
    if not path.is_file():
        return consolidate_manifest(store)
    return with_defaults(pd.read_parquet(path))
