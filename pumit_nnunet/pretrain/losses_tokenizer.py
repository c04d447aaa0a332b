"""Tokenizer losses: L1 + LPIPS + the prior-distribution regulariser + a gated hinge GAN term (the paper's
tokenizer objective, with the authors' README weights).

The gate is a small pure state machine (:class:`GanGate`). The regulariser's aggregate distribution ``p̄`` is taken
across ranks (:func:`~pumit_nnunet.pretrain.distributed.all_gather_mean_keep_grad`), by default over every token
of the global batch. The authors instead average the per-process means without weights; the two agree when every
process holds as many tokens, and differ when the processes' crops differ in size (each rank draws its own crops,
so their anisotropy and token counts can differ). Ours makes N processes compute exactly what one process holding
the global batch computes, which is what the paper's formula p̄ = mean_i p_i says; ``prior_mean="processes"``
gives the authors' average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pumit_nnunet.layers.lpips import LPIPS
from pumit_nnunet.layers.quantize import mean_token_entropy, prior_entropy_loss
from pumit_nnunet.models.tokenizer import TokenizerOutput
from pumit_nnunet.pretrain.distributed import all_gather_mean_keep_grad

__all__ = [
    "TokenizerLossWeights",
    "GanGate",
    "hinge_discriminator_loss",
    "generator_adversarial_loss",
    "prior_regularisation",
    "generator_loss",
]


@dataclass(frozen=True)
class TokenizerLossWeights:
    """Loss weights (defaults: the README recipe of the original code).

    Args:
        perceptual: LPIPS weight (the original's LPIPS carried an extra x2: use 2.0 to reproduce that scale).
        quant: ``w_quant`` of ``-H(p̄)``; negative values give the sharpening stage.
        entropy: ``w_ent`` of ``mean_i H(p_i)``.
        gan: fixed weight of the generator's hinge term.
        gan_threshold: the GAN term is on only while ``max(EMA, last)`` of the discriminator loss is at most this.
        max_perceptual_slices: random 2D slices per sample that LPIPS sees while training.
        prior_mean: ``"tokens"`` (p̄ over every token of the global batch) or ``"processes"`` (the authors'
            unweighted mean of the per-process means).
    """

    perceptual: float = 2.0  # the original: weight 1 on LPIPS x 2 (our LPIPS has no x 2)
    quant: float = 0.03
    entropy: float = 1.0
    gan: float = 3e-3
    gan_threshold: float = 0.025
    max_perceptual_slices: int = 24
    prior_mean: str = "tokens"


@dataclass
class GanGate:
    """EMA of the (all-reduced) discriminator loss; the generator's GAN term is on while ``max(ema, last) <= threshold``.

    ``last`` starts equal to ``ema`` (0.1), so the gate starts closed, and opens only once the discriminator is
    clearly winning.
    """

    threshold: float = 0.025
    momentum: float = 0.9
    ema: float = 0.1
    last: float = 0.1

    @property
    def is_open(self) -> bool:
        return max(self.ema, self.last) <= self.threshold

    def update(self, d_loss: float) -> None:
        """Fold in this step's discriminator loss (already averaged over ranks)."""
        self.last = float(d_loss)
        self.ema = self.momentum * self.ema + (1 - self.momentum) * self.last

    def state_dict(self) -> dict:
        return {"ema": self.ema, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.last = float(state["ema"]), float(state["last"])


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """``0.5 · [mean relu(1 - D(x)) + mean relu(1 + D(x̂))]``."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """``-mean D(x̂)``."""
    return -fake_logits.float().mean()


def prior_regularisation(probs: Tensor, log_probs: Tensor, prior_mean: str = "tokens") -> tuple[Tensor, Tensor, Tensor]:
    """``(-H(p̄), mean_i H(p_i), p̄)`` for channel-last distributions ``(..., K)``; ``p̄`` across processes as
    ``prior_mean`` says (``"tokens"``: count-weighted; ``"processes"``: the authors' unweighted mean of means)."""
    if prior_mean not in ("tokens", "processes"):
        raise ValueError(f"prior_mean must be 'tokens' or 'processes', got {prior_mean!r}")
    flat = probs.reshape(-1, probs.shape[-1])
    count = flat.shape[0] if prior_mean == "tokens" else None
    mean_probs = all_gather_mean_keep_grad(flat.mean(0), count=count)
    return prior_entropy_loss(mean_probs), mean_token_entropy(probs, log_probs), mean_probs


def generator_loss(
    x: Tensor, out: TokenizerOutput, weights: TokenizerLossWeights, lpips: LPIPS | None = None,
    fake_logits: Tensor | None = None, training: bool = True, generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The generator objective and its detached terms (``fake_logits`` only when the GAN gate is open)."""
    recon = out.reconstruction
    terms: dict[str, Tensor] = {"l1": (recon.float() - x.float()).abs().mean()}
    total = terms["l1"]
    if lpips is not None and weights.perceptual != 0:
        max_slices = weights.max_perceptual_slices if training else None
        terms["lpips"] = lpips(recon, x, max_slices=max_slices, generator=generator)
        total = total + weights.perceptual * terms["lpips"]
    quant, ent, _ = prior_regularisation(out.probs, out.log_probs, weights.prior_mean)
    terms["quant"], terms["entropy"] = quant, ent
    total = total + weights.quant * quant + weights.entropy * ent
    if fake_logits is not None:
        terms["gan"] = generator_adversarial_loss(fake_logits)
        total = total + weights.gan * terms["gan"]
    terms["total"] = total
    return total, {k: v.detach() for k, v in terms.items()}
