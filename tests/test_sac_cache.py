"""The frozen-kernel cache of the SAC layers: cached outputs equal the uncached reduction, and weight changes
(optimizer steps, ``load_state_dict``, dtype/device moves) are never served from a stale entry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pumit_nnunet.layers.sac import SpatiallyAdaptiveConv3d, SpatiallyAdaptiveConvTranspose3d
from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config


def _reference_conv(module: SpatiallyAdaptiveConv3d, x: torch.Tensor, aniso_d: int, level: int) -> torch.Tensor:
    """The reduction recomputed from the current weights, outside the module's forward."""
    weight, stride, padding = module.effective_weight(aniso_d, level)
    return F.conv3d(x, weight.detach(), module.bias.detach(), stride, padding)


def _reference_up(module: SpatiallyAdaptiveConvTranspose3d, x: torch.Tensor, aniso_d: int, level: int) -> torch.Tensor:
    weight, stride = module.effective_weight(aniso_d, level)
    return F.conv_transpose3d(x, weight.detach(), module.bias.detach(), stride)


@pytest.mark.parametrize("aniso_d", [0, 2, 5])
def test_cached_conv_equals_recomputed_reduction(aniso_d: int) -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 4, 8, 8)
    with torch.no_grad():
        first = conv(x, aniso_d, 1)
        second = conv(x, aniso_d, 1)  # served from the cache
    assert len(conv.kernel_cache.entries) == 1
    torch.testing.assert_close(first, _reference_conv(conv, x, aniso_d, 1), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(conv(x, aniso_d, 1).detach(), first, rtol=0, atol=0)  # the autograd path


def test_no_cache_under_autograd_and_gradients_reach_the_full_kernel() -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(2, 4, 2, stride=2)
    conv(torch.randn(1, 2, 2, 8, 8), 3).sum().backward()
    assert conv.kernel_cache.entries == {}
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape


def test_optimizer_step_invalidates_the_cache() -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(3, 8, 4, stride=4)
    x = torch.randn(2, 3, 1, 16, 16)
    with torch.no_grad():
        before = conv(x, 5)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    conv(x, 5).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = conv(x, 5)
    torch.testing.assert_close(after, _reference_conv(conv, x, 5, 0), rtol=0, atol=0)
    assert not torch.allclose(after, before)
    assert len(conv.kernel_cache.entries) == 1  # the stale entry was dropped


def test_load_state_dict_invalidates_the_cache() -> None:
    torch.manual_seed(0)
    ours, other = SpatiallyAdaptiveConv3d(3, 8, 3, padding=1), SpatiallyAdaptiveConv3d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 2, 8, 8)
    with torch.no_grad():
        ours(x, 4)
        ours.load_state_dict(other.state_dict())
        torch.testing.assert_close(ours(x, 4), other(x, 4), rtol=0, atol=0)


def test_dtype_change_misses_the_cache() -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 2, 8, 8)
    with torch.no_grad():
        conv(x, 2)
        conv.double()
        out = conv(x.double(), 2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _reference_conv(conv, x.double(), 2, 0), rtol=0, atol=0)


@pytest.mark.parametrize("aniso_d, level", [(0, 3), (3, 1), (5, 2)])
def test_cached_transposed_conv_equals_recomputed_reduction(aniso_d: int, level: int) -> None:
    torch.manual_seed(0)
    up = SpatiallyAdaptiveConvTranspose3d(6, 3, 2)
    x = torch.randn(1, 6, 2, 4, 4)
    with torch.no_grad():
        up(x, aniso_d, level)
        cached = up(x, aniso_d, level)
        torch.testing.assert_close(cached, _reference_up(up, x, aniso_d, level), rtol=0, atol=0)
        up.weight.add_(1.0)  # an in-place change of the values
        torch.testing.assert_close(up(x, aniso_d, level), _reference_up(up, x, aniso_d, level), rtol=0, atol=0)


def test_frozen_tokenizer_with_grad_enabled_uses_the_cache_and_backpropagates_to_its_input() -> None:
    """The tokenizer inside MIM: frozen parameters, autograd on; inference-mode entries stay apart."""
    torch.manual_seed(0)
    tokenizer = UniversalTokenizer(tokenizer_config("tiny")).requires_grad_(False)
    x = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    with torch.inference_mode():
        expected = tokenizer.encode(x, 5)
    x.requires_grad_(True)
    probs = tokenizer.encode(x, 5)
    probs.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(probs.detach(), expected, rtol=1e-6, atol=1e-7)
    conv = next(m for m in tokenizer.modules() if isinstance(m, SpatiallyAdaptiveConv3d))
    assert len(conv.kernel_cache.entries) == 2  # one inference-mode entry, one ordinary entry


def test_module_built_under_inference_mode_is_not_cached_and_sees_in_place_changes() -> None:
    """Inference-tensor parameters have no version counter, so no entry could notice an in-place update."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 2, 8, 8)
    with torch.inference_mode():
        conv = SpatiallyAdaptiveConv3d(2, 4, 3, padding=1)
        first = conv(x, 2)
        conv.weight.add_(1.0)
        second = conv(x, 2)
        torch.testing.assert_close(second, _reference_conv(conv, x, 2, 0), rtol=0, atol=0)
    assert conv.kernel_cache.entries == {}
    assert not torch.allclose(first, second)


def test_compiled_forward_bypasses_the_cache() -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 2, 8, 8)
    compiled = torch.compile(conv, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, 2)
    assert conv.kernel_cache.entries == {}
    torch.testing.assert_close(out, _reference_conv(conv, x, 2, 0), rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [(16, 16, 16), (4, 16, 16), (1, 16, 16), (2, 2, 2)])
def test_patch_conv3d_equals_strided_conv_with_gradients(kernel) -> None:
    from pumit_nnunet.layers.sac import patch_conv3d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 33, 32, dtype=torch.float64, requires_grad=True)  # remainders are dropped
    weight = torch.randn(5, 3, *kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ours, ref = patch_conv3d(x, weight, bias), F.conv3d(x, weight, bias, kernel)
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours.square().sum(), (x, weight, bias))
    for got, expected in zip(grads, torch.autograd.grad(ref.square().sum(), (x, weight, bias))):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("aniso_d", [0, 2, 5])
def test_matmul_patch_embedding_equals_the_conv(aniso_d: int) -> None:
    torch.manual_seed(0)
    conv = SpatiallyAdaptiveConv3d(3, 8, 16, stride=16, as_matmul=True).double()
    x = torch.randn(1, 3, max(32 >> aniso_d, 1), 32, 32, dtype=torch.float64)
    torch.testing.assert_close(conv(x, aniso_d), _reference_conv(conv, x, aniso_d, 0))
