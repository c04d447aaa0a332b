"""PUMIT trainers for nnU-Net (``-tr NAME``); each is a few lines on top of :class:`PumitTrainerBase`.

Sizes: ``PumitTrainer`` (ViT-B, the released size), ``PumitTrainer_L``, ``PumitTrainer_S`` (CPUs, laptops) and
``PumitTrainer_T`` (tests). Schedules: the default is PUMIT's 50k iterations (200 epochs x 250); ``_5epochs``,
``_50epochs`` shorten it; ``_smoke`` runs 1 epoch of 2 iterations on a small patch, to check a set-up.
"""

from __future__ import annotations

from pumit_nnunet.nnunet.trainer_base import PumitTrainerBase

__all__ = [
    "PumitTrainer", "PumitTrainer_L", "PumitTrainer_S", "PumitTrainer_T",
    "PumitTrainer_5epochs", "PumitTrainer_50epochs", "PumitTrainer_L_5epochs", "PumitTrainer_S_5epochs",
    "PumitTrainer_S_50epochs", "PumitTrainer_S_smoke", "PumitTrainer_T_smoke", "PumitTrainer_T_smoke_2epochs",
    "PumitTrainer_paper", "PumitTrainer_nnunet", "PumitTrainer_L_paper", "PumitTrainer_T_paper_smoke",
    "PumitTrainer_lite", "PumitTrainer_S_lite",
]
# the demo's budget-matched pairs (PumitTrainer_T_demo, nnUNetTrainer_demo, ...) live in nnunet/demo_trainers.py


class PumitTrainer(PumitTrainerBase):
    """ViT-B backbone (768/12/12), the size of the released PUMIT weights."""

    vit_size = "B"


class PumitTrainer_L(PumitTrainerBase):
    """ViT-L backbone (1024/24/16), blocks 7/11/15/23 feed the neck."""

    vit_size = "L"


class PumitTrainer_S(PumitTrainerBase):
    """ViT-S backbone (384/12/6), for CPUs and laptops."""

    vit_size = "S"


class PumitTrainer_T(PumitTrainerBase):
    """Tiny ViT (128/4/2) with a slim decoder, for tests and quick checks."""

    vit_size = "T"
    arch_overrides = {"lateral_channels": [32, 64, 128, 128], "fullres_channels": [16, 32]}


class PumitTrainer_5epochs(PumitTrainer):
    """ViT-B, 5 epochs."""

    pumit_epochs = 5


class PumitTrainer_50epochs(PumitTrainer):
    """ViT-B, 50 epochs."""

    pumit_epochs = 50


class PumitTrainer_L_5epochs(PumitTrainer_L):
    """ViT-L, 5 epochs."""

    pumit_epochs = 5


class PumitTrainer_S_5epochs(PumitTrainer_S):
    """ViT-S, 5 epochs."""

    pumit_epochs = 5


class PumitTrainer_S_50epochs(PumitTrainer_S):
    """ViT-S, 50 epochs."""

    pumit_epochs = 50


class _Smoke:
    """One epoch of two iterations on a patch of at most 32x64x64 with batch 2, no test-time mirroring:
    checks a set-up end to end in CPU-seconds."""

    pumit_epochs = 1
    pumit_iterations = 2
    pumit_val_iterations = 1
    patch_cap = (32, 64, 64)
    batch_size_override = 2
    test_time_mirroring = False


class PumitTrainer_S_smoke(_Smoke, PumitTrainer_S):
    """ViT-S smoke run (see ``_Smoke``)."""


class PumitTrainer_T_smoke(_Smoke, PumitTrainer_T):
    """Tiny smoke run (see ``_Smoke``): what the end-to-end tests use."""


class PumitTrainer_T_smoke_2epochs(_Smoke, PumitTrainer_T):
    """Two smoke epochs with a checkpoint after each: exercises ``--c`` (resume)."""

    pumit_epochs = 2
    checkpoint_every = 1


# -- fine-tuning recipes (see pumit_nnunet.nnunet.recipe): the plans' protocol decides unless a variant forces one --
class PumitTrainer_paper(PumitTrainer):
    """ViT-B with the authors' fine-tuning recipe whatever the plans say: MONAI DiceCE on upsampled logits, their
    crop sampling, MONAI augmentation and decoder (BTCV/CHAOS settings come from the plans' protocol)."""

    recipe = "authors"


class PumitTrainer_L_paper(PumitTrainer_L):
    """ViT-L with the authors' fine-tuning recipe (see ``PumitTrainer_paper``)."""

    recipe = "authors"


class PumitTrainer_nnunet(PumitTrainer):
    """ViT-B with nnU-Net's pipeline (loss: Dice + CE on downsampled labels, sampling, augmentation) with the
    authors' [8, 4, 2, 1]/15 head weights (not nnU-Net's [8, 4, 2, 0]/14), even on plans whose protocol asks for
    the authors' recipe (the ``btcv``/``chaos`` presets)."""

    recipe = "nnunet"


class PumitTrainer_T_paper_smoke(_Smoke, PumitTrainer_T):
    """Tiny smoke run with the authors' recipe: what its end-to-end test uses."""

    recipe = "authors"


# -- decoder widths (not part of the pre-trained weights; see pumit_nnunet.models.seg_blocks.DECODER_PRESETS) --
class PumitTrainer_lite(PumitTrainer):
    """ViT-B with the "lite" decoder: nnU-Net's widths capped at 320 channels instead of the authors' 512 at
    1/16 and 1/32 (a deliberate difference from the authors; ``PumitTrainer`` keeps their widths)."""

    arch_overrides = {"decoder": "lite"}


class PumitTrainer_S_lite(PumitTrainer_S):
    """ViT-S with the "lite" decoder (see ``PumitTrainer_lite``)."""

    arch_overrides = {"decoder": "lite"}
