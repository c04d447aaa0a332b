"""Deterministic builders of the real-demo folder and of its parts, under a folder the caller chooses.

Every builder writes into a sibling ``.partial-*`` folder first and moves it into place when complete, so an
interrupted build leaves nothing half-written. The result carries a marker (``.pumit-data.json``) with the content
hash of the registry and of the builder code: a folder whose marker holds the current hash is reused as it is, one
with an older hash is rebuilt, and a non-empty folder without our marker is refused (never overwrite user data).
Two builds give identical bytes (the gzip streams have no time stamps; nothing depends on the clock).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from pumit_nnunet.data.cache import cache_dir, fetch
from pumit_nnunet.data.registry import registry_bytes
from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import (atomic_write_bytes, remove_folder, replace_folder_atomic, write_json_atomic,
                             write_text_atomic)

__all__ = ["build_real_demo", "cached_real_demo", "build_raw_dataset", "build_extras_2d", "real_demo_digest",
           "RAW_DATASETS", "EXTRAS_2D", "MARKER"]

MARKER = ".pumit-data.json"
#: the 2D extras: (source, file) pairs, copied byte for byte
EXTRAS_2D: tuple[tuple[str, str], ...] = (
    *(("pydicom-data", f"{name}_UNCI.dcm") for name in ("RG1", "RG3", "US1", "MR2", "693")),
    ("skimage-samples", "retina.jpg"), ("skimage-samples", "microaneurysms.png"),
)
_CODE_FILES = ("registry.py", "labels.py", "datasets.py", "real_demo.py")


def __getattr__(name: str):  # RAW_DATASETS lives with the dataset code, which imports SimpleITK
    if name == "RAW_DATASETS":
        from pumit_nnunet.data.datasets import RAW_DATASETS

        return RAW_DATASETS
    raise AttributeError(name)


def real_demo_digest() -> str:
    """Hash of what decides the built bytes: the registry and the builder code (a change means a rebuild)."""
    digest = hashlib.sha256(registry_bytes())
    for name in _CODE_FILES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def _marker_digest(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def _publish(dest: Path, kind: str, write: Callable[[Path], None]) -> Path:
    """Build ``dest`` with ``write(folder)`` unless it is already current; refuse a folder we did not make."""
    dest = Path(dest)
    digest = real_demo_digest()
    if dest.exists():
        if not dest.is_dir():
            raise DataError("exists and is not a folder; refusing to overwrite it", dest)
        found = _marker_digest(dest)
        if found == digest:
            return dest
        if found is None and any(dest.iterdir()):
            raise DataError(f"exists and was not made by pumit-nnunet ({MARKER} missing); refusing to overwrite it",
                            dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{dest.name}-", dir=dest.parent))
    try:
        write(partial)
        write_json_atomic(partial / MARKER, {"made_by": "pumit-nnunet data", "kind": kind, "digest": digest})
        _swap_into_place(partial, dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def _swap_into_place(partial: Path, dest: Path) -> None:
    """Replace ``dest`` (absent, empty or an older build of ours) by ``partial`` with renames only."""
    try:
        replace_folder_atomic(partial, dest)  # on failure the previous build is put back
    except OSError:
        if _marker_digest(dest) != real_demo_digest():  # a concurrent build of the same content is as good
            raise


def _write_extras_2d(folder: Path) -> None:
    for source, name in EXTRAS_2D:
        atomic_write_bytes(folder / name, (fetch(source) / name).read_bytes())


def build_extras_2d(dest: Path) -> Path:
    """``dest/`` with the 2D images: CR X-rays, an MR slice, ultrasound, a CT slice (DICOM), a fundus photo (JPEG),
    a microaneurysm crop (PNG)."""
    return _publish(Path(dest), "extras_2d", _write_extras_2d)


def _dataset(name: str):
    from pumit_nnunet.data.datasets import RAW_DATASETS

    if name not in RAW_DATASETS:
        raise UsageError(f"unknown dataset {name!r} (known: {', '.join(RAW_DATASETS)})", name)
    return RAW_DATASETS[name]


def build_raw_dataset(name: str, raw_root: Path) -> Path:
    """``raw_root/<name>``: one real-demo dataset in nnU-Net's raw layout (``RAW_DATASETS`` lists the names)."""
    from pumit_nnunet.data.datasets import write_dataset

    dataset = _dataset(name)

    def write(folder: Path) -> None:
        write_dataset(dataset, folder)

    return _publish(Path(raw_root) / name, "raw_dataset", write)


def _readme(datasets) -> str:
    from pumit_nnunet.data.registry import list_sources

    lines = ["# Real demo data (nnU-Net v2 raw layout), built by pumit-nnunet", "",
             "Made by `pumit_nnunet.data.build_real_demo` from public distributions on the Python package index",
             "(`pumit-nnunet data list`); each dataset.json carries per-case provenance and statistics.", "",
             "| dataset | labels | description |", "|---|---|---|"]
    for d in datasets:
        lines.append(f"| {d.name} | {', '.join(k for k in d.labels if k != 'background')} | {d.description} |")
    lines.append(f"| extras_2d_demo/ | - | {', '.join(name for _, name in EXTRAS_2D)} (copied unchanged) |")
    lines += ["", "Sources:"] + [f"- {s.name}: {s.requirement} ({s.kind}, sha256 {s.archive_sha256[:12]}...), "
                                 f"licence {s.licence}" for s in list_sources()]
    return "\n".join(lines) + "\n"


def _write_real_demo(folder: Path) -> None:
    from pumit_nnunet.data.datasets import RAW_DATASETS, write_dataset

    for dataset in RAW_DATASETS.values():
        write_dataset(dataset, folder / dataset.name)
    _write_extras_2d(folder / "extras_2d_demo")
    write_text_atomic(folder / "README.md", _readme(RAW_DATASETS.values()))


def build_real_demo(dest: Path) -> Path:
    """``dest/`` with the real-demo datasets (``RAW_DATASETS``) and ``extras_2d_demo/``; reused when current."""
    return _publish(Path(dest), "real_demo", _write_real_demo)


def cached_real_demo() -> Path:
    """The real-demo folder kept in the data cache (``<cache_dir()>/real-demo-<digest>``), built when absent.

    Builds for an older registry or builder code (other digests) are removed: only folders carrying our marker."""
    dest = cache_dir() / f"real-demo-{real_demo_digest()}"
    for old in cache_dir().glob("real-demo-*"):
        if old != dest and old.is_dir() and _marker_digest(old) is not None:
            remove_folder(old)  # out of sight first: a reader of the old build never sees it half deleted
    return build_real_demo(dest)
