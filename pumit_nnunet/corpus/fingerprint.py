"""Fingerprints of source items, so that a re-run of ``corpus convert`` notices changed sources.

The skip test must stay cheap on a multi-TB corpus, so it uses what a stat and two short reads give: every
file's path, size, mtime and a hash of its first and last 64 KiB (a full hash would read the corpus again on
every re-run). A different folder with the same name differs in path, and an edited file in size, mtime or
its edges.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

_EDGE = 1 << 16


def _edges(path: Path, size: int) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(_EDGE)
        if size > 2 * _EDGE:
            handle.seek(size - _EDGE)
        return head + handle.read(_EDGE)


def quick_fingerprint(files: Sequence[str | Path]) -> str:
    """Hex digest over (resolved path, size, mtime_ns, head/tail bytes) of each file, in the given order."""
    digest = hashlib.sha256()
    for name in files:
        path = Path(name)
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        digest.update(_edges(path, stat.st_size))
    return digest.hexdigest()
