"""Test-only trainers (found by nnU-Net through ``nnUNet_extTrainer``, which the safety/compile tests extend with
this folder). They are the shipped tiny smoke trainers with one behaviour forced; never installed."""

from __future__ import annotations

import os

import torch
from torch import nn

from pumit_nnunet.nnunet.trainers import PumitTrainer_T_smoke, PumitTrainer_T_smoke_2epochs


class PumitTrainer_T_safety(PumitTrainer_T_smoke):
    """The tiny smoke run under its own name, so its results folder is this test module's alone."""


#: torch.compile backend of the compiled test trainer; nnU-Net's (inductor) unless set. The tests choose
#: ``aot_eager``: the same wrappers, graph capture and AOT autograd, without inductor's CPU code generation,
#: which takes 3 to 15 minutes on two shared cores
COMPILE_BACKEND_ENV = "PUMIT_TEST_COMPILE_BACKEND"


class PumitTrainer_T_compiled(PumitTrainer_T_smoke):
    """nnU-Net's CUDA default on the CPU: ``torch.compile`` of the network (and of the Dice term); one epoch of two
    iterations."""

    def _do_i_compile(self) -> bool:
        return True

    def initialize(self):
        super().initialize()  # nnU-Net compiled the network and the Dice term lazily: nothing is traced yet
        backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
        if backend == "inductor" or self.network is None:
            return
        self.network = torch.compile(self.network._orig_mod, backend=backend)
        loss = getattr(self.loss, "loss", self.loss)  # inside nnU-Net's deep-supervision wrapper
        if hasattr(getattr(loss, "dc", None), "_orig_mod"):
            loss.dc = torch.compile(loss.dc._orig_mod, backend=backend)


class _NaNFromEpoch(nn.Module):
    """The real loss, multiplied by NaN from epoch ``start`` on (a diverging run)."""

    def __init__(self, loss: nn.Module, trainer: object, start: int) -> None:
        super().__init__()
        self.loss, self.start = loss, start
        self.__dict__["trainer"] = trainer  # not a sub-module

    def forward(self, output, target):
        loss = self.loss(output, target)
        return loss * float("nan") if self.trainer.current_epoch >= self.start else loss


class PumitTrainer_T_nanloss(PumitTrainer_T_smoke_2epochs):
    """Two epochs with a checkpoint after the first; from the second epoch on the loss is NaN."""

    def _build_loss(self):
        return _NaNFromEpoch(super()._build_loss(), self, start=1)
