"""The authors' crop sampling as an nnU-Net data loader.

BTCV (``downstream/btcv/data.py``): ``OneOf([RandSpatialCrop, RandCropByLabelClasses(ratios [0, 1, 1, ...])],
weights [1, 3])``; CHAOS: ``RandSpatialCrop`` only (weights [1, 0]). Per sample, the loader draws which of the two
with probability ``balanced / (uniform + balanced)``:

- uniform: nnU-Net's random box (the final patch lies anywhere in the image), as ``RandSpatialCrop``;
- class-balanced: a foreground class uniformly among those present in the case (ratio 0 for background, 1 for each
  class; absent classes are dropped as MONAI does), a voxel of it uniformly, the crop centred there and shifted to
  lie inside the image (MONAI's ``correct_crop_centers``; nnU-Net's own foreground crop may stick out).

nnU-Net's ``oversample_foreground_percent`` is not used. The loader may crop a larger box than the final patch
(room for rotation, as nnU-Net does); the augmentation then resamples the centred final patch, which is what
MONAI's lazy crop + ``RandAffine`` of the authors computed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

__all__ = ["AuthorsCropDataLoader", "inside_center", "choose_class"]


def inside_center(voxel: Sequence[int], shape: Sequence[int], final_patch: Sequence[int]) -> list[int]:
    """Shift a crop centre so that a ``final_patch`` centred there (start ``c - p // 2``) lies inside ``shape``;
    an axis shorter than the patch is centred (the authors padded symmetrically to the patch size first)."""
    centre = []
    for v, s, p in zip(voxel, shape, final_patch):
        low, high = p // 2, s - p + p // 2
        centre.append(int(s // 2) if high < low else int(min(max(int(v), low), high)))
    return centre


def choose_class(class_locations: dict, annotated_key: tuple) -> object | None:
    """A foreground class (or region) drawn uniformly among those with voxels in the case, or None if none has."""
    eligible = [k for k, v in class_locations.items() if k != annotated_key and len(v) > 0]
    if not eligible:
        return None
    return eligible[np.random.choice(len(eligible))]


class AuthorsCropDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with the authors' choice of crop (see the module docstring).

    Args (beyond nnU-Net's): ``balanced_probability``: chance of a class-balanced crop (BTCV 0.75, CHAOS 0).
    ``oversample_foreground_percent`` and ``probabilistic_oversampling`` are ignored.
    """

    def __init__(self, *args, balanced_probability: float = 0.75, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= balanced_probability <= 1.0:
            raise ValueError(f"balanced_probability must be in [0, 1], got {balanced_probability}")
        self.balanced_probability = float(balanced_probability)
        self.get_do_oversample = self._draw_balanced
        self.final_patch_3d = tuple(int(p) for p in ((1, *self.final_patch_size) if self.patch_size_was_2d
                                                     else self.final_patch_size))

    def _draw_balanced(self, sample_idx: int) -> bool:
        return bool(np.random.uniform() < self.balanced_probability)

    def get_bbox(self, data_shape: np.ndarray, force_fg: bool, class_locations: dict | None,
                 overwrite_class=None, verbose: bool = False):
        selected = choose_class(class_locations, self.annotated_classes_key) if force_fg and class_locations else None
        if selected is None:  # uniform crop (also: a case without foreground, as MONAI would fail over to nnU-Net's)
            return super().get_bbox(data_shape, False, class_locations)
        locations = class_locations[selected]
        voxel = locations[np.random.choice(len(locations))][1:]  # class_locations rows are (channel, *spatial)
        centre = inside_center(voxel, data_shape, self.final_patch_3d[-len(data_shape):])
        lbs = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        return lbs, [lb + p for lb, p in zip(lbs, self.patch_size)]
