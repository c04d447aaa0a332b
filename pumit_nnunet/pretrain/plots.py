"""Figures people look at during pre-training: loss curves, image grids and histograms, written atomically as PNG."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import numpy as np

from pumit_nnunet.io import write_figure_atomic

__all__ = ["plot_curves", "save_image_grid", "plot_histogram", "pyplot", "FIGURE_LOOK"]

#: how these figures are saved (``Figure.savefig`` options for :func:`pumit_nnunet.io.write_figure_atomic`)
FIGURE_LOOK = {"dpi": 100, "bbox_inches": "tight"}


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (unless one was chosen already): no display needed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: dict[str, list[tuple[int, float]]], path: str | os.PathLike, title: str = "") -> None:
    """One panel per curve (x = step), nnU-Net ``progress.png`` style; empty curves are skipped."""
    plt = pyplot()
    names = [name for name, points in history.items() if points]
    fig, axes = plt.subplots(max(len(names), 1), 1, figsize=(10, 2.6 * max(len(names), 1)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps, values = zip(*history[name])
        ax.plot(steps, values, color="b", linewidth=1.5, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    write_figure_atomic(fig, path, **FIGURE_LOOK)


def save_image_grid(
    rows: list[list[np.ndarray]],
    path: str | os.PathLike,
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
) -> None:
    """A grid of 2D grey images (each shown with its own [min, max] unless already in [0, 1])."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(max(n_rows, 1), n_cols, figsize=(2.4 * n_cols, 2.4 * max(n_rows, 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2:
                raise ValueError(f"grid image ({i}, {j}) must be 2D, got shape {image.shape}")
            in_unit = image.min() >= 0 and image.max() <= 1
            axes[i, j].imshow(image, cmap="gray", vmin=0 if in_unit else None, vmax=1 if in_unit else None)
            if i == 0 and col_titles is not None and j < len(col_titles):
                axes[i, j].set_title(col_titles[j], fontsize=9)
        if row_titles is not None and i < len(row_titles):
            axes[i, 0].text(-0.05, 0.5, row_titles[i], transform=axes[i, 0].transAxes, rotation=90,
                            ha="right", va="center", fontsize=8)
    write_figure_atomic(fig, path, **FIGURE_LOOK)


def plot_histogram(values: Sequence[float] | np.ndarray, path: str | os.PathLike, title: str = "",
                   as_bars: bool = False, xlabel: str = "", vlines: dict[str, float] | None = None) -> None:
    """A histogram of ``values``; with ``as_bars`` the values themselves are bar heights (e.g. usage per code).

    ``vlines`` draws labelled vertical reference lines (e.g. ``{"log K": 6.93}``).
    """
    plt = pyplot()
    values = np.asarray(values, dtype=np.float64).ravel()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if as_bars:
        ax.bar(np.arange(values.size), values, width=1.0, color="tab:blue")
    else:
        ax.hist(values, bins=min(max(values.size // 4, 10), 100), color="tab:blue")
    for i, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(x, color=f"C{i + 1}", linestyle="--", label=f"{label} = {x:.3f}")
    if vlines:
        ax.legend()
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    write_figure_atomic(fig, path, **FIGURE_LOOK)
