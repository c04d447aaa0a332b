"""One call for trainers: get a store from whatever the user pointed at."""

from __future__ import annotations

import os
from pathlib import Path

from pumit_nnunet.corpus.store import is_store
from pumit_nnunet.errors import DataError


def ensure_store(source: str | os.PathLike, work_dir: str | os.PathLike, *, num_workers: int = 0) -> Path:
    """A store folder is returned as is; an nnU-Net raw dataset folder (imagesTr + dataset.json) or a plain
    folder of images is converted into ``work_dir/<name>`` (resumable) and that store is returned."""
    from pumit_nnunet.corpus.convert import convert

    source = Path(source)
    if is_store(source):
        return source
    if not source.exists():
        raise FileNotFoundError(f"pre-training data not found: {source} (expected a corpus store, an nnU-Net raw "
                                f"dataset folder or a folder of images)")
    out = Path(work_dir) / f"{source.name}-corpus"
    report = convert([source], out, num_workers=num_workers, progress=True)
    if report.converted == 0 and report.skipped == 0:
        reasons = "; ".join(f"{s}: {e}" for s, e in report.failures[:5])
        raise DataError(f"no image could be converted ({report.failed} failures: {reasons})", source)
    return out
