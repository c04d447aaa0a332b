"""Inspecting and validating a store: counts by dataset, modality and aniso_d; re-opening every image."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing
from pumit_nnunet.corpus.store import data_checksum, member_path, open_array, read_manifest


def with_aniso_d(frame):
    """The manifest with an ``aniso_d`` column (unaugmented; 2D images at the maximum)."""
    spacing = frame[["spacing_d", "spacing_h", "spacing_w"]].to_numpy()
    values = [MAX_ANISO_D if d == 1 else aniso_d_from_spacing(s) for d, s in zip(frame["shape_d"], spacing)]
    return frame.assign(aniso_d=np.asarray(values, dtype=np.int64))


def corpus_counts(store: str | os.PathLike) -> dict:
    """Counts of converted images by dataset, modality and aniso_d, plus failures and the split sizes."""
    frame = read_manifest(store)
    ok = with_aniso_d(frame[frame["status"] == "ok"])
    return {
        "images": int(len(ok)), "failed": int((frame["status"] != "ok").sum()),
        "slices": int((ok["shape_d"]).sum()),
        "by_dataset": ok.groupby("dataset").size().to_dict(),
        "by_modality": ok.groupby("modality").size().to_dict(),
        "by_aniso_d": {int(k): int(v) for k, v in ok.groupby("aniso_d").size().items()},
        "by_split": ok.groupby("split").size().to_dict(),
    }


def plot_counts(counts: dict, path: str | os.PathLike) -> Path:
    """Bar charts of the counts by dataset, modality and aniso_d, saved atomically as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pumit_nnunet.io import write_figure_atomic

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, name in zip(axes, ("by_dataset", "by_modality", "by_aniso_d")):
        labels = [str(k) for k in counts[name]]
        ax.bar(labels, list(counts[name].values()))
        ax.set_title(name.replace("_", " "))
        ax.tick_params(axis="x", rotation=60)
    figure.tight_layout()
    return write_figure_atomic(figure, path)


@dataclass
class ValidationReport:
    """Result of re-opening every stored image."""

    checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (key, problem)


def check_member(store: str | os.PathLike, row) -> None:
    """Re-read one stored image completely: present, decodable, shape, value range and checksum as recorded."""
    data = open_array(member_path(store, row))[...]
    expected = (row.channels, row.shape_d, row.shape_h, row.shape_w)
    if tuple(data.shape) != expected:
        raise ValueError(f"shape {tuple(data.shape)} != manifest {expected}")
    if data.size and int(data.max()) > int(row.levels):
        raise ValueError(f"value {int(data.max())} above the {row.levels} quantisation levels")
    if row.data_sha1 and data_checksum(data) != row.data_sha1:
        raise ValueError("content differs from the checksum recorded at conversion (corrupted on disk)")


def validate_store(store: str | os.PathLike) -> ValidationReport:
    """Re-open every converted image (see ``check_member``); every broken one is reported, not just the first."""
    frame = read_manifest(store)
    report = ValidationReport()
    for row in frame[frame["status"] == "ok"].itertuples(index=False):
        report.checked += 1
        try:
            check_member(store, row)
        except Exception as error:  # noqa: BLE001 - blosc2 raises RuntimeError/ValueError/OSError for broken files
            report.problems.append((str(member_path(store, row)), " ".join(f"{type(error).__name__}: {error}".split())))
    return report
