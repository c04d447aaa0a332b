"""Conversion of raw datasets into a corpus store: parallel, resumable, shardable, failures recorded.

Workers (spawn-safe ``multiprocessing``) read, preprocess and write one source item each and return manifest
records; the parent appends them to parquet segments every few seconds, so an interrupted run loses at most
the items in flight. A re-run skips items that already converted and retries the failed ones.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

from pumit_nnunet.corpus.catalog import Catalog, DatasetSpec, load_catalog
from pumit_nnunet.corpus.discover import SourceItem, discover, select_part
from pumit_nnunet.corpus.preprocess import preprocess_image
from pumit_nnunet.corpus.readers import is_natural, load_source
from pumit_nnunet.corpus.store import (CorpusRecord, array_path, consolidate_manifest, init_store, read_segments,
                                       segment_name, write_array, write_segment)

FLUSH_SECONDS = 10.0
FLUSH_RECORDS = 512


@dataclass
class ConversionReport:
    """What one conversion run did."""

    store: Path
    converted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    @property
    def failed(self) -> int:
        return len(self.failures)


def resolve_modality(modality: str, natural: bool, channels: int) -> str:
    """Natural-format images carry an ``RGB/`` or ``gray/`` prefix (their scaling is 0-255, not percentiles)."""
    if not natural or modality.startswith(("RGB/", "gray/")):
        return modality
    base = "photo" if modality in ("", "unknown", "auto") else modality
    return f"{'RGB' if channels == 3 else 'gray'}/{base}"


def _failure(item: SourceItem, reason: str) -> CorpusRecord:
    return CorpusRecord(key=item.key, dataset=item.dataset, source=item.path, item=item.key, status="failed",
                        error=reason, modality=item.modality, multiplier=item.multiplier)


def convert_item(item: SourceItem, store: str) -> list[CorpusRecord]:
    """Convert one source item into stored images; any error becomes one ``failed`` record with the reason."""
    if item.error:
        return [_failure(item, item.error)]
    try:
        images = load_source(item.path, item.files, depth_rule=item.depth_axis, sequence_4d=item.sequence_4d,
                             modality=item.modality, channel_modalities=item.channel_modalities)
        records = []
        for image in images:
            natural = is_natural(image.array, image.is_2d)
            stored = preprocess_image(image.array, image.spacing, natural)
            key = item.key + image.suffix
            write_array(array_path(Path(store), key), stored.data)
            c, d, h, w = stored.data.shape
            records.append(CorpusRecord(
                key=key, dataset=item.dataset, source=item.path, item=item.key,
                modality=resolve_modality(image.modality, natural, c), channels=c, shape_d=d, shape_h=h, shape_w=w,
                spacing_d=stored.spacing[0], spacing_h=stored.spacing[1], spacing_w=stored.spacing[2],
                origin_shape="x".join(map(str, image.origin_shape)), levels=stored.levels,
                weight=item.weight * image.weight, multiplier=item.multiplier, **vars(stored.stats)))
        return records
    except Exception as error:  # noqa: BLE001 - a broken file must not stop a multi-TB run; it is recorded
        return [_failure(item, f"{type(error).__name__}: {error}")]


def _check_not_inside_sources(store: Path, sources: Sequence[Path]) -> None:
    resolved = store.resolve()
    for source in sources:
        source = source.resolve()
        root = source if source.is_dir() else source.parent
        if resolved == root or root in resolved.parents or (source.is_dir() and resolved in source.parents):
            raise ValueError(f"the store {store} must not be inside or next to the source {source}; choose another --out")


def dataset_spec_for(source: Path, dataset: str | None, catalog: Catalog) -> DatasetSpec:
    """The catalog entry to use: ``--dataset``, else the one named like the folder, else a bare spec."""
    if dataset:
        return catalog[dataset] if dataset in catalog else DatasetSpec(name=dataset, modalities=())
    name = source.name if source.is_dir() else source.parent.name
    return catalog[name] if name in catalog else DatasetSpec(name=name or "dataset", modalities=())


def _run_items(items: list[SourceItem], store: Path, num_workers: int) -> Iterator[list[CorpusRecord]]:
    work = partial(convert_item, store=str(store))
    if num_workers <= 0:
        yield from map(work, items)
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap_unordered(work, items, chunksize=1)


def convert(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, dataset: str | None = None,
            modality: str = "", num_workers: int = 0, part: int = 0, parts: int = 1, progress: bool = True
            ) -> ConversionReport:
    """Convert ``sources`` (raw dataset folders, plain image folders or files) into the store ``out``."""
    from tqdm import tqdm

    sources = [Path(s) for s in sources]
    store = Path(out)
    _check_not_inside_sources(store, sources)
    init_store(store)
    catalog = load_catalog(store / "catalog.json")
    items = [i for s in sources for i in discover(s, dataset_spec_for(s, dataset, catalog), modality)]
    items = select_part(items, part, parts)
    done = read_segments(store)
    done_items = set(done.loc[done["status"] == "ok", "item"]) if len(done) else set()
    todo = [i for i in items if i.key not in done_items]
    report = ConversionReport(store, skipped=len(items) - len(todo))
    pending, sequence, last_flush = [], 0, time.monotonic()
    for records in tqdm(_run_items(todo, store, num_workers), total=len(todo), desc="corpus convert",
                        unit="item", disable=not progress):
        pending.extend(records)
        for record in records:
            if record.status == "ok":
                report.converted += 1
            else:
                report.failures.append((record.source, record.error))
        if len(pending) >= FLUSH_RECORDS or time.monotonic() - last_flush > FLUSH_SECONDS:
            write_segment(store, segment_name(part, parts, sequence), pending)
            pending, sequence, last_flush = [], sequence + 1, time.monotonic()
    write_segment(store, segment_name(part, parts, sequence), pending)
    consolidate_manifest(store)
    return report
