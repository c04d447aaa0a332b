"""What ``pumit-nnunet demo`` shows: the side-by-side table (Dice, HD95, times) and the overlay picture.

Metrics come from :mod:`pumit_nnunet.evaluation.metrics` (the same code as ``pumit-nnunet evaluate``), on the
held-out scan's label grid; the picture shows the image, the label and every row's prediction on the same slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pumit_nnunet.io import write_figure_atomic

__all__ = ["RowResult", "score_prediction", "format_table", "format_duration", "overlay_slices", "save_overlay_png"]

#: CT window of the picture (HU): lung window, so that lung fields and vessels both show
WINDOW_HU = (-1000.0, 400.0)


@dataclass(frozen=True)
class RowResult:
    """One line of the table."""

    trainer: str
    start: str
    dice: float
    hd95: float
    train_s: float
    predict_s: float


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(float(s) for s in image.GetSpacing()[::-1])


def score_prediction(prediction: Path, label: Path, foreground: int = 1) -> tuple[float, float]:
    """``(Dice, HD95 in mm)`` of one foreground label of a prediction against the reference label file."""
    from pumit_nnunet.evaluation.metrics import class_metrics

    pred, _ = _read(prediction)
    ref, spacing = _read(label)
    if pred.shape != ref.shape:
        raise ValueError(f"{prediction}: shape {pred.shape} differs from the label's {ref.shape}")
    metrics = class_metrics(pred == foreground, ref == foreground, spacing)
    return metrics.dice, metrics.hd95


def format_duration(seconds: float) -> str:
    """``3m05s`` (or ``42s``)."""
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def format_table(rows: Sequence[RowResult]) -> str:
    """A plain-text table, one row per trainer, columns aligned (text left, numbers right)."""
    header = ("trainer", "initial weights", "Dice", "HD95 (mm)", "train", "predict")
    lines = [(r.trainer, r.start, _number(r.dice, 3), _number(r.hd95, 1), format_duration(r.train_s),
              format_duration(r.predict_s)) for r in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(line) for line in lines]])


def overlay_slices(label: np.ndarray, count: int = 3) -> list[int]:
    """``count`` axial slices evenly inside the label's extent (the middle of the volume when it is empty)."""
    found = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    low, high = (int(found[0]), int(found[-1])) if found.size else (label.shape[0] // 2, label.shape[0] // 2)
    return [int(round(low + (high - low) * (i + 1) / (count + 1))) for i in range(count)]


def _views(image: np.ndarray, mask: np.ndarray, slices: Sequence[int], coronal_aspect: float) -> list[tuple]:
    """(grey, mask, aspect, origin, title) of each column: the axial slices, then the middle coronal row."""
    row = image.shape[1] // 2
    views = [(image[z], mask[z], 1.0, "upper", f"axial slice {z}") for z in slices]
    views.append((image[:, row], mask[:, row], coronal_aspect, "lower", f"coronal row {row}"))
    return views


def save_overlay_png(image_file: Path, label_file: Path, predictions: dict[str, Path], path: Path) -> Path:
    """One PNG: a row for the reference label and one per prediction (named on the left), each overlaid in
    colour on the CT, on the same axial slices plus one coronal slice. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    image, spacing = _read(image_file)
    masks = {"reference label": _read(label_file)[0], **{name: _read(p)[0] for name, p in predictions.items()}}
    slices = overlay_slices(masks["reference label"])
    fig, axes = plt.subplots(len(masks), len(slices) + 1, figsize=(3.2 * (len(slices) + 1), 3.0 * len(masks)),
                             squeeze=False)
    for row, (name, mask) in enumerate(masks.items()):
        for ax, (grey, overlay, aspect, origin, title) in zip(axes[row], _views(image, mask, slices, spacing[0] / spacing[2])):
            ax.imshow(grey, cmap="gray", vmin=WINDOW_HU[0], vmax=WINDOW_HU[1], aspect=aspect, origin=origin)
            ax.imshow(np.ma.masked_where(overlay == 0, overlay), cmap="autumn", alpha=0.45, aspect=aspect,
                      origin=origin, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if row == 0 else "", fontsize=9)
        axes[row, 0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    return write_figure_atomic(fig, path, dpi=90)
