"""nnU-Net results checkpoints that cannot run code or carry a poisoned model.

nnU-Net writes ``checkpoint_{latest,best,final}.pth`` with numpy scalars inside (the training log, ``_best_ema``)
and reads them with ``torch.load(weights_only=False)``, so a crafted file in a shared model folder runs arbitrary
code. PUMIT trainers write the same keys with plain values only (:func:`results_checkpoint`), so every file they
write loads with ``weights_only=True`` - also under PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, the documented
safe way to predict with nnU-Net's predictor - and read them weights-only (:func:`read_results_checkpoint`),
refusing pickled objects and non-finite weights.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from pumit_nnunet.checkpoints.layout import CheckpointError, storable
from pumit_nnunet.checkpoints.load import unwrap_network
from pumit_nnunet.checkpoints.readers import _strip_wrappers
from pumit_nnunet.checkpoints.safety import first_nonfinite, load_weights_only, require_finite
from pumit_nnunet.errors import DataError, PumitError, is_expected

__all__ = ["TrainerRefusal", "trainer_refuses_bad_input", "results_checkpoint", "read_results_checkpoint",
           "restore_results_checkpoint", "require_finite_network"]

#: what a resumable results checkpoint must hold (``grad_scaler_state`` and the mirroring axes are optional)
RESUME_KEYS = ("network_weights", "optimizer_state", "logging", "_best_ema", "current_epoch", "init_args")


class TrainerRefusal(DataError, SystemExit):
    """A PUMIT trainer refuses to go on (a checkpoint it will not load, a diverged run).

    A ``SystemExit`` so that ``nnUNetv2_train`` ends with this one line and exit code 1 instead of a traceback;
    still an ``Exception`` (a :class:`DataError`) for programmatic callers."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(problem, path)
        self.code = f"PUMIT trainer: error: {self}"


@contextmanager
def trainer_refuses_bad_input(what: str) -> Iterator[None]:
    """Inside ``nnUNetv2_train``: an expected failure (a refused, broken or absent weights file) ends the run with
    one line ``PUMIT trainer: error: <file>: <what>: <problem>`` and exit code 1 instead of a traceback."""
    try:
        yield
    except TrainerRefusal:
        raise
    except Exception as error:
        if not is_expected(error):
            raise  # a bug: keep its traceback
        if isinstance(error, PumitError):
            problem, path = error.problem, error.path
        elif getattr(error, "filename", None):  # an OS error naming its file
            problem, path = (error.strerror or type(error).__name__).lower(), error.filename
        else:  # e.g. FileNotFoundError("... does not exist") with the file in its message
            problem, path = str(error), None
        raise TrainerRefusal(f"{what}: {problem}", path) from error


def results_checkpoint(trainer: Any) -> dict[str, Any]:
    """nnU-Net's checkpoint dict for ``trainer`` (the same keys as ``nnUNetTrainer.save_checkpoint``), with plain
    values only; the weights are those of the unwrapped module (never ``_orig_mod.``/``module.`` names)."""
    return {
        "network_weights": unwrap_network(trainer.network).state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": storable(trainer.logger.get_checkpoint()),
        "_best_ema": storable(trainer._best_ema),
        "current_epoch": int(trainer.current_epoch + 1),
        "init_args": storable(trainer.my_init_kwargs),
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": storable(trainer.inference_allowed_mirroring_axes),
    }


def require_finite_network(network: torch.nn.Module, destination: str | os.PathLike) -> None:
    """Refuse to write ``destination`` from a network with non-finite weights (the last good file stays)."""
    bad = first_nonfinite(unwrap_network(network).state_dict())
    if bad:
        raise TrainerRefusal(f"not written: the network's weights are no longer finite ({', '.join(bad)}); the "
                             "previous checkpoints are kept. Lower the learning rate or check the data and the "
                             "pre-trained weights", destination)


def read_results_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a results checkpoint weights-only and check it is complete and finite; refusals name the file."""
    path = Path(path)
    try:
        checkpoint = load_weights_only(path, map_location=device)
        if not isinstance(checkpoint, Mapping):
            raise CheckpointError(f"holds a {type(checkpoint).__name__}, not an nnU-Net checkpoint dict", path)
        missing = [key for key in RESUME_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(f"not an nnU-Net results checkpoint: it lacks {', '.join(missing)}", path)
        require_finite(checkpoint["network_weights"], path)
    except CheckpointError as error:
        hint = ("; checkpoints written by a stock nnU-Net trainer or an older pumit-nnunet hold numpy objects: "
                "re-save them only if you trust their author") if "first: numpy" in error.problem else ""
        raise TrainerRefusal(error.problem + hint, error.path or path) from error
    except FileNotFoundError as error:
        raise TrainerRefusal("does not exist", path) from error
    return dict(checkpoint)


def restore_results_checkpoint(trainer: Any, checkpoint: Mapping[str, Any]) -> None:
    """Put a checkpoint read by :func:`read_results_checkpoint` back into ``trainer`` (nnU-Net's semantics)."""
    trainer.my_init_kwargs = checkpoint["init_args"]
    trainer.current_epoch = checkpoint["current_epoch"]
    trainer.logger.load_checkpoint(checkpoint["logging"])
    trainer._best_ema = checkpoint["_best_ema"]
    axes = checkpoint.get("inference_allowed_mirroring_axes", trainer.inference_allowed_mirroring_axes)
    trainer.inference_allowed_mirroring_axes = tuple(axes) if isinstance(axes, list) else axes
    unwrap_network(trainer.network).load_state_dict(_strip_wrappers(checkpoint["network_weights"]))
    trainer.optimizer.load_state_dict(checkpoint["optimizer_state"])
    if trainer.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
