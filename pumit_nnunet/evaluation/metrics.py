"""Per-class segmentation metrics in physical units, and the CHAOS challenge score.

Metrics (one foreground class at a time, binary masks, spacing in mm per array axis):

* ``dice``: 2|P∩R| / (|P|+|R|);
* ``ravd``: relative absolute volume difference in percent, 100·||P|−|R|| / |R| (CHAOS ``RAVD``);
* ``assd``: average symmetric surface distance, the mean of both directed surface-distance sets pooled
  (CHAOS ``ASSD`` and MONAI ``compute_average_surface_distance(symmetric=True)``);
* ``hd``: Hausdorff distance, the maximum of both directed sets (= CHAOS ``MSSD``);
* ``hd95``: the larger of the two directed 95th percentiles (linear interpolation), as MONAI
  ``compute_hausdorff_distance(percentile=95)`` (medpy/nnU-Net v1 pool both sets before taking the percentile,
  which can differ slightly);
* ``nsd``: normalised surface Dice at tolerance τ mm, the fraction of surface voxels of both masks that lie
  within τ of the other surface (MONAI ``compute_surface_dice(use_subvoxels=False)``).

Surfaces and distances: see :mod:`pumit_nnunet.evaluation.surface`.

Empty masks (following nnU-Net for Dice and MONAI for the surface metrics):

=====================  ======  ======  ===========  ======
case                   dice    nsd     assd/hd/hd95  ravd
=====================  ======  ======  ===========  ======
both empty             NaN     NaN     NaN          NaN
reference empty only   0       0       inf          inf
prediction empty only  0       0       inf          100
=====================  ======  ======  ===========  ======

NaN means "not defined for this case" and is skipped by the means (``nanmean``, as nnU-Net); inf is kept, so a
missed or hallucinated structure makes the mean distance inf rather than silently disappearing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from pumit_nnunet.evaluation.surface import surface_distances

#: metric names in the order tables and CSV columns use
METRIC_NAMES: tuple[str, ...] = ("dice", "assd", "hd", "hd95", "ravd", "nsd")


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class in one case; distances in mm, ``ravd`` in percent, voxel counts for reference."""

    dice: float
    assd: float
    hd: float
    hd95: float
    ravd: float
    nsd: float
    n_pred: int
    n_ref: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def dice_coefficient(pred: np.ndarray, ref: np.ndarray) -> float:
    """Sørensen–Dice coefficient of two binary masks; NaN when both are empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    denominator = int(pred.sum()) + int(ref.sum())
    if denominator == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denominator


def relative_absolute_volume_difference(pred: np.ndarray, ref: np.ndarray) -> float:
    """RAVD in percent; NaN when both are empty, inf when only the reference is empty."""
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if n_ref == 0:
        return math.nan if n_pred == 0 else math.inf
    return 100.0 * abs(n_pred - n_ref) / n_ref


def average_symmetric_surface_distance(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    """Mean of both directed distance sets pooled; NaN when both are empty."""
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    return float(pooled.mean()) if pooled.size else math.nan


def hausdorff_distance(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, percentile: float | None = None) -> float:
    """Max over both directions of the directed maximum (or directed ``percentile``); NaN when both are empty."""
    directed = [_directed_hausdorff(d, percentile) for d in (pred_to_ref, ref_to_pred) if d.size]
    return max(directed) if directed else math.nan


def normalized_surface_dice(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    """Fraction of all surface voxels within ``tolerance_mm`` of the other surface; NaN when both are empty."""
    total = pred_to_ref.size + ref_to_pred.size
    if total == 0:
        return math.nan
    return float(np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)) / total


def _directed_hausdorff(distances: np.ndarray, percentile: float | None) -> float:
    if percentile is None:
        return float(distances.max())
    if np.isinf(distances).any():  # np.percentile interpolates inf into nan
        return math.inf
    return float(np.percentile(distances, percentile))


def class_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
    image_border_is_surface: bool = False,
) -> ClassMetrics:
    """All metrics of one binary prediction against one binary reference (``spacing`` per array axis, mm)."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    distances = surface_distances(pred, ref, spacing, image_border_is_surface)
    a, b = distances.pred_to_ref, distances.ref_to_pred
    return ClassMetrics(
        dice=dice_coefficient(pred, ref),
        assd=average_symmetric_surface_distance(a, b),
        hd=hausdorff_distance(a, b),
        hd95=hausdorff_distance(a, b, percentile=95.0),
        ravd=relative_absolute_volume_difference(pred, ref),
        nsd=normalized_surface_dice(a, b, nsd_tolerance_mm),
        n_pred=int(pred.sum()),
        n_ref=int(ref.sum()),
    )


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    nsd_tolerance_mm: float | Mapping[int, float] = 1.0,
    image_border_is_surface: bool = False,
) -> dict[int, ClassMetrics]:
    """Metrics of every label in ``labels`` for two label maps; the NSD tolerance may be given per label."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction and reference shapes differ: {pred_labels.shape} vs {ref_labels.shape}")
    results = {}
    for label in labels:
        tolerance = nsd_tolerance_mm[label] if isinstance(nsd_tolerance_mm, Mapping) else nsd_tolerance_mm
        results[int(label)] = class_metrics(
            pred_labels == label, ref_labels == label, spacing, tolerance, image_border_is_surface
        )
    return results


# --- CHAOS score ---------------------------------------------------------------------------------------------------
# The CHAOS challenge (Kavur et al., "CHAOS Challenge - combined (CT-MR) healthy abdominal organ segmentation",
# Med. Image Anal. 2021, and chaos.grand-challenge.org/Evaluation) turns each metric into 0-100 points and scores a
# case by the mean of the four: DICE 0.8 -> 0 .. 1 -> 100 (linear), and for RAVD (5 %), ASSD (15 mm) and MSSD
# (60 mm) points = max(0, 100 * (1 - value / threshold)).
# Verification: the official evaluation repository (emrekavur/CHAOS-evaluation, README + Python/CHAOSmetrics.py)
# confirms the four metrics and their definitions but contains no scoring code; the thresholds above could not be
# confirmed from a public source through the code/page search available when this was written (they follow the
# task description and the CHAOS paper as recalled). Treat the score as unofficial until checked against the paper.
CHAOS_DICE_ZERO_POINTS = 0.8
CHAOS_THRESHOLDS = {"ravd": 5.0, "assd": 15.0, "mssd": 60.0}


def chaos_points(dice: float, ravd: float, assd: float, mssd: float) -> dict[str, float]:
    """Points (0-100) of each CHAOS metric; NaN stays NaN, inf distances and volumes score 0."""
    points = {"dice": _linear_points(dice, CHAOS_DICE_ZERO_POINTS, 1.0)}
    for name, value in (("ravd", ravd), ("assd", assd), ("mssd", mssd)):
        points[name] = _linear_points(value, CHAOS_THRESHOLDS[name], 0.0)
    return points


def chaos_score(dice: float, ravd: float, assd: float, mssd: float) -> float:
    """CHAOS case score: the mean of the four metric points (NaN if any metric is undefined)."""
    return float(np.mean(list(chaos_points(dice, ravd, assd, mssd).values())))


def _linear_points(value: float, zero_at: float, hundred_at: float) -> float:
    """100 at ``hundred_at``, 0 at ``zero_at`` and beyond, linear in between."""
    if math.isnan(value):
        return math.nan
    fraction = (value - zero_at) / (hundred_at - zero_at)
    return float(100.0 * min(max(fraction, 0.0), 1.0))
