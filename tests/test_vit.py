"""Universal ViT: sizes, released parameter names, adaptive patch embedding, intermediate outputs."""

from __future__ import annotations

import pytest
import torch

from pumit_nnunet.layers.sac import reduce_depth_kernel
from pumit_nnunet.models.vit import UniversalViT, ViTConfig, vit_config


def test_vit_b_matches_the_released_size_and_names() -> None:
    vit = UniversalViT(vit_config("B", mask_token=True))
    n_params = sum(p.numel() for p in vit.parameters())
    assert abs(n_params - 94.93e6 - 768) < 0.01e6  # reference: ~94.9 M (+ the mask token)
    shapes = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    expected = {
        "cls_token": (1, 1, 768), "mask_token": (1, 1, 768), "pos_embed": (1, 768, 5, 10, 10),
        "patch_embed.proj.weight": (768, 3, 16, 16, 16), "patch_embed.proj.bias": (768,),
        "norm.weight": (768,), "norm.bias": (768,),
    }
    for i in range(12):
        p = f"blocks.{i}."
        expected.update({
            p + "norm1.weight": (768,), p + "norm1.bias": (768,), p + "attn.q_bias": (768,), p + "attn.v_bias": (768,),
            p + "attn.q_proj.weight": (768, 768), p + "attn.k_proj.weight": (768, 768), p + "attn.v_proj.weight": (768, 768),
            p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,), p + "norm2.weight": (768,), p + "norm2.bias": (768,),
            p + "mlp.w1.weight": (2048, 768), p + "mlp.w1.bias": (2048,), p + "mlp.w2.weight": (2048, 768), p + "mlp.w2.bias": (2048,),
            p + "mlp.ffn_ln.weight": (2048,), p + "mlp.ffn_ln.bias": (2048,), p + "mlp.w3.weight": (768, 2048), p + "mlp.w3.bias": (768,),
        })
    assert shapes == expected


def test_vit_l_size() -> None:
    config = vit_config("L")
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_hidden_dim) == (1024, 24, 16, 2730)
    assert config.out_indices == (7, 11, 15, 23)


@pytest.mark.parametrize("aniso_d,shape", [(0, (32, 32, 32)), (2, (8, 32, 48)), (4, (2, 32, 32)), (5, (1, 32, 32))])
def test_forward_features_and_token_grid(aniso_d: int, shape) -> None:
    vit = UniversalViT(vit_config("T"))
    x = torch.randn(2, 3, *shape)
    features = vit.forward_features(x, aniso_d)
    grid = vit.token_grid(shape, aniso_d)
    assert len(features) == 4
    assert all(f.shape == (2, 1 + grid[0] * grid[1] * grid[2], 128) for f in features)
    torch.testing.assert_close(vit(x, aniso_d), vit.norm(features[-1]))


def test_adaptive_patch_embed_equals_fixed_kernel_at_that_anisotropy() -> None:
    torch.manual_seed(0)
    adaptive = UniversalViT(vit_config("T")).eval()
    fixed = UniversalViT(vit_config("T", patch_depth=4)).eval()
    state = adaptive.state_dict()
    state["patch_embed.proj.weight"] = reduce_depth_kernel(state["patch_embed.proj.weight"], 4)
    fixed.load_state_dict(state)
    x = torch.randn(1, 3, 8, 32, 32)
    torch.testing.assert_close(adaptive(x, 2), fixed(x, 2), rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    vit = UniversalViT(vit_config("T"))
    x = torch.randn(1, 3, 4, 32, 32)
    vit(x, 2).sum().backward()
    reference = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.set_grad_checkpointing(True)
    vit(x, 2).sum().backward()
    for a, b in zip(reference, (p.grad for p in vit.parameters())):
        torch.testing.assert_close(a, b)


def test_bad_configs_and_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown ViT size"):
        vit_config("XXL")
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(embed_dim=96, num_heads=16)
    vit = UniversalViT(vit_config("T"))
    with pytest.raises(ValueError, match="not divisible into tokens"):
        vit(torch.randn(1, 3, 8, 30, 32), 2)


def test_config_round_trips_through_json_types() -> None:
    config = vit_config("S", patch_depth=2, pos_embed_shape=(3, 4, 5))
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="ViT config holds keys this version does not know: width"):
        ViTConfig.from_dict({"width": 3})
