"""Spatially adaptive convolution (SAC).

A 3D conv whose depth kernel and depth stride adapt to the degree of anisotropy (``aniso_d``). While a feature
map still has ``p = max(aniso_d - level, 0)`` pending in-plane downsamplings (``level`` = in-plane halvings
already applied), one depth voxel stands for ``2**p`` thin slices. Summing groups of ``2**p`` depth taps of the
kernel (sum pooling) and shrinking the depth stride by ``2**p`` makes the conv on the thick voxel equal to the
full conv on its replicated thin slices, so one set of 3D weights serves 2D images (aniso_d 5) and volumes of
any spacing. Only the depth axis ever adapts; the in-plane stride is always the module's stride.

Unlike the original code we carry no tensor subclass: callers pass ``aniso_d`` and ``level`` explicitly
(gradient checkpointing and ``torch.compile`` keep working), and :class:`SpatialSequential` threads them through
a stack of layers.

Frozen use (the tokenizer inside MIM, evaluation, prediction) would sum the same depth taps on every call; there
the reduced, dtype-cast kernels are cached per module (:class:`~pumit_nnunet.layers.frozen_cache.FrozenCache`) and recomputed only when the
weights change. Under autograd nothing is cached, so training always differentiates through the reduction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pumit_nnunet.layers.frozen_cache import FrozenCache

__all__ = [
    "reduce_depth_kernel",
    "patch_conv3d",
    "adaptive_down_params",
    "adaptive_up_params",
    "SpatialModule",
    "SpatiallyAdaptiveConv3d",
    "SpatiallyAdaptiveConvTranspose3d",
    "SpatialSequential",
]


def _log2_exact(value: int, what: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{what} must be a power of two, got {value}")
    return value.bit_length() - 1


def reduce_depth_kernel(weight: Tensor, group: int) -> Tensor:
    """Sum consecutive groups of ``group`` depth taps: ``(o, i, Kd, kh, kw) -> (o, i, Kd // group, kh, kw)``.

    ``group == Kd`` collapses the kernel to a single depth tap; ``group == 1`` returns the weight unchanged.
    """
    kd = weight.shape[2]
    if group < 1 or kd % group:
        raise ValueError(f"cannot sum-pool {kd} depth taps in groups of {group}")
    if group == 1:
        return weight
    return weight.unflatten(2, (kd // group, group)).sum(dim=3)


def patch_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv3d(x, weight, bias, stride=kernel)`` with no padding, as one matrix product over the patches.

    A conv whose stride equals its kernel sees each voxel once, so it is a GEMM of the flattened patches: this runs
    at matmul speed where a 16^3-kernel conv (the ViT's patch embedding, about 10% of a MIM step on the CPU) does
    not. Trailing voxels that fill no whole patch are dropped, as the conv drops them.
    """
    out_channels, _, kd, kh, kw = weight.shape
    b, c = x.shape[:2]
    d, h, w = x.shape[2] // kd, x.shape[3] // kh, x.shape[4] // kw
    x = x[:, :, :d * kd, :h * kh, :w * kw]
    patches = x.reshape(b, c, d, kd, h, kh, w, kw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d, h, w, -1)
    return F.linear(patches, weight.reshape(out_channels, -1), bias).permute(0, 4, 1, 2, 3)


def adaptive_down_params(kernel_depth: int, stride: int, pending: int) -> tuple[int, int]:
    """Depth stride and tap-group size of an adaptive conv with ``pending`` in-plane downsamplings left.

    Returns ``(depth_stride, group)``: the kernel's depth taps are summed in groups of ``group``.
    """
    if pending <= 0:
        return stride, 1
    depth_stride = max(stride >> pending, 1)
    if depth_stride == 1:
        if kernel_depth not in (stride, 3, 1):
            raise ValueError(f"a depth kernel of {kernel_depth} cannot collapse (stride {stride}); use k == s or k == 3")
        return 1, kernel_depth
    if kernel_depth != stride:
        raise ValueError(f"partial depth reduction needs kernel == stride, got kernel {kernel_depth}, stride {stride}")
    return depth_stride, stride // depth_stride


def adaptive_up_params(stride_depth: int, remaining_depth_upsamples: int) -> tuple[int, int]:
    """Depth stride and tap-group size of an adaptive transposed conv (kernel == stride).

    ``remaining_depth_upsamples = max(level - aniso_d, 0)``: depth may be upsampled only as often as it was
    downsampled.
    """
    depth_stride = min(2 ** max(remaining_depth_upsamples, 0), stride_depth)
    return depth_stride, stride_depth // depth_stride


def _cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class SpatialModule(nn.Module):
    """A module whose forward takes ``(x, aniso_d, level)`` and changes ``level`` by ``level_change``."""

    level_change: int = 0

    def forward(self, x: Tensor, aniso_d: int, level: int = 0) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected an int or 3 values, got {value}")
    return value  # type: ignore[return-value]


class SpatiallyAdaptiveConv3d(SpatialModule):
    """Adaptive ``Conv3d`` with isotropic power-of-two stride: the down (k = s = 2^k), 3x3 (k3 s1) and k3 s2 variants.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size; the depth extent must equal the stride or be 3 (or 1) to be reducible.
        stride: isotropic stride ``2**k``; in-plane it always applies, in depth it shrinks while voxels are thick.
        padding: zero padding (depth padding is dropped whenever the kernel is reduced).
        bias: add a bias (unchanged by the reduction).
        as_matmul: run as :func:`patch_conv3d` whenever the (reduced) kernel equals the stride and there is no
            padding (the ViT's patch embedding); the same function, faster for large kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int = 1,
        padding: int | Sequence[int] = 0,
        bias: bool = True,
        as_matmul: bool = False,
    ) -> None:
        super().__init__()
        self.as_matmul = as_matmul
        self.kernel_size = _triple(kernel_size)
        self.stride = int(stride)
        self.level_change = _log2_exact(self.stride, "SAC stride")
        self.padding = _triple(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.kernel_cache = FrozenCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the same initialisation as torch.nn.Conv3d
        conv = nn.Conv3d(self.weight.shape[1], self.weight.shape[0], self.kernel_size, bias=self.bias is not None)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if self.bias is not None:
                self.bias.copy_(conv.bias)

    def effective_weight(self, aniso_d: int, level: int = 0) -> tuple[Tensor, tuple[int, int, int], tuple[int, int, int]]:
        """The (possibly reduced) kernel, stride and padding used at ``aniso_d``/``level``."""
        pending = max(aniso_d - level, 0)
        depth_stride, group = adaptive_down_params(self.kernel_size[0], self.stride, pending)
        if pending == 0:
            return self.weight, (self.stride,) * 3, self.padding
        weight = reduce_depth_kernel(self.weight, group)
        return weight, (depth_stride, self.stride, self.stride), (0, self.padding[1], self.padding[2])

    def forward(self, x: Tensor, aniso_d: int, level: int = 0) -> Tensor:
        key = FrozenCache.key(self.weight, self.bias, x.dtype, aniso_d, level)
        weight, bias, stride, padding = self.kernel_cache.get(key, lambda: self._cast_kernel(aniso_d, level, x.dtype))
        if self.as_matmul and tuple(stride) == tuple(weight.shape[2:]) and not any(padding):
            return patch_conv3d(x, weight, bias)
        return F.conv3d(x, weight, bias, stride, padding)

    def _cast_kernel(self, aniso_d: int, level: int, dtype: torch.dtype) -> tuple:
        weight, stride, padding = self.effective_weight(aniso_d, level)
        return _cast(weight, dtype), _cast(self.bias, dtype), stride, padding

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class SpatiallyAdaptiveConvTranspose3d(SpatialModule):
    """Adaptive transposed conv (the "up" variant), kernel == stride, in-plane stride ``2**u``.

    The depth stride is ``min(2**r, S_d)`` with ``r = max(level - aniso_d, 0)``; depth taps are summed in groups
    when the depth cannot be upsampled as much as the kernel would.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int | Sequence[int], bias: bool = True) -> None:
        super().__init__()
        self.stride = _triple(stride)
        if self.stride[1] != self.stride[2]:
            raise ValueError(f"in-plane strides must be equal, got {self.stride}")
        _log2_exact(self.stride[0], "depth stride")
        self.level_change = -_log2_exact(self.stride[1], "in-plane stride")
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels, *self.stride))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.kernel_cache = FrozenCache()
        conv = nn.ConvTranspose3d(in_channels, out_channels, self.stride, self.stride, bias=bias)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if bias:
                self.bias.copy_(conv.bias)

    def effective_weight(self, aniso_d: int, level: int) -> tuple[Tensor, tuple[int, int, int]]:
        depth_stride, group = adaptive_up_params(self.stride[0], level - aniso_d)
        return reduce_depth_kernel(self.weight, group), (depth_stride, self.stride[1], self.stride[2])

    def forward(self, x: Tensor, aniso_d: int, level: int = 0) -> Tensor:
        key = FrozenCache.key(self.weight, self.bias, x.dtype, aniso_d, level)
        weight, bias, stride = self.kernel_cache.get(key, lambda: self._cast_kernel(aniso_d, level, x.dtype))
        return F.conv_transpose3d(x, weight, bias, stride)

    def _cast_kernel(self, aniso_d: int, level: int, dtype: torch.dtype) -> tuple:
        weight, stride = self.effective_weight(aniso_d, level)
        return _cast(weight, dtype), _cast(self.bias, dtype), stride

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, stride={self.stride}"


class SpatialSequential(nn.Sequential, SpatialModule):
    """``nn.Sequential`` that passes ``(aniso_d, level)`` to :class:`SpatialModule` children and tracks ``level``."""

    @property
    def level_change(self) -> int:
        return sum(getattr(m, "level_change", 0) for m in self if isinstance(m, SpatialModule))

    def forward(self, x: Tensor, aniso_d: int, level: int = 0) -> Tensor:  # type: ignore[override]
        for module in self:
            if isinstance(module, SpatialModule):
                x = module(x, aniso_d, level)
                level += module.level_change
            else:
                x = module(x)
        return x
