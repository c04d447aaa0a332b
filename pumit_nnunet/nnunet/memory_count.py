"""Counting the training memory of a network on any device: what the memory model is validated against.

Peak GPU memory cannot be measured on a CPU, so the benchmarks and the memory-model test count what a training
step must hold, independently of any allocator:

* **saved for backward**: the bytes of every unique storage that autograd saves during one forward + loss
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. A view saves its whole storage, so
  tensors sharing a storage count once. Inside an activation-checkpointed region autograd saves nothing (the
  region's inputs are saved once by the checkpoint, and are counted).
* **training state**: parameters, their gradients and the optimiser's state tensors (AdamW: two moments and a
  step counter per parameter tensor).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["saved_tensor_bytes", "training_state_bytes", "nnunet_default_loss", "forward_loss"]


def saved_tensor_bytes(forward: Callable[[], Tensor], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the unique storages autograd saves while ``forward()`` runs (storages of ``exclude`` skipped).

    The graph is dropped afterwards (no backward is needed to count)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    del result  # frees the graph and everything it saved
    return sum(storages.values())


def training_state_bytes(network: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Parameters + gradients (those that exist) + the optimiser's state tensors, in bytes."""
    parameters = list(network.parameters())
    tensors = parameters + [p.grad for p in parameters if p.grad is not None]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def nnunet_default_loss(deep_supervision_outputs: int) -> nn.Module:
    """nnU-Net's default training loss (Dice + CE); with deep supervision weighted 1/2^i, the lowest-resolution
    output weighted 0 (so nnU-Net skips it), normalised."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if deep_supervision_outputs <= 1:
        return loss
    weights = [1 / 2**i for i in range(deep_supervision_outputs)]
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, [w / sum(weights) for w in weights])


def forward_loss(network: nn.Module, x: Tensor, seed: int = 0) -> Callable[[], Tensor]:
    """A ``forward()`` for :func:`saved_tensor_bytes`: ``network(x)`` and nnU-Net's default loss against random
    label maps (seeded) of every output's size, made inside the call (one forward only)."""

    def forward() -> Tensor:
        outputs = network(x)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        generator = torch.Generator().manual_seed(seed)
        targets = [torch.randint(0, o.shape[1], (o.shape[0], 1, *o.shape[2:]), generator=generator).to(o.device)
                   for o in outputs]
        loss = nnunet_default_loss(len(outputs))
        return loss(outputs, targets) if len(outputs) > 1 else loss(outputs[0], targets[0])

    return forward
