"""Soft tokens: each latent vector becomes a distribution over a codebook, embedded as the convex combination.

Also the pure functions of the prior-distribution regulariser (paper: extended prior distribution
regularisation). With ``p_i`` the token distributions and ``p̄`` their mean over the (global) batch:

* ``prior_entropy_loss(p̄) = Σ_k p̄_k log p̄_k = -H(p̄) = KL(p̄ ‖ U) - log K``: minimising it spreads code usage;
* ``mean_token_entropy(p) = mean_i H(p_i)``: minimising it sharpens each token towards one code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SoftTokenQuantizer", "prior_entropy_loss", "mean_token_entropy", "kl_from_uniform", "entropy"]


def entropy(probs: Tensor, log_probs: Tensor | None = None, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) along ``dim``; ``0 log 0 = 0``. Pass ``log_probs`` when known (more accurate)."""
    if log_probs is None:
        log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    return -(probs * log_probs).sum(dim)


def prior_entropy_loss(mean_probs: Tensor) -> Tensor:
    """``Σ_k p̄_k log p̄_k = -H(p̄)`` of the aggregate code distribution ``p̄`` (shape ``(K,)``)."""
    return -entropy(mean_probs)


def mean_token_entropy(probs: Tensor, log_probs: Tensor | None = None) -> Tensor:
    """``mean_i H(p_i)`` over token distributions laid out as ``(..., K)``."""
    return entropy(probs, log_probs).mean()


def kl_from_uniform(probs: Tensor, log_probs: Tensor | None = None) -> Tensor:
    """``KL(p ‖ U_K) = log K - H(p)`` along the last dim, per distribution (the paper's sharpness measure)."""
    return math.log(probs.shape[-1]) - entropy(probs, log_probs)


class SoftTokenQuantizer(nn.Module):
    """Linear logits, ``p = softmax(logits)`` (temperature 1), token embedding ``Σ_k p_k e_k``.

    Fully differentiable: no straight-through estimator and no commitment loss. Key names follow the original
    (``proj``, ``embedding``).

    Args:
        num_embeddings: codebook size K (paper 1024).
        embedding_dim: codebook vector size (paper 512).
        in_dim: latent size fed to the logits projection (defaults to ``embedding_dim``).
    """

    def __init__(self, num_embeddings: int = 1024, embedding_dim: int = 512, in_dim: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.proj = nn.Linear(in_dim or embedding_dim, num_embeddings)
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def no_weight_decay(self) -> set[str]:
        """The codebook is not weight-decayed (as the authors exclude every embedding): over 500k steps at wd 0.05
        the decay alone would shrink it to about 0.29 of its norm and change the soft tokens MIM learns from."""
        return {"embedding.weight"}

    def logits(self, z: Tensor) -> Tensor:
        """Channel-first latents ``(B, C, *S)`` -> channel-last logits ``(B, *S, K)``."""
        return self.proj(z.movedim(1, -1))

    def embed(self, probs: Tensor) -> Tensor:
        """Channel-last distributions ``(B, *S, K)`` -> channel-first embeddings ``(B, E, *S)``."""
        return (probs @ self.embedding.weight.to(probs.dtype)).movedim(-1, 1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(z_q (B, E, *S), probs (B, *S, K), log_probs (B, *S, K))``, softmax computed in float32."""
        logits = self.logits(z).float()
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        return self.embed(probs.to(z.dtype)), probs, log_probs
