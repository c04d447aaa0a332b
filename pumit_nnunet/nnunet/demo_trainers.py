"""The demo's budget-matched trainer pairs: a PUMIT trainer and nnU-Net's own default trainer on identical terms.

Each pair shares one :class:`DemoBudget`: the same epochs x iterations (counted exactly: nnU-Net's built-in
``nnUNetTrainer_Xepochs`` keep 250 iterations per epoch, so they cannot match), the same patch (the PUMIT
trainer's token-aligned patch, written into the baseline's plans too), the same batch size, no test-time mirroring
for either, and the same seed policy (every run seeds Python, NumPy and torch with ``seed`` before building the
network, so a rerun draws the same initial weights and patches). The optimiser and loss stay each trainer's own:
AdamW with warm-up for PUMIT, nnU-Net's SGD + poly for the baseline.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from pumit_nnunet.nnunet.trainers import PumitTrainer_T

__all__ = ["DemoBudget", "DEMO_BUDGETS", "PumitTrainer_T_demo", "nnUNetTrainer_demo", "PumitTrainer_T_demo_quick",
           "nnUNetTrainer_demo_quick", "demo_trainer_pair", "match_twin_plans"]


@dataclass(frozen=True)
class DemoBudget:
    """One training budget, shared by both trainers of a pair."""

    epochs: int
    iterations: int
    val_iterations: int
    patch_cap: tuple[int, int, int]
    batch_size: int
    seed: int = 0

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations


#: ``standard``: what ``pumit-nnunet demo`` trains (its measured time is in the README); ``quick``: a pipeline
#: check (the demo's test). ``patch_cap`` bounds the PUMIT trainer's patch, never below one patch divisor (so 32
#: slices, not 16, on the lung task: aniso_d 0 needs depth multiples of 32); the baseline takes the PUMIT trainer's
#: final patch, and the demo prints the patch both trained with (32x64x64 there).
DEMO_BUDGETS: dict[str, DemoBudget] = {
    "standard": DemoBudget(epochs=4, iterations=20, val_iterations=2, patch_cap=(16, 64, 64), batch_size=2),
    "quick": DemoBudget(epochs=1, iterations=3, val_iterations=1, patch_cap=(16, 64, 64), batch_size=2),
}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the main process draws the patches: ``nnUNet_n_proc_DA=0``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _SeededBudget:
    """Mixin: the budget's schedule, and seeding right before the network is built."""

    demo_budget: ClassVar[DemoBudget]

    def _apply_demo_schedule(self) -> None:
        self.num_epochs = self.demo_budget.epochs
        self.num_iterations_per_epoch = self.demo_budget.iterations
        self.num_val_iterations_per_epoch = self.demo_budget.val_iterations

    def initialize(self):
        if not self.was_initialized:
            seed_everything(self.demo_budget.seed)
        return super().initialize()


class _PumitDemo(_SeededBudget, PumitTrainer_T):
    """Tiny PUMIT trainer on a demo budget (subclasses set ``demo_budget``)."""

    test_time_mirroring = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        budget = cls.demo_budget
        cls.pumit_epochs, cls.pumit_iterations, cls.pumit_val_iterations = budget.epochs, budget.iterations, budget.val_iterations
        cls.patch_cap, cls.batch_size_override = budget.patch_cap, budget.batch_size


def match_twin_plans(plans: dict, configuration: str, dataset_json: dict, twin: type[PumitTrainer_T]) -> None:
    """Give ``configuration`` of ``plans`` (in place) the final patch and batch size of the PUMIT trainer ``twin``:
    those it trains with after its plan adaptation *and* memory fit (which may shrink them on stock plans, e.g.
    under ``PUMIT_GPU_MEMORY_GB``), so the pair trains on identical terms by construction."""
    fitted = copy.deepcopy(plans)
    twin.fit_plans(fitted, configuration, dataset_json)
    for key in ("patch_size", "batch_size"):
        plans["configurations"][configuration][key] = fitted["configurations"][configuration][key]


class _NnunetDemo(_SeededBudget, nnUNetTrainer):
    """nnU-Net's default trainer (its U-Net, loss, SGD + poly, augmentation), only shortened to a demo budget and
    given the patch and batch size of the PUMIT trainer it is compared with (``pumit_twin``)."""

    pumit_twin: ClassVar[type]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        match_twin_plans(plans, configuration, dataset_json, self.pumit_twin)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._apply_demo_schedule()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, do_dummy_2d, initial_patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None  # as the PUMIT twin: no test-time mirroring
        return rotation, do_dummy_2d, initial_patch, mirror_axes


class PumitTrainer_T_demo(_PumitDemo):
    """``pumit-nnunet demo``'s PUMIT trainer: tiny ViT, the ``standard`` demo budget."""

    demo_budget = DEMO_BUDGETS["standard"]


class nnUNetTrainer_demo(_NnunetDemo):
    """``pumit-nnunet demo``'s baseline: nnU-Net's default trainer on the ``standard`` demo budget."""

    demo_budget = DEMO_BUDGETS["standard"]
    pumit_twin = PumitTrainer_T_demo


class PumitTrainer_T_demo_quick(_PumitDemo):
    """The demo's PUMIT trainer on the ``quick`` budget (a pipeline check)."""

    demo_budget = DEMO_BUDGETS["quick"]


class nnUNetTrainer_demo_quick(_NnunetDemo):
    """The demo's baseline on the ``quick`` budget."""

    demo_budget = DEMO_BUDGETS["quick"]
    pumit_twin = PumitTrainer_T_demo_quick


def demo_trainer_pair(budget: str) -> tuple[str, str]:
    """``(PUMIT trainer name, nnU-Net baseline name)`` for a budget of :data:`DEMO_BUDGETS`."""
    suffix = "" if budget == "standard" else f"_{budget}"
    return f"PumitTrainer_T_demo{suffix}", f"nnUNetTrainer_demo{suffix}"
