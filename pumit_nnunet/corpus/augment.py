"""Crop geometry and the authors' crop and intensity augmentations, on the loader workers.

A crop is planned as a field of view (``crop x scale`` voxels) at an integer start; with no scale and no rotation
it is a plain slice of the store (outside the image reads as 0). Otherwise one trilinear resampling maps each
output voxel ``o`` to ``c_in + R S (o - c_out)``: scale ``S`` (a factor > 1 samples a larger field of view, as
MONAI's affine) and rotation ``R`` about the depth axis (±pi/2) and, for quasi-isotropic images, the in-plane
axes (±pi/6), with probability 0.3. Then flips (p 0.5 per axis) and the intensity augmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pumit_nnunet.corpus.store import read_box

ROTATE_P = 0.3
ROTATE_DEPTH = math.pi / 2
ROTATE_OTHER = math.pi / 6


@dataclass(frozen=True)
class CropPlan:
    """Where and how to cut one crop out of a stored (C, D, H, W) image."""

    start: tuple[int, int, int]
    scale: tuple[float, float, float]
    out_shape: tuple[int, int, int]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # radians about the depth, h and w axes
    flips: tuple[bool, bool, bool] = (False, False, False)
    #: depth slab [first, last) read before cropping; outside it reads as 0 (None: the whole depth)
    slab: tuple[int, int] | None = None

    @property
    def fov(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.out_shape, self.scale))


def draw_slab(rng: np.random.Generator, depth: int, max_slices: int | None) -> tuple[int, int] | None:
    """The authors' reader (``pumit/reader.py``) keeps a random window of ``max_slices`` slices of deeper volumes,
    first slice ``randint(depth - max_slices)`` (the last possible window is never drawn, as theirs)."""
    if not max_slices or depth <= max_slices:
        return None
    first = int(rng.integers(depth - max_slices))
    return first, first + max_slices


def plan_crop(rng: np.random.Generator, image_shape, out_shape, scale, *, quasi_isotropic: bool, augment: bool,
              max_slices: int | None = None) -> CropPlan:
    """A random crop position (pad-then-crop when the image is smaller), rotation and flips.

    ``max_slices``: read a random depth slab first, then crop inside it. This is kept because it changes where
    depth crops fall: for a volume deeper than the slab the crop's first slice is the sum of two uniform draws (a
    trapezoid favouring the middle slices), not uniform over the volume, and rotated or depth-scaled crops read
    zeros beyond the slab instead of the neighbouring slices."""
    slab = draw_slab(rng, int(image_shape[0]), max_slices)
    offset = [slab[0] if slab else 0, 0, 0]
    sizes = [slab[1] - slab[0] if slab else int(image_shape[0]), int(image_shape[1]), int(image_shape[2])]
    start = []
    for size, n, s, o in zip(sizes, out_shape, scale, offset):
        fov = max(int(round(n * s)), 1)
        low, high = min(0, size - fov), max(0, size - fov)
        start.append(o + int(rng.integers(low, high + 1)))
    rotation, flips = (0.0, 0.0, 0.0), (False, False, False)
    if augment:
        if rng.random() < ROTATE_P:
            other = ROTATE_OTHER if quasi_isotropic else 0.0
            rotation = (rng.uniform(-ROTATE_DEPTH, ROTATE_DEPTH), rng.uniform(-other, other), rng.uniform(-other, other))
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
    return CropPlan(tuple(start), tuple(float(s) for s in scale), tuple(out_shape), rotation, flips, slab)


def rotation_matrix(angles: tuple[float, float, float]) -> np.ndarray:
    """Rotation in (d, h, w) voxel coordinates: about depth (the h-w plane), then h, then w."""
    a, b, c = angles
    about_d = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    about_h = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    about_w = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return about_d @ about_h @ about_w


def _resample(array, plan: CropPlan, levels: int) -> torch.Tensor:
    out = np.asarray(plan.out_shape, dtype=np.float64)
    matrix = rotation_matrix(plan.rotation) @ np.diag(plan.scale)
    c_out = (out - 1) / 2
    c_in = np.asarray(plan.start) + np.asarray(plan.fov) / 2 - 0.5
    corners = np.array(np.meshgrid(*[[0.0, n - 1] for n in out], indexing="ij")).reshape(3, -1).T
    mapped = c_in + (corners - c_out) @ matrix.T
    lo = np.floor(mapped.min(axis=0)).astype(int)
    size = np.floor(mapped.max(axis=0)).astype(int) + 2 - lo
    box = torch.from_numpy(read_box(array, lo, size, plan.slab).astype(np.float32)) / levels
    axes = [torch.arange(n, dtype=torch.float64) for n in plan.out_shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) - torch.from_numpy(c_out)
    coords = grid @ torch.from_numpy(matrix.T) + torch.from_numpy(c_in - lo)
    denominators = torch.from_numpy(np.maximum(size - 1, 1).astype(np.float64))
    normalised = (2 * coords / denominators - 1).flip(-1).to(torch.float32)  # grid_sample wants (w, h, d)
    sampled = F.grid_sample(box[None], normalised[None], mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[0]


def extract_crop(array, plan: CropPlan, levels: int) -> torch.Tensor:
    """The (C, D, H, W) float32 crop in [0, 1] of a stored image (``q / levels``), flips applied."""
    if plan.rotation == (0.0, 0.0, 0.0) and plan.scale == (1.0, 1.0, 1.0):
        crop = torch.from_numpy(read_box(array, plan.start, plan.out_shape, plan.slab).astype(np.float32)) / levels
    else:
        crop = _resample(array, plan, levels).clamp_(0.0, 1.0)
    dims = [axis + 1 for axis, flip in enumerate(plan.flips) if flip]
    return crop.flip(dims) if dims else crop


def intensity_augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The authors' intensity augmentation on a [0, 1] (C, D, H, W) image: scale ±0.25 (p 0.15), clamp, contrast ×U(0.75, 1.25) about each
    channel's mean (p 0.15),
    gamma or inverted gamma with γ ~ U(0.7, 1.5) (p 0.3). The result stays in [0, 1]."""
    u = rng.random(7)  # always seven numbers, so the stream does not depend on which branches ran
    if u[0] < 0.15:
        x = x * (1.0 + (u[1] * 0.5 - 0.25))
    x = x.clamp(0.0, 1.0)
    if u[2] < 0.15:  # about each channel's own mean (authors' mylib RandAdjustContrastD reduces spatial dims only)
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        x = ((x - mean) * (0.75 + 0.5 * u[3]) + mean).clamp(0.0, 1.0)
    if u[4] < 0.3:
        gamma = 0.7 + 0.8 * u[5]
        x = x.pow(gamma) if u[6] < 0.5 else 1.0 - (1.0 - x).pow(gamma)
    return x
