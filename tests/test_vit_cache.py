"""Caches of the universal ViT for frozen use: the resampled position embedding and the RoPE tables equal their
recomputation, and a learnable position embedding changed by ``load_state_dict`` or an optimizer step is never
served stale."""

from __future__ import annotations

import torch

from pumit_nnunet.layers.pos_embed import resample_pos_embed
from pumit_nnunet.layers.rope import rope_angles
from pumit_nnunet.models.vit import UniversalViT, vit_config

GRID_INPUT = (1, 3, 16, 48, 32)  # aniso_d 2: 4 x 3 x 2 tokens, resampled from the 5 x 10 x 10 embedding


def _vit(seed: int = 0) -> UniversalViT:
    torch.manual_seed(seed)
    return UniversalViT(vit_config("T")).eval()


def test_cached_position_embedding_equals_recomputed() -> None:
    vit = _vit()
    x = torch.randn(*GRID_INPUT)
    expected = vit(x, 2).detach()  # autograd on: nothing cached
    assert vit.pos_embed_cache.entries == {}
    with torch.no_grad():
        first, second = vit(x, 2), vit(x, 2)
        tokens, grid = vit.embed_patches(x, 2)
    (cached,) = vit.pos_embed_cache.entries.values()
    torch.testing.assert_close(cached, resample_pos_embed(vit.pos_embed, grid).detach(), rtol=0, atol=0)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_load_state_dict_replaces_the_cached_position_embedding() -> None:
    ours, other = _vit(0), _vit(1)
    x = torch.randn(*GRID_INPUT)
    with torch.no_grad():
        ours(x, 2)
        ours.load_state_dict(other.state_dict())
        torch.testing.assert_close(ours(x, 2), other(x, 2), rtol=0, atol=0)


def test_optimizer_step_replaces_the_cached_position_embedding() -> None:
    vit = _vit()
    x = torch.randn(*GRID_INPUT)
    with torch.no_grad():
        before = vit(x, 2)
    optimizer = torch.optim.SGD([vit.pos_embed], lr=1.0)
    vit(x, 2).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = vit(x, 2)
        _, grid = vit.embed_patches(x, 2)
    (cached,) = vit.pos_embed_cache.entries.values()
    torch.testing.assert_close(cached, resample_pos_embed(vit.pos_embed, grid).detach(), rtol=0, atol=0)
    assert not torch.allclose(after, before)


def test_rope_tables_are_cached_and_equal_the_recomputed_angles() -> None:
    vit = _vit()
    like = torch.zeros(1)
    cos, sin = vit.rope_tables((4, 3, 2), like)
    again = vit.rope_tables((4, 3, 2), like)
    assert again[0] is cos and again[1] is sin  # one computation per grid, device and dtype
    angles = rope_angles((4, 3, 2), vit.rope.head_dim, vit.rope.bases)
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=0)


def test_rope_tables_follow_autocast_dtype() -> None:
    vit = _vit()
    like = torch.zeros(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, sin = vit.rope_tables((2, 2, 2), like)
    assert cos.dtype == sin.dtype == torch.bfloat16
    angles = rope_angles((2, 2, 2), vit.rope.head_dim, vit.rope.bases)
    torch.testing.assert_close(cos, angles.cos().to(torch.bfloat16), rtol=0, atol=0)
