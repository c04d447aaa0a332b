"""EVA-02 attention (separate q/k/v projections, q and v biases, no k bias) on SDPA, with additive 3D RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_nnunet.layers.rope import apply_rope

__all__ = ["EvaAttention"]


class EvaAttention(nn.Module):
    """Multi-head self-attention as in EVA-02 B/L MIM models (``sub_ln`` layout, no inner norm).

    Parameter names (``q_proj``, ``k_proj``, ``v_proj``, ``q_bias``, ``v_bias``, ``proj``) follow the released
    PUMIT/EVA-02 checkpoints so they load without renaming.

    Args:
        dim: embedding dimension.
        num_heads: attention heads; ``dim // num_heads`` must be divisible by 4 for the RoPE.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor, linear: nn.Linear, bias: Tensor | None) -> Tensor:
        b, n, _ = x.shape
        return F.linear(x, linear.weight, bias).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, num_prefix_tokens: int = 1) -> Tensor:
        """``x``: (B, L, C). ``rope``: cos/sin of shape (L - prefix, head_dim) or (B, L - prefix, head_dim)."""
        q = self._heads(x, self.q_proj, self.q_bias)
        k = self._heads(x, self.k_proj, None)
        v = self._heads(x, self.v_proj, self.v_bias)
        if rope is not None:
            cos, sin = (t.unsqueeze(-3) if t.dim() == 3 else t for t in rope)  # (B, 1, L, hd) per-sample tables
            p = num_prefix_tokens
            # the CLS (prefix) tokens are not rotated
            q = torch.cat([q[:, :, :p], apply_rope(q[:, :, p:], cos.to(q.dtype), sin.to(q.dtype))], dim=2)
            k = torch.cat([k[:, :, :p], apply_rope(k[:, :, p:], cos.to(k.dtype), sin.to(k.dtype))], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))
