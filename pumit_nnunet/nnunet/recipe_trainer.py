"""Trainer hooks of the fine-tuning recipes (mixed into :class:`~pumit_nnunet.nnunet.trainer_base.PumitTrainerBase`).

- ``_build_loss``: every recipe weights the four heads [8, 4, 2, 1]/15; nnU-Net's recipe keeps its Dice + CE
  (with downsampled targets), the authors' uses :class:`~.recipe_loss.UpsampledDeepSupervisionLoss`.
- ``get_dataloaders``: the authors' recipe samples crops with :class:`~.recipe_crops.AuthorsCropDataLoader` and
  augments with :func:`~.recipe_augment.authors_augmentation`; validation batches (nnU-Net's pseudo-Dice monitor)
  stay nnU-Net's. nnU-Net's recipe is untouched.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Sequence

from pumit_nnunet.nnunet.checkpointing import TrainerRefusal
from pumit_nnunet.nnunet.recipe import RecipeSettings, head_weights, recipe_settings

__all__ = ["RecipeHooks", "recipe_from_plans", "authors_initial_patch"]


def recipe_from_plans(plans: dict[str, Any], configuration: str, forced: str | None) -> RecipeSettings:
    """The recipe for ``configuration`` of raw ``plans`` (``inherits_from`` resolved), before nnU-Net reads them."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from pumit_nnunet.nnunet.presets import protocol_from_plans

    if configuration not in plans.get("configurations", {}):
        return recipe_settings(None, forced)
    resolved = PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration
    return recipe_settings(protocol_from_plans(resolved), forced)


def authors_initial_patch(final_patch: Sequence[int], scale_range: Sequence[float]) -> list[int]:
    """Crop size that holds the final patch under any in-plane rotation and the largest scale: depth kept,
    in-plane ``ceil(sqrt(h^2 + w^2) * (1 + max scale))`` (the authors resampled lazily from the whole image)."""
    depth, height, width = final_patch
    inplane = math.ceil(math.hypot(height, width) * (1.0 + max(scale_range[1], 0.0)))
    return [int(depth), max(inplane, int(height)), max(inplane, int(width))]


class RecipeHooks:
    """nnU-Net trainer hooks that realise ``self.recipe_settings`` (set by the trainer's constructor)."""

    recipe_settings: RecipeSettings

    def _preprocessed_file(self, name: str) -> Path | None:
        """A file of the preprocessed dataset (dataset.json, the plans), for the one-line refusals below."""
        base = getattr(self, "preprocessed_dataset_folder_base", None)  # None when nnUNet_preprocessed is unset
        return None if base is None else Path(base) / name

    def _build_loss(self):
        if self.recipe_settings.is_authors:
            return self._authors_loss()
        loss = super()._build_loss()
        if hasattr(loss, "weight_factors"):  # nnU-Net's DeepSupervisionWrapper: the authors' weights, no dead head
            loss.weight_factors = tuple(float(w) for w in head_weights(len(loss.weight_factors)))
        return loss

    def _authors_loss(self):
        from pumit_nnunet.nnunet.recipe_loss import UpsampledDeepSupervisionLoss

        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise TrainerRefusal("the authors' recipe (MONAI DiceCELoss on one-hot labels) supports neither regions "
                                 "nor an ignore label; train this dataset with nnU-Net's pipeline "
                                 "(-tr PumitTrainer_nnunet)",
                                 self._preprocessed_file("dataset.json"))
        return UpsampledDeepSupervisionLoss(len(self._get_deep_supervision_scales()))

    def get_dataloaders(self):
        if not self.recipe_settings.is_authors:
            return super().get_dataloaders()
        from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from pumit_nnunet.nnunet.recipe_crops import AuthorsCropDataLoader

        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch = [int(p) for p in self.configuration_manager.patch_size]
        if len(patch) != 3:
            raise TrainerRefusal(f"configuration {self.configuration_name!r} is 2D, the authors' recipe is 3D; use "
                                 "nnU-Net's pipeline (-tr PumitTrainer_nnunet) for 2D configurations",
                                 self._preprocessed_file(f"{self.plans_manager.plans_name}.json"))
        scales = self._get_deep_supervision_scales()
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets the test-time mirroring axes
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        settings = self.recipe_settings
        dl_tr = AuthorsCropDataLoader(dataset_tr, self.batch_size, authors_initial_patch(patch, settings.affine_scale_range),
                                      patch, self.label_manager, transforms=self._authors_training_transforms(patch, scales),
                                      balanced_probability=settings.balanced_crop_probability)
        dl_val = nnUNetDataLoader(dataset_val, self.batch_size, patch, patch, self.label_manager,
                                  oversample_foreground_percent=self.oversample_foreground_percent,
                                  transforms=self.get_validation_transforms(scales))
        self.print_to_log_file(f"PUMIT: the authors' recipe: crops uniform:class-balanced {settings.crop_weights}, "
                               f"MONAI augmentation (scale {settings.affine_scale_range}), DiceCE on upsampled logits")
        return self._start_loaders(dl_tr, dl_val)

    def _authors_training_transforms(self, patch: Sequence[int], scales):
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
        from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
        from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform

        from pumit_nnunet.nnunet.recipe_augment import authors_augmentation

        transforms = [authors_augmentation(patch, self.recipe_settings.affine_scale_range), RemoveLabelTansform(-1, 0)]
        if scales is not None:  # the loss uses the full-resolution target only; validation_step reads target[0]
            transforms.append(DownsampleSegForDSTransform(ds_scales=scales))
        return ComposeTransforms(transforms)

    def _start_loaders(self, dl_tr, dl_val):
        """nnU-Net's choice of single- or multi-process augmentation, primed with one batch each (as nnU-Net)."""
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        processes = get_allowed_n_proc_DA()
        if processes == 0:
            train, val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            train = NonDetMultiThreadedAugmenter(dl_tr, None, processes, max(6, processes // 2), None, pin, 0.002)
            val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, processes // 2), max(3, processes // 4), None, pin, 0.002)
        next(train)
        next(val)
        return train, val
