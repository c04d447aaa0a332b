"""Saving and reading a fine-tuned image classifier (:class:`~pumit_nnunet.models.classifier.PumitClassifier`).

Our checkpoint format, kind ``classifier``: ``architecture`` is ``{"vit": ViTConfig, "num_classes": n}``, the
state dict holds the ViT under ``vit.`` and the head under ``head.``, and the adaptation block says so
(``key_to_encoder="vit"``), so the backbone of a fine-tuned classifier loads into a plain ViT like any other
checkpoint. Earlier releases, whose format had no ``classifier`` kind, wrote the same file as kind ``vit`` with
``extra["classifier"] = True``; such files are still read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from pumit_nnunet.checkpoints.format import (AdaptationPlan, CheckpointError, PretrainPlan, PumitCheckpoint,
                                             load_pumit_checkpoint, save_pumit_checkpoint)
from pumit_nnunet.models.classifier import PumitClassifier
from pumit_nnunet.plain import PlainFormatError

__all__ = ["CLASSIFIER_KIND", "CLASSIFIER_ADAPTATION", "save_classifier", "is_classifier_checkpoint",
           "load_classifier"]

CLASSIFIER_KIND = "classifier"
#: where the ViT sits inside a classifier state dict (so ``load_vit_weights`` can start from a fine-tuned classifier)
CLASSIFIER_ADAPTATION = AdaptationPlan(key_to_encoder="vit", key_to_stem="vit.patch_embed",
                                       keys_to_in_proj=["vit.patch_embed.proj"], key_to_lpe="vit.pos_embed")


def save_classifier(path: str | os.PathLike, model: PumitClassifier, pretrain_plan: PretrainPlan | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` atomically as a checkpoint of kind ``classifier``."""
    save_pumit_checkpoint(path, kind=CLASSIFIER_KIND, state_dict=model.state_dict(),
                          architecture=model.architecture(), adaptation=CLASSIFIER_ADAPTATION,
                          pretrain_plan=pretrain_plan, extra=extra)


def is_classifier_checkpoint(checkpoint: PumitCheckpoint) -> bool:
    """Kind ``classifier``, or the earlier releases' kind ``vit`` with ``extra["classifier"]``."""
    return checkpoint.kind == CLASSIFIER_KIND or (checkpoint.kind == "vit" and bool(checkpoint.extra.get("classifier")))


def load_classifier(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[PumitClassifier, dict[str, Any]]:
    """The classifier in ``path`` (either layout above) and the checkpoint's ``extra`` record."""
    checkpoint = load_pumit_checkpoint(path)
    if not is_classifier_checkpoint(checkpoint):
        raise CheckpointError(f"is a {checkpoint.kind!r} checkpoint without a classifier head; fine-tune it "
                              "first (`pumit-nnunet medmnist train --pretrained ...`)", path)
    try:
        model = PumitClassifier.from_architecture(checkpoint.architecture)
    except (KeyError, TypeError, ValueError, PlainFormatError) as error:
        raise CheckpointError(f"its classifier architecture cannot be used: {error!r}", path) from None
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as error:
        first = " ".join(str(error).strip().splitlines()[:2])
        raise CheckpointError(f"the weights do not fit the recorded classifier architecture: {first}",
                              path) from None
    return model.to(map_location), checkpoint.extra
