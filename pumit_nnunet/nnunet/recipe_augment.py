"""The authors' fine-tuning augmentation (``downstream/btcv/data.py``, CHAOS alike) as an nnU-Net transform pipeline.

Order and parameters are the authors': RandAffine (rotation U(-pi/2, pi/2) about the first spatial axis at p 0.2,
isotropic scale 1 + U(scale_range) at p 0.2; bilinear image, nearest label, zero padding), flips p 0.5 on each
axis, Gaussian noise (std U(0, 0.1)) p 0.1, Gaussian smoothing sigma U(0.8, 1.2) per axis p 0.1, intensity
scale x(1 + U(-0.25, 0.25)) p 0.15, contrast around the channel mean U(0.75, 1.25) p 0.15, low resolution (in-plane
zoom U(0.5, 1), depth kept) p 0.15, then one of identity / gamma / inverted gamma (gamma U(0.7, 1.5)) with odds
9:3:1. Everything is a MONAI or batchgeneratorsv2 transform; :class:`MonaiTransform` runs a MONAI dictionary
transform inside nnU-Net's batchgeneratorsv2 pipeline (keys ``image``/``label`` <-> ``image``/``segmentation``).
The affine part is batchgeneratorsv2's ``SpatialTransform``: stock MONAI's ``RandAffine`` has no separate rotation
and scale probabilities nor an isotropic scale (the authors used their MONAI fork's).

Where the library transforms differ slightly from the authors' own (mylib) ones: contrast (MONAI
``RandScaleIntensityFixedMean``) clips to the crop's range instead of [0, 1]; gamma (MONAI ``RandAdjustContrast``)
rescales by the crop's min/max instead of clamping to [0, 1] (identical when the crop spans [0, 1]); low
resolution (batchgeneratorsv2) rounds the reduced size instead of truncating it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

if TYPE_CHECKING:  # MONAI is imported where used (slow to import)
    import monai.transforms as mt

__all__ = ["MonaiTransform", "first_axis_rotation", "authors_affine", "authors_flips_and_intensity", "authors_gamma",
           "authors_low_resolution", "authors_augmentation"]


class MonaiTransform(BasicTransform):
    """Runs a MONAI dictionary transform on nnU-Net's ``image`` (float) and ``segmentation`` (integer) tensors.

    The MONAI random state is re-seeded from numpy's global generator for every sample, so nnU-Net's per-worker
    seeding (and ``np.random.seed`` in tests) makes it deterministic, and workers do not repeat each other."""

    def __init__(self, transform) -> None:
        super().__init__()
        self.transform = transform

    def __call__(self, **data_dict) -> dict:
        self.transform.set_random_state(seed=int(np.random.randint(0, 2 ** 31 - 1)))
        sample = {"image": data_dict["image"]}
        segmentation = data_dict.get("segmentation")
        if segmentation is not None:
            sample["label"] = segmentation.float()
        out = self.transform(sample)
        data_dict["image"] = _plain(out["image"]).float()
        if segmentation is not None:
            data_dict["segmentation"] = _plain(out["label"]).round().to(segmentation.dtype)
        return data_dict


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def first_axis_rotation(*args, dim: int, **kwargs) -> float:
    """Rotation angle sampler: U(-pi/2, pi/2) about the first spatial axis, none about the others (the authors'
    ``rotate_range=(pi / 2, 0, 0)``). Module-level so nnU-Net's augmentation workers can pickle it."""
    return float(np.random.uniform(-np.pi / 2, np.pi / 2)) if dim == 0 else 0.0


def authors_affine(final_patch: Sequence[int], scale_range: Sequence[float]) -> BasicTransform:
    """RandAffine as the authors': rotation p 0.2, isotropic scale factor ``1 + U(scale_range)`` p 0.2 (larger =
    smaller objects, MONAI's convention too), bilinear image, nearest label, zero padding; it resamples the centred
    ``final_patch`` from the (possibly larger) crop, which is what the authors' lazy crop + affine computed."""
    return SpatialTransform(
        tuple(int(p) for p in final_patch), patch_center_dist_from_border=0, random_crop=False,
        p_rotation=0.2, rotation=first_axis_rotation, p_scaling=0.2,
        scaling=(1.0 + scale_range[0], 1.0 + scale_range[1]), p_synchronize_scaling_across_axes=1,
        mode_seg="nearest", border_mode_seg="zeros", mode_image="bilinear", padding_mode_image="zeros",
    )


def authors_flips_and_intensity() -> mt.Compose:
    """MONAI part: flips on each axis, noise, smoothing, intensity scale, contrast around the channel mean."""
    import monai.transforms as mt

    keys = ["image", "label"]
    return mt.Compose([
        *[mt.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
        mt.RandGaussianNoised("image", prob=0.1, std=0.1),
        mt.RandGaussianSmoothd("image", (0.8, 1.2), (0.8, 1.2), (0.8, 1.2), prob=0.1),
        mt.RandScaleIntensityd("image", factors=0.25, prob=0.15),
        mt.RandScaleIntensityFixedMeand("image", factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15,
                                        channel_wise=True),
    ])


def authors_gamma() -> mt.OneOf:
    """MONAI part two: ``OneOf(identity, gamma, inverted gamma)`` with odds 9:3:1, gamma U(0.7, 1.5)."""
    import monai.transforms as mt

    return mt.OneOf([
        mt.Identityd("image"),
        mt.RandAdjustContrastd("image", prob=1.0, gamma=(0.7, 1.5), invert_image=False),
        mt.RandAdjustContrastd("image", prob=1.0, gamma=(0.7, 1.5), invert_image=True),
    ], weights=(9, 3, 1))


def authors_low_resolution() -> BasicTransform:
    """In-plane low-resolution simulation at p 0.15 (depth axis kept, as the authors' per-slice 2D version)."""
    return RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1.0), synchronize_channels=True,
                                                          synchronize_axes=True, ignore_axes=(0,), p_per_channel=1),
                           apply_probability=0.15)


def authors_augmentation(final_patch: Sequence[int], scale_range: Sequence[float] = (-0.3, 0.4)) -> ComposeTransforms:
    """The whole augmentation on one sample (``image`` C x D x H x W, ``segmentation`` 1 x D x H x W), producing
    the ``final_patch`` from a crop of the same or larger size."""
    if len(final_patch) != 3:
        raise ValueError(f"the authors' augmentation is 3D; got a patch of {len(final_patch)} axes")
    return ComposeTransforms([
        authors_affine(final_patch, scale_range),
        MonaiTransform(authors_flips_and_intensity()),
        authors_low_resolution(),
        MonaiTransform(authors_gamma()),
    ])
