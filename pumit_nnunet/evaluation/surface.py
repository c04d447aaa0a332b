"""Spacing-aware surface extraction and surface-to-surface distances.

A *surface voxel* of a binary mask is a foreground voxel with at least one 6-connected background neighbour
(``mask XOR erosion(mask)`` with the 6-connected cross), which is how the official CHAOS evaluator
(emrekavur/CHAOS-evaluation, ``Python/CHAOSmetrics.py::SSD``) and MONAI's ``get_mask_edges`` define it.
The two differ only at the image border:

* CHAOS erodes with ``border_value=1``: outside the image counts as foreground, so a mask cut by the image border
  has no surface on that border (``image_border_is_surface=False``, our default);
* MONAI erodes a zero-padded crop: outside the image counts as background, so such voxels are surface
  (``image_border_is_surface=True``).

Distances are measured between voxel centres in millimetres with a Euclidean distance transform
(``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``). This is exact: it returns the same numbers
as the nearest-neighbour KD-tree both reference evaluators use, without building a tree. Everything is computed in
the bounding box of ``pred | ref`` (plus a one-voxel margin for the erosion), which is also exact because every
surface voxel lies in that box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances in mm: one entry per surface voxel of the source mask."""

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray

    @property
    def symmetric(self) -> np.ndarray:
        """All distances of both directions, concatenated (the CHAOS/MONAI "symmetric" set)."""
        return np.concatenate([self.pred_to_ref, self.ref_to_pred])


def union_bounding_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box (as slices) of the union of the masks, grown by ``margin`` and clipped to the image."""
    union = np.logical_or.reduce(masks)
    if not union.any():
        return None
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, union.shape[axis])))
    return tuple(box)


def surface_mask(mask: np.ndarray, image_border_is_surface: bool = False) -> np.ndarray:
    """Surface voxels of a binary mask: foreground voxels with a 6-connected (face) background neighbour."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0 if image_border_is_surface else 1)
    return mask ^ eroded


def distances_to_surface(target_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every voxel centre to the nearest voxel centre of ``target_surface`` (non-empty)."""
    return ndimage.distance_transform_edt(~target_surface, sampling=tuple(float(s) for s in spacing))


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], image_border_is_surface: bool = False
) -> SurfaceDistances:
    """Directed distances between the surfaces of two binary masks of the same shape.

    ``spacing`` is per array axis (numpy order). When one surface is empty the distances *from* the other one are
    ``inf`` (there is nothing to reach), and the distances from the empty one are an empty array; when both are
    empty both arrays are empty. This mirrors MONAI's ``get_surface_distance``.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred.shape} vs {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    box = union_bounding_box(pred, ref, margin=1)
    if box is None:
        empty = np.zeros(0, dtype=np.float64)
        return SurfaceDistances(empty, empty)
    # The one-voxel background margin keeps the erosion exact wherever the box lies inside the image; where the box
    # touches the image border, the crop border *is* the image border, so border_value keeps its meaning.
    pred_surface = surface_mask(pred[box], image_border_is_surface)
    ref_surface = surface_mask(ref[box], image_border_is_surface)
    return SurfaceDistances(
        _directed(pred_surface, ref_surface, spacing), _directed(ref_surface, pred_surface, spacing)
    )


def _directed(source_surface: np.ndarray, target_surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    n_source = int(source_surface.sum())
    if not target_surface.any():
        return np.full(n_source, np.inf)
    return distances_to_surface(target_surface, spacing)[source_surface]
