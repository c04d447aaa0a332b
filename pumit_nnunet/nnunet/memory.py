"""Token-based GPU memory model of a PUMIT segmentation training step (pure functions).

nnU-Net's planners estimate memory from the U-Net's conv feature maps
(``compute_conv_feature_map_size``); a ViT has none, so PUMIT plans with its own model of one AdamW training
step under bf16 autocast:

``bytes = FIXED + PARAMETER_BYTES * parameters + OVERHEAD * batch * (ViT activations + decoder activations)``

* **ViT activations** grow with ``tokens x blocks x width``. Attention runs on
  ``scaled_dot_product_attention`` (flash / memory-efficient kernels), which keeps no ``tokens^2`` score matrix
  for backward, so there is no quadratic term.
* **Decoder activations** are conv feature maps: the neck's four ``embed_dim`` maps, the laterals, the U-Net up
  path, the full-resolution branch and the deep-supervision heads, each at its pyramid level's voxel count.
* **Parameters** carry fp32 weights, gradients and AdamW's two moments.

The byte constants below are derived by counting which tensors autograd keeps for backward (see the comments);
they are estimates of the same kind as nnU-Net's reference values, not measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from pumit_nnunet.anisotropy import MAX_ANISO_D, token_depth
from pumit_nnunet.models.seg_blocks import TOKEN_LEVEL, depth_factor

__all__ = [
    "MemoryConstants", "NetworkShape", "token_grid", "level_voxels", "vit_activation_bytes",
    "decoder_activation_bytes", "parameter_count", "training_memory_bytes", "max_batch_size", "GIB",
]

GIB = 1024 ** 3
#: pyramid levels of the decoder: 0 (full resolution) to 5 (in-plane 1/32)
_LEVELS = 6


@dataclass(frozen=True)
class MemoryConstants:
    """Bytes kept for backward, per element of the named tensors (bf16 autocast on CUDA).

    Attributes:
        vit_per_token_width: per token, block and unit of ``embed_dim``. Counted per block: the fp32 residual
            stream saved by ``norm1`` and ``norm2`` (4 + 4), three bf16 casts of the normed input saved by the
            separate q/k/v projections (3 x 2), q, k, v and the output saved by SDPA (4 x 2), the flattened
            attention output saved by ``proj`` (2), two bf16 casts saved by ``w1``/``w2`` (2 x 2): 28.
        vit_per_token_hidden: per token, block and unit of the SwiGLU hidden width: ``w1`` output (2), ``silu``
            output (2), ``w2`` output (2), the fp32 product saved by ``ffn_ln`` (4), its bf16 cast saved by ``w3``
            (2): 12.
        conv_in: per voxel and input channel of a conv (its saved bf16 input cast).
        conv_out: per voxel and output channel of conv + InstanceNorm + in-place LeakyReLU (norm runs in fp32:
            saved input cast and output, 4 + 4).
        head_per_class: per voxel and class of a deep-supervision head (bf16 logits, fp32 softmax and
            log-softmax, one-hot target).
        parameter: per parameter: fp32 weight, gradient and AdamW's two moments (4 x 4).
        overhead: multiplies activations: allocator fragmentation and backward's transient gradient buffers.
        fixed: CUDA context, cuDNN/cuBLAS workspaces and the data loader's pinned batches.
    """

    vit_per_token_width: float = 28.0
    vit_per_token_hidden: float = 12.0
    conv_in: float = 2.0
    conv_out: float = 8.0
    head_per_class: float = 16.0
    parameter: float = 16.0
    overhead: float = 1.2
    fixed: float = 1.0 * GIB


@dataclass(frozen=True)
class NetworkShape:
    """What the memory model needs to know about a :class:`~pumit_nnunet.models.segmentation.PumitSegNet`.

    ``parameters_without_pos_embed`` excludes the position embedding, whose size follows the token grid
    (:func:`parameter_count` adds it back for a given patch).
    """

    embed_dim: int
    depth: int
    mlp_hidden_dim: int
    in_channels: int
    num_classes: int
    parameters_without_pos_embed: int
    lateral_channels: tuple[int, ...] = (128, 256, 512, 512)
    fullres_channels: tuple[int, ...] = (32, 64)
    constants: MemoryConstants = field(default_factory=MemoryConstants)


def _spatial(patch_size: Sequence[int], aniso_d: int) -> tuple[list[int], int]:
    """A 2D patch is a single-slice volume at ``aniso_d = MAX_ANISO_D`` (as PumitSegNet runs it)."""
    if len(patch_size) == 2:
        return [1, *patch_size], MAX_ANISO_D
    if len(patch_size) != 3:
        raise ValueError(f"patch size must have 2 or 3 axes, got {list(patch_size)}")
    return list(patch_size), aniso_d


def token_grid(patch_size: Sequence[int], aniso_d: int) -> tuple[int, int, int]:
    """(depth, h, w) tokens of a patch: tokens are ``(16 >> aniso_d) x 16 x 16`` voxels (at least one)."""
    spatial, aniso_d = _spatial(patch_size, aniso_d)
    return (max(spatial[0] // token_depth(16, aniso_d), 1), max(spatial[1] // 16, 1), max(spatial[2] // 16, 1))


def level_voxels(patch_size: Sequence[int], aniso_d: int, level: int) -> int:
    """Voxels of a feature map at pyramid ``level`` (in-plane ``/ 2**level``, depth ``/ depth_factor``)."""
    spatial, aniso_d = _spatial(patch_size, aniso_d)
    d = max(spatial[0] // depth_factor(level, aniso_d), 1)
    return d * max(spatial[1] >> level, 1) * max(spatial[2] >> level, 1)


def vit_activation_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> float:
    """Bytes one sample's ViT keeps for backward: linear in tokens x blocks (no ``tokens^2`` term with SDPA)."""
    c = net.constants
    tokens = math.prod(token_grid(patch_size, aniso_d)) + 1  # + CLS
    per_token_block = c.vit_per_token_width * net.embed_dim + c.vit_per_token_hidden * net.mlp_hidden_dim
    return float(tokens * net.depth * per_token_block)


def _decoder_bytes_per_voxel(net: NetworkShape) -> list[float]:
    """Bytes per voxel of each pyramid level for one sample (see UNetDecoder and ViTNeck)."""
    c = net.constants
    ch = [*net.fullres_channels, *net.lateral_channels]  # channels at levels 0..5
    e, per = net.embed_dim, [0.0] * _LEVELS

    def conv(in_level: int, out_level: int, cin: int, cout: int) -> None:
        per[in_level] += c.conv_in * cin
        per[out_level] += c.conv_out * cout

    per[0] += 4.0 * net.in_channels  # the fp32 input batch
    # full-resolution branch: two convs at level 0, a strided one into level 1, one at level 1
    for args in ((0, 0, net.in_channels, ch[0]), (0, 0, ch[0], ch[0]), (0, 1, ch[0], ch[1]), (1, 1, ch[1], ch[1])):
        conv(*args)
    # neck: four InstanceNorms at the token level, transposed convs up to levels 3 and 2, a max-pool to level 5
    per[TOKEN_LEVEL] += 4 * c.conv_out * e
    per[TOKEN_LEVEL] += 2 * c.conv_in * e + 4.0 * e  # two transposed-conv inputs, the max-pool's fp32 input
    per[3] += 2 * c.conv_in * e + c.conv_out * e + 4.0 * e + c.conv_in * e  # outputs, IN, GELU input, 2nd input
    per[2] += c.conv_in * e
    per[5] += 8.0 * e  # max-pool indices
    for level in range(2, _LEVELS):  # 1x1 laterals
        conv(level, level, e, ch[level])
    for level in range(_LEVELS - 2, -1, -1):  # up path: transposed conv, concat, two convs
        per[level + 1] += c.conv_in * ch[level + 1]
        per[level] += c.conv_in * ch[level]
        conv(level, level, 2 * ch[level], ch[level])
        conv(level, level, ch[level], ch[level])
    for level in range(4):  # deep-supervision heads
        per[level] += c.conv_in * ch[level] + c.head_per_class * net.num_classes
    return per


def decoder_activation_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> float:
    """Bytes one sample's neck and decoder keep for backward: conv feature maps at every pyramid level."""
    per_voxel = _decoder_bytes_per_voxel(net)
    return float(sum(per_voxel[level] * level_voxels(patch_size, aniso_d, level) for level in range(_LEVELS)))


def parameter_count(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> int:
    """Parameters of the network for this patch (the position embedding has one vector per token)."""
    return net.parameters_without_pos_embed + net.embed_dim * math.prod(token_grid(patch_size, aniso_d))


def training_memory_bytes(patch_size: Sequence[int], batch_size: int, aniso_d: int, net: NetworkShape) -> float:
    """Estimated peak GPU memory (bytes) of one training step; monotone in every patch axis and the batch size."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    c = net.constants
    per_sample = vit_activation_bytes(patch_size, aniso_d, net) + decoder_activation_bytes(patch_size, aniso_d, net)
    return c.fixed + c.parameter * parameter_count(patch_size, aniso_d, net) + c.overhead * batch_size * per_sample


def max_batch_size(patch_size: Sequence[int], aniso_d: int, net: NetworkShape, budget_bytes: float) -> int:
    """Largest batch size whose estimate fits ``budget_bytes`` (0 when not even one sample fits)."""
    one = training_memory_bytes(patch_size, 1, aniso_d, net)
    per_sample = training_memory_bytes(patch_size, 2, aniso_d, net) - one
    if one > budget_bytes:
        return 0
    return 1 + int((budget_bytes - one) // per_sample)
