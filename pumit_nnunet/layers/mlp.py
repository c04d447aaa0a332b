"""SwiGLU feed-forward with a sub-LayerNorm (EVA-02's ``NaiveSwiGLU`` with ``subln``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwiGLU"]


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``; names match the released checkpoints (timm calls them fc1_g/fc1_x/norm/fc2).

    Args:
        dim: input/output dimension.
        hidden_dim: hidden dimension (PUMIT: ``int(dim * 8 / 3)``).
        eps: LayerNorm epsilon (PUMIT keeps PyTorch's 1e-5).
    """

    def __init__(self, dim: int, hidden_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.ffn_ln = nn.LayerNorm(hidden_dim, eps=eps)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))
