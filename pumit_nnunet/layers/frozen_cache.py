"""Results derived from parameters (reduced SAC kernels, resampled position embeddings), cached for frozen use.

Frozen use (the tokenizer inside MIM, evaluation, nnU-Net's sliding-window prediction) recomputes the same
weight-sized tensors on every call; :class:`FrozenCache` keeps them while the parameters are unchanged. Under
autograd nothing is cached, so training always differentiates through the computation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["FrozenCache", "tensor_state"]


def tensor_state(tensor: Tensor | None) -> tuple:
    """What identifies a parameter's current values: in-place updates (optimizer steps, ``load_state_dict``'s
    ``copy_``) bump ``_version``; ``.to()``/``.half()``/re-assignment give a new storage, dtype or device."""
    if tensor is None:
        return ()
    return (tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device)


class FrozenCache:
    """Tensors computed from parameters, reused while the parameters are unchanged and autograd is off for them.

    An entry is used only when no gradient flows to the parameters (``torch.is_grad_enabled()`` is off, or they
    are frozen) and never while ``torch.compile`` traces (the compiled graph then holds the computation itself).
    The key holds the state of every parameter involved, so a changed weight (optimizer step,
    ``load_state_dict``, ``.to()``) misses, and the stale entries are dropped then.
    """

    #: configurations (aniso_d, level, grid, dtype) kept at once; a module rarely sees more than a few
    max_entries = 8

    def __init__(self) -> None:
        self.entries: dict[tuple, object] = {}

    @staticmethod
    def key(weight: Tensor, bias: Tensor | None, dtype: torch.dtype, *config: object) -> tuple | None:
        """The cache key of a call on ``weight`` (and ``bias``), or ``None`` when it must not use the cache."""
        if torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        # parameters created under inference_mode have no version counter: an in-place change would go unseen
        if weight.is_inference() or (bias is not None and bias.is_inference()):
            return None
        # entries made under inference_mode are inference tensors: keep them apart from ordinary no-grad calls
        return (*config, dtype, torch.is_inference_mode_enabled(), tensor_state(weight), tensor_state(bias))

    def get(self, key: tuple | None, compute: Callable[[], object]) -> object:
        """``compute()``, cached under ``key`` unless ``key`` is ``None``."""
        if key is None:
            return compute()
        found = self.entries.get(key)
        if found is None:
            if len(self.entries) >= self.max_entries or any(k[-2:] != key[-2:] for k in self.entries):
                self.entries.clear()  # the parameters changed (or too many shapes): older entries are stale
            found = self.entries[key] = compute()
        return found
