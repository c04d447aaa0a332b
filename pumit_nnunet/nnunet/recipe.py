"""Fine-tuning recipes of the PUMIT trainers: ``"nnunet"`` (default) or the authors' (``"authors"``).

``"nnunet"`` is nnU-Net's pipeline (loss, sampling, augmentation) with the authors' [8, 4, 2, 1]/15 head weights,
not nnU-Net's recipe unchanged: both recipes weight the four deep-supervision heads as the authors did,
``0.5 ** i`` normalised = [8, 4, 2, 1]/15; nnU-Net's own ``1 / 2 ** i`` with the lowest output set to 0 would leave
the 1/8-resolution head built, run and never trained (a deliberate difference from stock nnU-Net).
Beyond that, ``"authors"`` (function2-llx/PUMIT, ``downstream/btcv``, ``downstream/chaos``) uses

- MONAI ``DiceCELoss`` on every head's logits upsampled to the label size (:mod:`.recipe_loss`);
- crops drawn uniformly or class-balanced with odds ``crop_weights`` (BTCV 1:3, CHAOS 1:0; :mod:`.recipe_crops`);
- the authors' MONAI augmentation (:mod:`.recipe_augment`), ``affine_scale_range`` BTCV (-0.3, 0.4), CHAOS (-0.3, 0.1);
- the authors' decoder (InstanceNorm without affine, Kaiming-normal fan-out init, transposed convs with bias) and,
  for BTCV, their input map ``2x - 1`` inside the network (``input_affine``), so prediction applies it too.

A plan preset selects the recipe with ``"recipe": "authors"`` in its protocol; ``PumitTrainer_paper`` /
``PumitTrainer_nnunet`` force one whatever the plans say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RECIPES", "AUTHORS", "NNUNET", "RecipeSettings", "head_weights", "authors_decoder_options",
           "recipe_settings", "recipe_arch_overrides"]

NNUNET, AUTHORS = "nnunet", "authors"
RECIPES = (NNUNET, AUTHORS)


def head_weights(num_heads: int) -> np.ndarray:
    """The authors' deep-supervision weights ``0.5 ** i / sum`` (highest resolution first); 4 heads: [8, 4, 2, 1]/15."""
    if num_heads < 1:
        raise ValueError(f"need at least one head, got {num_heads}")
    weights = 0.5 ** np.arange(num_heads, dtype=np.float64)
    return weights / weights.sum()


def authors_decoder_options() -> dict[str, Any]:
    """Decoder keyword arguments of the authors' decoder (see :class:`pumit_nnunet.models.seg_blocks.UNetDecoder`)."""
    return {"norm_affine": False, "conv_init": "kaiming_fan_out", "up_bias": True}


@dataclass(frozen=True)
class RecipeSettings:
    """What a trainer does differently under a recipe.

    Attributes:
        name: ``"nnunet"`` or ``"authors"``.
        crop_weights: odds of (uniform random crop, class-balanced crop) of the authors' sampler.
        affine_scale_range: isotropic scale offsets of the authors' RandAffine (factor 1 + offset).
        input_affine: ``(scale, shift)`` applied by the network to its input (BTCV: ``2x - 1``), or None.
    """

    name: str = NNUNET
    crop_weights: tuple[float, float] = (1.0, 3.0)
    affine_scale_range: tuple[float, float] = (-0.3, 0.4)
    input_affine: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.name!r}")
        if len(self.crop_weights) != 2 or min(self.crop_weights) < 0 or sum(self.crop_weights) <= 0:
            raise ValueError(f"crop_weights must be two non-negative odds (uniform, class-balanced), got {self.crop_weights}")
        low, high = self.affine_scale_range
        if not -1 < low <= high:
            raise ValueError(f"affine_scale_range must satisfy -1 < low <= high, got {self.affine_scale_range}")

    @property
    def is_authors(self) -> bool:
        return self.name == AUTHORS

    @property
    def balanced_crop_probability(self) -> float:
        uniform, balanced = self.crop_weights
        return balanced / (uniform + balanced)


def recipe_settings(protocol: Any | None, forced: str | None = None) -> RecipeSettings:
    """The recipe of a trainer: ``forced`` (a trainer variant's) wins, else the plans' protocol, else nnU-Net's."""
    if protocol is None:
        return RecipeSettings(forced or NNUNET)
    affine = getattr(protocol, "input_affine", None)
    return RecipeSettings(
        forced or protocol.recipe, tuple(float(w) for w in protocol.crop_weights),
        tuple(float(s) for s in protocol.affine_scale_range), None if affine is None else tuple(float(a) for a in affine),
    )


def recipe_arch_overrides(settings: RecipeSettings, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The trainer's architecture overrides plus what the recipe fixes in the network (persisted in the plans, so
    prediction rebuilds the same network)."""
    if not settings.is_authors:
        return base
    from pumit_nnunet.models.seg_blocks import decoder_config

    merged = dict(base or {})
    spec = merged.get("decoder", "authors")  # a preset name or a dict of DecoderConfig fields
    merged["decoder"] = {**decoder_config(spec).to_dict(), **authors_decoder_options()}
    if settings.input_affine is not None:
        merged["input_affine"] = list(settings.input_affine)
    return merged

