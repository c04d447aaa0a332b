"""The authors' CHAOS intensity normalisation as an nnU-Net normalisation scheme, and how nnU-Net finds it.

CHAOS (``downstream/chaos/data.py``, ``mylib/transforms/intensity/stats.py``): per image and channel, the 0.5-99.5
percentiles are mapped to [0, 1] with clipping (MONAI ``ScaleIntensityRangePercentiles``), then the image is
z-scored with the mean and standard deviation of its voxels > 0 (``CleverStats``; torch's unbiased std).

**Registration.** nnU-Net's preprocessor resolves ``normalization_schemes`` names by importing the modules of
``nnunetv2.preprocessing.normalization`` and taking the first one with an attribute of that name; there is no
external path. :func:`register` therefore adds our class as a *new* name to
``nnunetv2.preprocessing.normalization.default_normalization_schemes`` (nothing of nnU-Net's is replaced). It
must happen in every process that preprocesses, including the ``spawn`` workers of ``nnUNetv2_preprocess`` and
``nnUNetv2_predict``: the start-up hook (``pumit_nnunet_hook.py``, imported by ``pumit_nnunet.pth``) installs a
post-import hook that calls :func:`register` right after nnU-Net's module is imported, in every interpreter.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCHEME_NAME", "percentile_zscore", "register", "NNUNET_NORMALIZATION_MODULE"]

SCHEME_NAME = "PumitPercentileZScoreNormalization"
NNUNET_NORMALIZATION_MODULE = "nnunetv2.preprocessing.normalization.default_normalization_schemes"


def percentile_zscore(image: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """One channel: percentiles ``lower``/``upper`` -> [0, 1] (clipped), then z-score over the voxels > 0.

    A constant image (no spread between the percentiles, or fewer than two voxels > 0) maps to zeros."""
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, [lower, upper])
    if not high > low:
        return np.zeros(image.shape, dtype=np.float32)
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0)
    positive = scaled[scaled > 0]
    if positive.size < 2:
        return np.zeros(image.shape, dtype=np.float32)
    std = positive.std(ddof=1)  # torch.std's default (unbiased), as CleverStats
    return ((scaled - positive.mean()) / max(std, 1e-8)).astype(np.float32)


def _scheme_class():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization

    class PumitPercentileZScoreNormalization(ImageNormalization):
        """The authors' CHAOS normalisation (see :func:`percentile_zscore`); per image, ignores the plans' stats."""

        leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = False

        def run(self, image: np.ndarray, seg: np.ndarray | None = None) -> np.ndarray:
            return percentile_zscore(image).astype(self.target_dtype, copy=False)

    PumitPercentileZScoreNormalization.__module__ = NNUNET_NORMALIZATION_MODULE
    PumitPercentileZScoreNormalization.__qualname__ = SCHEME_NAME
    return PumitPercentileZScoreNormalization


def register() -> type:
    """Make ``SCHEME_NAME`` resolvable by nnU-Net's preprocessor in this process (idempotent); returns the class."""
    import importlib

    module = importlib.import_module(NNUNET_NORMALIZATION_MODULE)
    existing = getattr(module, SCHEME_NAME, None)
    if existing is None:
        existing = _scheme_class()
        setattr(module, SCHEME_NAME, existing)
    return existing
