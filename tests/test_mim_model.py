"""MIM model and objective: masking, inputs, soft-label loss, and the masked forward against reference computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.models.mim import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViTForMIM,
    default_mask_layer_ids,
    flatten_token_grid,
    merge_token_distributions,
    mim_inputs,
    num_visible_tokens,
    random_token_mask,
    soft_cross_entropy,
    soft_kl_divergence,
    token_accuracy,
    visible_indices,
)
from pumit_nnunet.models.vit import UniversalViT, vit_config

TINY = vit_config("T")


def _model(mask_layer_ids=None, seed: int = 0) -> ViTForMIM:
    torch.manual_seed(seed)
    return ViTForMIM(TINY, codebook_size=32, mask_layer_ids=mask_layer_ids).eval()


def _image(batch: int = 2, shape=(32, 32, 32), seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, *shape, generator=torch.Generator().manual_seed(seed))


def test_visible_count_matches_the_original_formula():
    # int(500 * (1 - 0.55)) is 224 in floating point, not 225: the original trains with 224 visible tokens
    assert num_visible_tokens(500) == 224
    assert num_visible_tokens(100) == 44
    with pytest.raises(ValueError):
        num_visible_tokens(10, 1.0)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), tokens=st.integers(1, 600), ratio=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_mask_has_exact_ratio_per_sample(batch, tokens, ratio, seed):
    mask = random_token_mask(batch, tokens, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (batch, tokens) and mask.dtype == torch.bool
    assert ((~mask).sum(1) == num_visible_tokens(tokens, ratio)).all()
    vis = visible_indices(mask)
    assert (vis.diff(dim=1) > 0).all()  # sorted, distinct
    assert not mask.gather(1, vis).any()


def test_mask_is_uniform_and_reproducible():
    g = torch.Generator().manual_seed(0)
    masks = random_token_mask(4000, 20, generator=g)
    again = random_token_mask(4000, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    freq = masks.float().mean(0)  # every position masked with probability 11/20
    torch.testing.assert_close(freq, torch.full((20,), 11 / 20), atol=0.03, rtol=0)
    assert len({tuple(r.tolist()) for r in masks[:50]}) == 50  # independent per sample


def test_visible_indices_rejects_ragged_masks():
    with pytest.raises(ValueError):
        visible_indices(torch.tensor([[True, False], [True, True]]))


def test_mim_inputs_normalise_each_branch():
    grey = torch.rand(2, 1, 2, 4, 4)
    vit_in, tok_in = mim_inputs(grey)
    assert vit_in.shape == tok_in.shape == (2, 3, 2, 4, 4)
    torch.testing.assert_close(tok_in, (grey * 2 - 1).expand(-1, 3, -1, -1, -1))
    for c in range(3):
        torch.testing.assert_close(vit_in[:, c], (grey[:, 0] - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    with pytest.raises(ValueError):
        mim_inputs(torch.rand(1, 2, 1, 4, 4))


def test_flatten_token_grid_matches_vit_token_order():
    probs = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2, 2)
    flat = flatten_token_grid(probs)
    assert flat.shape == (2, 8, 3)
    assert torch.equal(flat[1, 5], probs[1, :, 1, 0, 1])  # token 5 = (d=1, h=0, w=1)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), k=st.integers(2, 16), seed=st.integers(0, 2**31))
def test_soft_losses_agree_with_reference(rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, generator=g) * 3
    target = torch.softmax(torch.randn(rows, k, generator=g) * 3, -1)
    ce = soft_cross_entropy(logits, target)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target))
    entropy = -(target * target.log()).sum(-1).mean()
    kl = soft_kl_divergence(logits, target)
    torch.testing.assert_close(kl, ce - entropy)
    torch.testing.assert_close(kl, F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean"))
    assert kl >= -1e-6
    torch.testing.assert_close(soft_kl_divergence(target.log(), target), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_token_accuracy_and_merge():
    target = torch.eye(4)[[0, 1, 2, 3]]
    logits = torch.eye(4)[[0, 1, 3, 3]]
    assert token_accuracy(logits, target) == 0.75
    target_probs = torch.softmax(torch.randn(2, 3, 4), -1)
    mask = torch.tensor([[True, False, False], [False, False, True]])
    pred = torch.eye(4)[:2]
    merged = merge_token_distributions(pred, target_probs, mask)
    assert torch.equal(merged[~mask], target_probs[~mask]) and torch.equal(merged[mask], pred)


def test_state_dict_names_are_the_released_ones():
    model = ViTForMIM(vit_config("B"))
    state = model.state_dict()
    assert model.mask_layer_ids == tuple(range(12))
    assert state["mask_token"].shape == (1, 1, 768)
    assert state["mim_head.0.weight"].shape == (768, 768)
    assert state["mim_head.2.weight"].shape == (1024, 768) and state["mim_head.2.bias"].shape == (1024,)
    vit_keys = set(UniversalViT(vit_config("T", mask_token=True)).state_dict())
    tiny_keys = set(_model().state_dict())
    assert tiny_keys - vit_keys == {f"mim_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert default_mask_layer_ids(24) == tuple(range(18, 24))


def test_mask_layer_ids_must_be_the_last_blocks():
    with pytest.raises(ValueError):
        ViTForMIM(TINY, mask_layer_ids=(0, 1))


@pytest.mark.parametrize("mask_layer_ids", [None, (2, 3), ()])
def test_unmasked_forward_equals_the_plain_vit(mask_layer_ids):
    model = _model(mask_layer_ids)
    x = _image()
    grid = model.token_grid(x.shape[2:], 0)
    mask = torch.zeros(2, grid[0] * grid[1] * grid[2], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_masked(x, 0, mask), UniversalViT.forward(model, x, 0))


def _reference_encode(model: ViTForMIM, x: torch.Tensor, aniso_d: int, mask: torch.Tensor) -> torch.Tensor:
    """One sample at a time: visible-only blocks on [CLS, visible], then [CLS, tokens with mask tokens] blocks."""
    tokens, grid = model.embed_patches(x, aniso_d)
    cos, sin = model.rope_tables(grid, tokens)
    out = []
    for b in range(x.shape[0]):
        keep = ~mask[b]
        h = torch.cat([model.cls_token[0], tokens[b, keep]])[None]
        for i in range(model.first_mask_layer):
            h = model.blocks[i](h, (cos[keep], sin[keep]))
        full = model.mask_token[0].expand(tokens.shape[1], -1).clone()
        full[keep] = h[0, 1:]
        h = torch.cat([h[:, :1], full[None]], dim=1)
        for i in range(model.first_mask_layer, len(model.blocks)):
            h = model.blocks[i](h, (cos, sin))
        out.append(model.norm(h))
    return torch.cat(out)


@pytest.mark.parametrize("mask_layer_ids,aniso_d,shape", [(None, 0, (32, 32, 32)), ((2, 3), 1, (16, 32, 48)),
                                                          ((), 5, (1, 32, 32))])
def test_masked_forward_matches_per_sample_reference(mask_layer_ids, aniso_d, shape):
    model = _model(mask_layer_ids)
    x = _image(3, shape)
    n = torch.Size(model.token_grid(shape, aniso_d)).numel()
    mask = random_token_mask(3, n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.encode_masked(x, aniso_d, mask)
        torch.testing.assert_close(got, _reference_encode(model, x, aniso_d, mask), atol=1e-5, rtol=1e-5)
        logits = model(x, aniso_d, mask)
    assert logits.shape == (int(mask.sum()), 32)
    torch.testing.assert_close(logits, model.mim_head(got[:, 1:][mask]))


def test_gradients_reach_every_vit_parameter_and_the_head():
    model = _model((2, 3)).train()
    x = _image(2)
    mask = random_token_mask(2, 8, generator=torch.Generator().manual_seed(0))
    logits = model(x, 0, mask)
    target = torch.softmax(torch.randn(2, 8, 32), -1)
    out = model.objective(logits, target, mask)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert not out.kl.requires_grad and 0 <= out.accuracy <= 1
