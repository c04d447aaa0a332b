"""Stop a diverged fine-tuning run instead of training (and saving) a NaN model.

A non-finite loss would put NaN into every weight through the optimiser step; nnU-Net would then train on and
save that model as ``checkpoint_final.pth`` with exit code 0. :class:`NonFiniteLossGuard` skips the step of a
non-finite loss (the weights stay those of the last good step) and stops the run after
``PUMIT_MAX_NONFINITE_STEPS`` (default 20) consecutive ones.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from pumit_nnunet.nnunet.checkpointing import TrainerRefusal

__all__ = ["NonFiniteLossGuard", "DEFAULT_MAX_NONFINITE_STEPS", "ENV_MAX_NONFINITE_STEPS"]

DEFAULT_MAX_NONFINITE_STEPS = 20
ENV_MAX_NONFINITE_STEPS = "PUMIT_MAX_NONFINITE_STEPS"


def _limit_from_env() -> int:
    raw = os.environ.get(ENV_MAX_NONFINITE_STEPS, str(DEFAULT_MAX_NONFINITE_STEPS))
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise TrainerRefusal(f"{ENV_MAX_NONFINITE_STEPS}={raw!r} must be a whole number of at least 1")
    return limit


def _all_ranks_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank: under DDP all ranks must skip the same steps, or they hang."""
    finite = torch.isfinite(loss.detach()).all().to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


class NonFiniteLossGuard:
    """Counts consecutive non-finite losses; :meth:`skip` says whether to skip this step's backward/step."""

    def __init__(self, limit: int | None = None, log: Callable[[str], None] = print) -> None:
        self.limit = _limit_from_env() if limit is None else limit
        self.log = log
        self.consecutive = 0
        self.total = 0

    def skip(self, loss: torch.Tensor, iteration: int) -> bool:
        """``True`` for a non-finite loss (the caller skips the update); raises after ``limit`` in a row."""
        if _all_ranks_finite(loss):
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.total += 1
        self.log(f"PUMIT: non-finite loss ({float(loss.detach().float().mean())}) at iteration {iteration}; step "
                 f"skipped ({self.consecutive} in a row, stop at {self.limit})")
        if self.consecutive >= self.limit:
            raise TrainerRefusal(
                f"training stopped: the loss was non-finite for {self.consecutive} consecutive iterations (up to "
                f"iteration {iteration}); no checkpoint was written from it, the last good checkpoint_latest.pth / "
                f"checkpoint_best.pth is kept. Lower the learning rate, check the data and the pre-trained weights "
                f"(limit: {ENV_MAX_NONFINITE_STEPS}={self.limit})")
        return True
