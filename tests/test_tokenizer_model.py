"""The tokenizer model: shapes and strides over every degree of anisotropy, gradients, soft tokens, discriminator."""

from __future__ import annotations

import pytest
import torch

from pumit_nnunet.anisotropy import MAX_ANISO_D
from pumit_nnunet.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from pumit_nnunet.models.tokenizer import (
    TOKENIZER_PRESETS,
    TokenizerConfig,
    UniversalTokenizer,
    tokenizer_config,
    tokenizer_input,
)

TINY = tokenizer_config("tiny")


@pytest.fixture(scope="module")
def tiny() -> UniversalTokenizer:
    torch.manual_seed(0)
    return UniversalTokenizer(TINY)


@pytest.mark.parametrize("aniso_d", range(MAX_ANISO_D + 1))
def test_shapes_and_strides(tiny, aniso_d):
    depth_stride = max(16 >> aniso_d, 1)
    x = torch.randn(2, 3, 2 * depth_stride, 32, 48)
    probs = tiny.encode(x, aniso_d)
    assert probs.shape == (2, TINY.num_embeddings, 2, 2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 2, 2, 3))
    assert tiny.decode(probs, aniso_d).shape == x.shape
    assert tiny.reconstruct(x, aniso_d).shape == x.shape


def test_2d_images_have_depth_one(tiny):
    x = torch.randn(1, 3, 1, 32, 32)
    assert tiny.encode(x, MAX_ANISO_D).shape[2:] == (1, 2, 2)
    assert tiny.reconstruct(x, MAX_ANISO_D).shape == x.shape
    assert tiny.token_grid((1, 64, 64), MAX_ANISO_D) == (1, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        tiny.encode(torch.randn(1, 3, 8, 32, 32), 0)


def test_decode_of_encode_is_reconstruct(tiny):
    x = torch.randn(1, 3, 8, 32, 32)
    out = tiny(x, 1)
    torch.testing.assert_close(tiny.decode(tiny.encode(x, 1), 1), out.reconstruction)
    torch.testing.assert_close(out.probs.movedim(-1, 1), tiny.encode(x, 1))
    torch.testing.assert_close(out.log_probs.exp(), out.probs)


def test_soft_tokens_are_the_convex_combination_of_the_codebook(tiny):
    z = torch.randn(2, TINY.down_channels[-1], 1, 2, 2)
    z_q, probs, _ = tiny.quantize(z)
    q = tiny.quantize
    expected = torch.einsum("bdhwk,ke->bedhw", (q.proj(z.movedim(1, -1))).softmax(-1), q.embedding.weight)
    torch.testing.assert_close(z_q, expected)
    assert probs.shape == (2, 1, 2, 2, TINY.num_embeddings)


def test_gradients_reach_every_parameter():
    torch.manual_seed(1)
    model, disc = UniversalTokenizer(TINY), PatchDiscriminator(DiscriminatorConfig(layer_channels=(16, 32, 64)))
    for aniso_d, depth in ((0, 16), (MAX_ANISO_D, 1)):
        model.zero_grad(), disc.zero_grad()
        out = model(torch.randn(1, 3, depth, 32, 32), aniso_d)
        (out.reconstruction.square().mean() + out.probs.mean() + disc(out.reconstruction, aniso_d).mean()).backward()
        for name, p in list(model.named_parameters()) + list(disc.named_parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, (aniso_d, name)


def test_state_dict_names_match_the_original():
    keys = set(UniversalTokenizer(TINY).state_dict())
    expected = {"encoder.0.weight", "encoder.1.1.weight", "encoder.3.weight", "encoder.4.1.bias", "encoder.6.bias",
                "encoder.7.1.weight", "encoder.9.weight", "encoder.10.weight", "encoder.12.weight", "encoder.13.bias",
                "quantize.proj.weight", "quantize.proj.bias", "quantize.embedding.weight", "decoder.0.weight",
                "decoder.1.weight", "decoder.3.weight", "decoder.4.weight", "decoder.6.transposed_conv.weight",
                "decoder.6.conv.0.weight", "decoder.6.conv.1.weight", "decoder.7.transposed_conv.weight",
                "decoder.8.weight", "decoder.8.bias"}
    assert expected <= keys


def test_paper_config_and_round_trip():
    base = TOKENIZER_PRESETS["base"]
    assert (base.num_embeddings, base.embedding_dim, base.down_channels, base.stride) == (1024, 512, (128, 256, 512), 16)
    assert TokenizerConfig.from_dict(base.to_dict()) == base
    assert tokenizer_config("tiny", num_embeddings=None).num_embeddings == 64
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_config("huge")


def test_tokenizer_input_maps_unit_range_to_rgb_pm1():
    grey = torch.rand(2, 1, 1, 4, 4)
    x = tokenizer_input(grey)
    assert x.shape == (2, 3, 1, 4, 4)
    torch.testing.assert_close(x[:, 1:2], grey * 2 - 1)
    with pytest.raises(ValueError, match="1 or 3"):
        tokenizer_input(torch.rand(1, 2, 1, 4, 4))


@pytest.mark.parametrize("aniso_d", [0, 3, MAX_ANISO_D])
def test_discriminator_patch_logits(aniso_d):
    disc = PatchDiscriminator(DiscriminatorConfig(layer_channels=(16, 32, 64)))
    depth = 1 if aniso_d == MAX_ANISO_D else 2 * max(16 >> aniso_d, 1)
    logits = disc(torch.randn(2, 3, depth, 32, 32), aniso_d)
    assert logits.shape[:2] == (2, 1) and logits.shape[3:] == (4, 4)
