"""The authors' segmentation objective: MONAI ``DiceCELoss`` on every head, logits upsampled to the label size.

nnU-Net downsamples the labels to each head's size; the authors (``downstream/btcv/model.py``) instead upsample each
head's logits (trilinear, ``align_corners=False``) to the full-resolution label and weight the heads
``0.5 ** i`` normalised. The loss is MONAI's own ``DiceCELoss(include_background=True, to_onehot_y=True,
softmax=True)`` with its defaults otherwise (mean reduction, smooth 1e-5, lambda 1 each).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_nnunet.nnunet.recipe import head_weights

__all__ = ["UpsampledDeepSupervisionLoss", "upsample_logits"]


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits resized to ``size`` (trilinear for 3D, bilinear for 2D); unchanged if already that size."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    mode = "trilinear" if logits.dim() == 5 else "bilinear"
    return F.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)


class UpsampledDeepSupervisionLoss(nn.Module):
    """``sum_i w_i * DiceCELoss(upsample(logits_i), label)`` with ``w = 0.5 ** i / sum`` over the heads.

    ``forward(outputs, target)`` takes nnU-Net's deep-supervision lists (highest resolution first); of the targets
    only the first, full-resolution one is used (nnU-Net's downsampled copies are what the authors avoided).
    Computed in float32: under autocast the softmax/Dice of bf16 logits would lose precision.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        try:
            from monai.losses import DiceCELoss
        except ImportError as error:  # MONAI is needed by the authors' recipe only
            raise ImportError("the authors' fine-tuning recipe uses MONAI's DiceCELoss: pip install monai") from error

        self.dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
        self.weights = tuple(float(w) for w in head_weights(num_heads))

    def forward(self, outputs: Tensor | Sequence[Tensor], target: Tensor | Sequence[Tensor]) -> Tensor:
        outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
        label = target if isinstance(target, Tensor) else target[0]
        if len(outputs) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} head outputs, got {len(outputs)}")
        label = label.float()
        with torch.autocast(label.device.type, enabled=False):
            terms = [w * self.dice_ce(upsample_logits(o.float(), label.shape[2:]), label)
                     for w, o in zip(self.weights, outputs)]
        return torch.stack(terms).sum()
