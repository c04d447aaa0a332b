"""Image classifier: the universal ViT with a linear head on the normed CLS token (the authors' ``PUMITClassifier``).

The whole model is fine-tuned. For MedMNIST-3D the authors use a non-adaptive 16^3 patch embedding
(``patch_depth=16``) and a (10, 10, 10) position-embedding grid resampled from the pre-trained (5, 10, 10).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pumit_nnunet.models.vit import UniversalViT, ViTConfig, vit_config

__all__ = ["PumitClassifier", "classifier_vit_config"]


def classifier_vit_config(size: str = "B", **overrides: Any) -> ViTConfig:
    """The ViT preset ``size`` as the authors' MedMNIST-3D classifier uses it (fixed 16^3 patch, 10^3 pos grid)."""
    settings = {"patch_depth": 16, "pos_embed_shape": (10, 10, 10), **overrides}
    return vit_config(size, **settings)


class PumitClassifier(nn.Module):
    """``Linear(norm(vit(x))[:, 0])``: the CLS token of the last block, normed, to ``num_classes`` logits.

    Args:
        config: the backbone's architecture.
        num_classes: number of logits (one per class, or per label for multi-label tasks).
    """

    def __init__(self, config: ViTConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.vit = UniversalViT(config)
        self.head = nn.Linear(config.embed_dim, num_classes)
        self.num_classes = num_classes

    def forward_features(self, x: Tensor, aniso_d: int = 0) -> Tensor:
        """The normed CLS token, ``(B, C)``."""
        return self.vit(x, aniso_d)[:, 0]

    def forward(self, x: Tensor, aniso_d: int = 0) -> Tensor:
        return self.head(self.forward_features(x, aniso_d))

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}

    def architecture(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild the model."""
        return {"vit": self.vit.config.to_dict(), "num_classes": self.num_classes}

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> "PumitClassifier":
        return cls(ViTConfig.from_dict(architecture["vit"]), int(architecture["num_classes"]))
