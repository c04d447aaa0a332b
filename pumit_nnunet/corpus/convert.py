"""Conversion of raw datasets into a corpus store: parallel, resumable, shardable, failures recorded.

Workers (spawn-safe ``multiprocessing``) read, check, preprocess and write one source item each and return
manifest records; the parent appends them to parquet segments every few seconds, so an interrupted run loses at
most the items in flight. A re-run skips items whose source fingerprint (path, size, mtime, edge hash) is
unchanged, reconverts changed ones into new files (the manifest switches to them atomically) and retries failures.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

from pumit_nnunet.corpus.catalog import Catalog, DatasetSpec, load_catalog
from pumit_nnunet.corpus.discover import SourceItem, discover, select_part
from pumit_nnunet.corpus.fingerprint import quick_fingerprint
from pumit_nnunet.corpus.metaimage import detached_data_name
from pumit_nnunet.corpus.integrity import MAX_NONFINITE_FRACTION, replace_nonfinite
from pumit_nnunet.corpus.preprocess import preprocess_image
from pumit_nnunet.corpus.readers import is_natural, load_source
from pumit_nnunet.corpus.store import (CorpusRecord, array_path, consolidate_manifest, data_checksum, init_store,
                                       read_segments, segment_name, write_array, write_segment)
from pumit_nnunet.errors import PumitError, UsageError

FLUSH_SECONDS = 10.0
FLUSH_RECORDS = 512


@dataclass
class ConversionReport:
    """What one conversion run did."""

    store: Path
    converted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    changed: list[str] = field(default_factory=list)  # sources whose stored images were replaced
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (source, note), e.g. NaN voxels replaced

    @property
    def failed(self) -> int:
        return len(self.failures)


def resolve_modality(modality: str, natural: bool, channels: int) -> str:
    """Natural-format images carry an ``RGB/`` or ``gray/`` prefix (their scaling is 0-255, not percentiles)."""
    if not natural or modality.startswith(("RGB/", "gray/")):
        return modality
    base = "photo" if modality in ("", "unknown", "auto") else modality
    return f"{'RGB' if channels == 3 else 'gray'}/{base}"


@dataclass(frozen=True)
class ConvertOptions:
    """What the user may relax: resampling of unevenly spaced DICOM slices, the share of NaN/Inf voxels allowed."""

    resample_uneven: bool = False
    max_nonfinite: float = MAX_NONFINITE_FRACTION


def _failure(item: SourceItem, reason: str, fingerprint: str = "") -> CorpusRecord:
    return CorpusRecord(key=item.key, dataset=item.dataset, source=item.path, item=item.key, status="failed",
                        error=reason, modality=item.modality, multiplier=item.multiplier, fingerprint=fingerprint,
                        attempt_ns=time.time_ns())


def describe_error(error: BaseException) -> str:
    """One line for a failed item: ours as they are, OS errors by their cause ("permission denied"), others typed."""
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename or ''}".rstrip(": ")
    if isinstance(error, FileNotFoundError):
        return f"does not exist: {error.filename or ''}".rstrip(": ")
    if isinstance(error, PumitError):
        return f"{error.path}: {error.problem}" if error.path else error.problem
    return " ".join(f"{type(error).__name__}: {error}".split())


def item_files(item: SourceItem) -> tuple[str, ...]:
    """The files an item reads: its DICOM slices, or its file plus the data file a detached header names."""
    if item.files:
        return tuple(item.files)
    path = Path(item.path)
    data = detached_data_name(path) if path.suffix.lower() in (".mhd", ".nhdr") else None
    return (item.path, str(path.parent / data)) if data and (path.parent / data).is_file() else (item.path,)


def _record(item: SourceItem, image, store: Path, attempt: int, options: ConvertOptions) -> CorpusRecord:
    array, finite = replace_nonfinite(image.array, item.path, options.max_nonfinite)
    natural = is_natural(array, image.is_2d)
    stored = preprocess_image(array, image.spacing, natural)
    key = item.key + image.suffix
    path = array_path(store, key, item.fingerprint[:12])
    write_array(path, stored.data)
    c, d, h, w = stored.data.shape
    return CorpusRecord(
        key=key, dataset=item.dataset, source=item.path, item=item.key,
        modality=resolve_modality(image.modality, natural, c), channels=c, shape_d=d, shape_h=h, shape_w=w,
        spacing_d=stored.spacing[0], spacing_h=stored.spacing[1], spacing_w=stored.spacing[2],
        origin_shape="x".join(map(str, image.origin_shape)), levels=stored.levels,
        weight=item.weight * image.weight, multiplier=item.multiplier, file=path.relative_to(store).as_posix(),
        fingerprint=item.fingerprint, attempt_ns=attempt, nonfinite_fraction=finite.fraction,
        data_sha1=data_checksum(stored.data), **vars(stored.stats))


def convert_item(item: SourceItem, store: str, options: ConvertOptions = ConvertOptions()) -> list[CorpusRecord]:
    """Convert one source item into stored images; any error becomes one ``failed`` record with the reason.

    A failure keeps the item's fingerprint only when the source was readable, so that it supersedes stale
    images of a source that changed into a broken one (``store.latest_records``)."""
    if item.error:
        return [_failure(item, item.error)]
    attempt = time.time_ns()
    try:
        images = load_source(item.path, item.files, depth_rule=item.depth_axis, sequence_4d=item.sequence_4d,
                             modality=item.modality, channel_modalities=item.channel_modalities,
                             resample_uneven=options.resample_uneven)
        return [_record(item, image, Path(store), attempt, options) for image in images]
    except OSError as error:  # the source could not be read: leave what was stored from it
        return [_failure(item, describe_error(error))]
    except Exception as error:  # noqa: BLE001 - a broken file must not stop a multi-TB run; it is recorded
        return [_failure(item, describe_error(error), item.fingerprint)]


def _check_not_inside_sources(store: Path, sources: Sequence[Path]) -> None:
    resolved = store.resolve()
    for source in sources:
        source = source.resolve()
        root = source if source.is_dir() else source.parent
        if resolved == root or root in resolved.parents or (source.is_dir() and resolved in source.parents):
            raise UsageError(f"the store must not be inside or next to the source {source}; choose another --out", store)


def dataset_spec_for(source: Path, dataset: str | None, catalog: Catalog) -> DatasetSpec:
    """The catalog entry to use: ``--dataset``, else the one named like the folder, else a bare spec."""
    if dataset:
        return catalog[dataset] if dataset in catalog else DatasetSpec(name=dataset, modalities=())
    name = source.name if source.is_dir() else source.parent.name
    return catalog[name] if name in catalog else DatasetSpec(name=name or "dataset", modalities=())


def _run_items(items: list[SourceItem], store: Path, num_workers: int, options: ConvertOptions
               ) -> Iterator[list[CorpusRecord]]:
    work = partial(convert_item, store=str(store), options=options)
    if num_workers <= 0:
        yield from map(work, items)
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap_unordered(work, items, chunksize=1)


def _plan(items: list[SourceItem], store: Path, report: ConversionReport) -> list[SourceItem]:
    """Fingerprint every item; keep those new, changed or failed before (changed ones are reported)."""
    done = read_segments(store)
    ok = done[done["status"] == "ok"] if len(done) else done
    previous = dict(zip(ok["item"], ok["fingerprint"])) if len(ok) else {}
    todo = []
    for item in items:
        if item.error:
            todo.append(item)
            continue
        try:
            fingerprint = quick_fingerprint(item_files(item))
        except OSError as error:
            report.failures.append((item.path, describe_error(error)))
            continue
        if previous.get(item.key) == fingerprint:
            report.skipped += 1
            continue
        if previous.get(item.key):  # converted from other content (an edited file, another folder of that name)
            report.changed.append(item.path)
        todo.append(replace(item, fingerprint=fingerprint))
    return todo


def convert(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, dataset: str | None = None,
            modality: str = "", num_workers: int = 0, part: int = 0, parts: int = 1, progress: bool = True,
            options: ConvertOptions = ConvertOptions()) -> ConversionReport:
    """Convert ``sources`` (raw dataset folders, plain image folders or files) into the store ``out``."""
    from tqdm import tqdm

    sources = [Path(s) for s in sources]
    store = Path(out)
    _check_not_inside_sources(store, sources)
    init_store(store)
    catalog = load_catalog(store / "catalog.json")
    items = [i for s in sources for i in discover(s, dataset_spec_for(s, dataset, catalog), modality)]
    items = select_part(items, part, parts)
    report = ConversionReport(store)
    todo = _plan(items, store, report)
    pending, sequence, last_flush = [], 0, time.monotonic()
    for records in tqdm(_run_items(todo, store, num_workers, options), total=len(todo), desc="corpus convert",
                        unit="item", disable=not progress):
        pending.extend(records)
        for record in records:
            if record.status == "ok":
                report.converted += 1
                if record.nonfinite_fraction:
                    report.warnings.append((record.source, f"{record.nonfinite_fraction:.3%} NaN/Inf voxels replaced "
                                                           f"by the finite minimum in {record.key}"))
            else:
                report.failures.append((record.source, record.error))
        if len(pending) >= FLUSH_RECORDS or time.monotonic() - last_flush > FLUSH_SECONDS:
            write_segment(store, segment_name(part, parts, sequence), pending)
            pending, sequence, last_flush = [], sequence + 1, time.monotonic()
    write_segment(store, segment_name(part, parts, sequence), pending)
    consolidate_manifest(store)
    return report
