"""Masked image modelling (MIM) on soft tokens: the universal ViT with a mask token and a token-prediction head.

The ViT sees ImageNet-normalised RGB with 55% of its patch tokens replaced by a learnable mask token; an MLP head
predicts, at every masked position, a distribution over the frozen tokenizer's codebook. The target is the
tokenizer's own soft token (softmax of its logits at temperature 1), and the loss is the soft-label cross-entropy
averaged over masked tokens, as in the authors' MIM stage. The tokenizer is deliberately *not* a sub-module: the MIM
model's ``state_dict`` then holds exactly the released ``pumit-b.ckpt`` names (ViT keys, ``mask_token``,
``mim_head.{0,2}.*``) and the trainer owns the frozen tokenizer.

Masked tokens carry no absolute position embedding (they replace patch tokens after it is added), only RoPE,
as in the original.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_nnunet.layers.lpips import IMAGENET_MEAN, IMAGENET_STD
from pumit_nnunet.models.tokenizer import tokenizer_input
from pumit_nnunet.models.vit import UniversalViT, ViTConfig

__all__ = [
    "DEFAULT_MASK_RATIO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_mask_layer_ids",
    "num_visible_tokens",
    "random_token_mask",
    "visible_indices",
    "mim_inputs",
    "flatten_token_grid",
    "soft_cross_entropy",
    "soft_kl_divergence",
    "token_accuracy",
    "merge_token_distributions",
    "MIMOutput",
    "ViTForMIM",
]

DEFAULT_MASK_RATIO = 0.55
# the ViT sees ImageNet-normalised RGB (IMAGENET_MEAN/STD, defined once in layers.lpips: the EVA-02
# initialisation was trained on it); the tokenizer sees 2x - 1
#: layers that process mask tokens, per size; the others see only CLS + visible tokens (MAE-style). None = all.
_MASK_LAYERS_FROM: dict[int, int] = {24: 18}


def default_mask_layer_ids(depth: int) -> tuple[int, ...]:
    """The original's choice: every layer for B (12 blocks), the last 6 of 24 for L."""
    return tuple(range(_MASK_LAYERS_FROM.get(depth, 0), depth))


def num_visible_tokens(num_tokens: int, mask_ratio: float = DEFAULT_MASK_RATIO) -> int:
    """``int(L * (1 - ratio))`` exactly as the original computes it (float rounding: 224 of 500 at 0.55)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1 - mask_ratio))


def random_token_mask(
    batch: int, num_tokens: int, mask_ratio: float = DEFAULT_MASK_RATIO, *,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean ``(batch, num_tokens)``, True = masked; exactly :func:`num_visible_tokens` False per row.

    Visible positions are drawn uniformly without replacement, independently per sample (not BEiT's block-wise
    masking). Randomness comes from ``generator`` on the CPU so masks do not depend on the device.
    """
    visible = num_visible_tokens(num_tokens, mask_ratio)
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool)
    mask.scatter_(1, order[:, :visible], False)
    return mask.to(device)


def visible_indices(mask: Tensor) -> Tensor:
    """Sorted indices of the visible (False) positions, ``(B, V)``; every row must have the same count."""
    counts = (~mask).sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample needs the same number of visible tokens, got {counts.tolist()}")
    return (~mask).nonzero()[:, 1].view(mask.shape[0], -1)


def mim_inputs(image: Tensor) -> tuple[Tensor, Tensor]:
    """``(vit_input, tokenizer_input)`` from a batch in [0, 1]: grey replicated to RGB, then ImageNet / ``2x - 1``."""
    tokens_in = tokenizer_input(image)  # validates the channels and replicates grey
    rgb = image.expand(-1, 3, *image.shape[2:]) if image.shape[1] == 1 else image
    view = (1, 3) + (1,) * (image.dim() - 2)
    mean = image.new_tensor(IMAGENET_MEAN).view(view)
    std = image.new_tensor(IMAGENET_STD).view(view)
    return (rgb - mean) / std, tokens_in


def flatten_token_grid(probs: Tensor) -> Tensor:
    """Tokenizer output ``(B, K, d, h, w)`` to ``(B, d*h*w, K)``, flattened D -> H -> W like the ViT's tokens."""
    return probs.flatten(2).transpose(1, 2)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of ``-sum_k target_k log softmax(logits)_k`` (in float32)."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def soft_kl_divergence(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of ``KL(target || softmax(logits))``: the cross-entropy minus the target's entropy."""
    target = target.float()
    return (torch.xlogy(target, target) - target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def token_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of rows whose most likely predicted token is the target's most likely token."""
    return (logits.argmax(-1) == target.argmax(-1)).float().mean()


def merge_token_distributions(pred_probs: Tensor, target_probs: Tensor, mask: Tensor) -> Tensor:
    """Target distributions ``(B, N, K)`` with the masked positions replaced by ``pred_probs`` ``(B*M, K)``."""
    merged = target_probs.clone()
    merged[mask] = pred_probs.to(merged.dtype)
    return merged


@dataclass
class MIMOutput:
    """What the objective returns: the differentiable ``loss``, detached ``kl`` and ``accuracy`` for monitoring."""

    loss: Tensor
    kl: Tensor
    accuracy: Tensor
    logits: Tensor  # (B*M, K) at the masked tokens


class ViTForMIM(UniversalViT):
    """The universal ViT with a mask token and the MIM head ``Linear(dim, dim) -> GELU -> Linear(dim, K)``.

    Args:
        config: ViT architecture (``mask_token`` is switched on).
        codebook_size: number of tokenizer codes ``K`` (1024 in PUMIT).
        mask_ratio: fraction of patch tokens masked per sample.
        mask_layer_ids: blocks that process the full sequence with mask tokens; must be the last blocks
            (``range(k, depth)``). Earlier blocks see only CLS + visible tokens, whose outputs are scattered back
            into the mask-token sequence before block ``k``. ``None``: :func:`default_mask_layer_ids`.
    """

    def __init__(self, config: ViTConfig, codebook_size: int = 1024, mask_ratio: float = DEFAULT_MASK_RATIO,
                 mask_layer_ids: Sequence[int] | None = None) -> None:
        super().__init__(replace(config, mask_token=True))
        num_visible_tokens(1, mask_ratio)  # validate eagerly
        self.codebook_size = codebook_size
        self.mask_ratio = mask_ratio
        ids = tuple(default_mask_layer_ids(config.depth) if mask_layer_ids is None else sorted(mask_layer_ids))
        if ids != tuple(range(config.depth - len(ids), config.depth)):
            raise ValueError(f"mask_layer_ids must be the last blocks range(k, {config.depth}), got {ids}")
        self.mask_layer_ids = ids
        dim = config.embed_dim
        self.mim_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, codebook_size))

    @property
    def first_mask_layer(self) -> int:
        return len(self.blocks) - len(self.mask_layer_ids)

    def encode_masked(self, x: Tensor, aniso_d: int, mask: Tensor) -> Tensor:
        """Normed sequence ``(B, 1 + N, C)`` after the blocks, with the ``mask``ed patch tokens replaced."""
        tokens, grid = self.embed_patches(x, aniso_d)
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {tuple(tokens.shape[:2])} tokens")
        cos, sin = self.rope_tables(grid, tokens)
        vis = visible_indices(mask)
        gather = vis.unsqueeze(-1)
        # visible-only blocks (MAE-style): RoPE tables gathered per sample for the kept positions
        h = self.prepend_cls(tokens.gather(1, gather.expand(-1, -1, tokens.shape[-1])))
        vis_rope = (cos[vis], sin[vis])
        for i in range(self.first_mask_layer):
            h = self.run_block(i, h, vis_rope)
        canvas = self.mask_token.to(h.dtype).expand_as(tokens)
        patches = canvas.scatter(1, gather.expand(-1, -1, h.shape[-1]), h[:, 1:])
        h = torch.cat([h[:, :1], patches], dim=1)
        for i in range(self.first_mask_layer, len(self.blocks)):
            h = self.run_block(i, h, (cos, sin))
        return self.norm(h)

    def forward(self, x: Tensor, aniso_d: int, mask: Tensor) -> Tensor:  # type: ignore[override]
        """Token logits at the masked positions, ``(B*M, K)`` in row-major (sample, position) order."""
        h = self.encode_masked(x, aniso_d, mask)
        return self.mim_head(h[:, 1:][mask])

    def objective(self, logits: Tensor, target_probs: Tensor, mask: Tensor) -> MIMOutput:
        """Soft-label cross-entropy vs the tokenizer's distributions ``(B, N, K)`` at the masked positions."""
        target = target_probs[mask]
        with torch.no_grad():
            kl = soft_kl_divergence(logits, target)
            acc = token_accuracy(logits, target)
        return MIMOutput(soft_cross_entropy(logits, target), kl, acc, logits)
