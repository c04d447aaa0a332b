"""Memory model of a PUMIT segmentation training step (pure functions).

nnU-Net's planners estimate memory from the U-Net's conv feature maps (``compute_conv_feature_map_size``); a
ViT has none, so PUMIT has its own model of one AdamW training step. It predicts what
:mod:`pumit_nnunet.nnunet.memory_count` counts (and the benchmarks report):

``training memory = saved-for-backward bytes + parameter + gradient + AdamW-state bytes``

* **Saved for backward** is counted tensor by tensor from the network's code, as *elements per token* (ViT
  blocks) and *elements per voxel* of each pyramid level (neck, decoder), times the bytes of their precision
  (:class:`Precision`). Attention runs on ``scaled_dot_product_attention``, which keeps no ``tokens^2`` score
  matrix for backward, so there is no quadratic term. Activation checkpointing (``backbone``: the ViT blocks;
  ``all``: also the neck and decoder) keeps only each checkpointed segment's inputs.
* **Training state**: 16 bytes per parameter (fp32 weight, gradient, two AdamW moments) and AdamW's 4-byte step
  counter per parameter tensor.

The counts are validated against measurement for the T, S and B presets (tests/test_memory_model.py, CPU,
fp32, within 15 %). For a GPU budget, :func:`peak_memory_bytes` adds what a real step needs on top (CUDA
context and workspaces, backward's transient gradient buffers, allocator slack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pumit_nnunet.anisotropy import MAX_ANISO_D, token_depth
from pumit_nnunet.models.seg_blocks import TOKEN_LEVEL, depth_factor

__all__ = [
    "Precision", "FP32", "BF16_AUTOCAST", "GpuOverhead", "NetworkShape", "token_grid", "level_voxels",
    "vit_saved_bytes", "decoder_saved_bytes", "loss_saved_bytes", "saved_bytes", "parameter_count", "state_bytes",
    "training_memory_bytes", "peak_memory_bytes", "max_batch_size", "GIB",
]

GIB = 1024 ** 3
#: pyramid levels of the decoder: 0 (full resolution) to 5 (in-plane 1/32)
_LEVELS = 6
#: heads whose outputs nnU-Net's deep-supervision loss uses (the lowest-resolution one is weighted 0)
_LOSS_LEVELS = 3


@dataclass(frozen=True)
class Precision:
    """Bytes of the tensors autograd keeps, by role.

    Attributes:
        activation: element size of conv/linear/attention activations (fp32: 4; bf16 autocast: 2).
        norm_input: element size of a LayerNorm's saved input (autocast runs LayerNorm in fp32: 4 either way).
        separate_linear_casts: autocast casts a shared fp32 input once per linear layer (q, k and v; w1 and w2),
            so each keeps its own copy; in fp32 they share one tensor.
    """

    activation: float = 4.0
    norm_input: float = 4.0
    separate_linear_casts: bool = False


FP32 = Precision()
#: what the trainers run on CUDA; the same element counts as FP32 (validated on CPU), at bf16's element size
BF16_AUTOCAST = Precision(activation=2.0, norm_input=4.0, separate_linear_casts=True)


@dataclass(frozen=True)
class GpuOverhead:
    """What a CUDA training step needs beyond the counted memory (planning only).

    Attributes:
        activation_factor: multiplies saved-for-backward bytes: backward's transient gradient buffers and the
            caching allocator's fragmentation.
        fixed: CUDA context, cuDNN/cuBLAS workspaces and the data loader's pinned batches.
    """

    activation_factor: float = 1.2
    fixed: float = 1.0 * GIB


@dataclass(frozen=True)
class NetworkShape:
    """What the memory model needs to know about a :class:`~pumit_nnunet.models.segmentation.PumitSegNet`.

    ``parameters_without_pos_embed`` excludes the position embedding, whose size follows the token grid
    (:func:`parameter_count` adds it back for a given patch). ``channels`` are the decoder's widths at pyramid
    levels 0-5 (:attr:`~pumit_nnunet.models.seg_blocks.DecoderConfig.channels`).
    """

    embed_dim: int
    depth: int
    mlp_hidden_dim: int
    in_channels: int
    num_classes: int
    parameters_without_pos_embed: int
    channels: tuple[int, ...] = (32, 64, 128, 256, 512, 512)
    activation_checkpointing: str = "none"
    parameter_tensors: int = 0
    deep_supervision: bool = True


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


def _block_bytes_per_token(net: NetworkShape, precision: Precision) -> float:
    """One EVA block without checkpointing (elements per token, see EvaBlock, EvaAttention, SwiGLU)."""
    e, h = net.embed_dim, net.mlp_hidden_dim
    norm_inputs = 2 * e + h  # norm1, norm2 and ffn_ln keep their inputs
    # linear inputs: q/k/v (one shared tensor), proj (a copy: the attention output is transposed), w1/w2, w3
    linear_inputs = 3 * e + h + (3 * e if precision.separate_linear_casts else 0)
    attention = 4 * e  # SDPA keeps the rotated q and k, v and its output
    swiglu = 3 * h  # silu's input and output, w2's output (the product's other factor)
    return norm_inputs * precision.norm_input + (linear_inputs + attention + swiglu) * precision.activation


def vit_saved_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape, precision: Precision = FP32) -> float:
    """Bytes one sample's ViT keeps for backward: linear in tokens x blocks (no ``tokens^2`` term with SDPA).

    With checkpointing a block keeps only its input (the residual stream)."""
    tokens = math.prod(token_grid(patch_size, aniso_d)) + 1  # + CLS
    if net.activation_checkpointing == "none":
        per_block = _block_bytes_per_token(net, precision)
    else:
        per_block = net.embed_dim * precision.activation
    return float(tokens * net.depth * per_block)


def _level_elements(net: NetworkShape) -> tuple[list[float], float]:
    """Elements per voxel kept at each pyramid level by the neck and decoder (one sample), and the bytes per
    level-5 voxel of the max-pool's int64 indices."""
    e, c = net.embed_dim, net.channels
    if net.activation_checkpointing == "all":
        # only each segment's inputs: the image, the skips, every stage's output, the neck's inputs and outputs
        return [2 * c[0], 2 * c[1], e + 2 * c[2], e + 2 * c[3], 5 * e + 2 * c[4], e + c[5]], 0.0
    # a conv + InstanceNorm + in-place LeakyReLU keeps the conv output and the norm output (2 per channel);
    # an up stage keeps the concatenation and two such blocks (6 per channel)
    per = [4 * c[0] + 6 * c[0], 4 * c[1] + 6 * c[1]]  # full-resolution branch (two blocks per level) + up stage
    per += [2 * c[level] + 6 * c[level] for level in range(2, 5)]  # lateral + up stage
    per.append(2 * c[5])  # the deepest lateral (no up stage starts there)
    per[2] += e  # the neck's level-2 output, kept by its lateral
    per[3] += 3 * e + e  # level-2 branch: transposed conv, norm and GELU outputs; the level-3 output
    per[TOKEN_LEVEL] += 4 * e + 4 * e  # four token maps (norm inputs) and their normed outputs
    return per, 8.0 * e


def decoder_saved_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape, precision: Precision = FP32) -> float:
    """Bytes one sample's neck and decoder keep for backward (and the input image, kept by the first conv)."""
    per_level, index_bytes = _level_elements(net)
    voxels = [level_voxels(patch_size, aniso_d, level) for level in range(_LEVELS)]
    total = sum(p * v for p, v in zip(per_level, voxels)) * precision.activation
    return float(total + index_bytes * voxels[5] + 4.0 * net.in_channels * voxels[0])  # the fp32 input batch


def loss_saved_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> float:
    """Bytes nnU-Net's Dice + CE keeps per sample (fp32 under autocast too): log-softmax and softmax outputs,
    the one-hot target (4 bytes per class each) and the int64 label map, at each head the loss uses."""
    levels = _LOSS_LEVELS if net.deep_supervision else 1
    per_voxel = 12.0 * net.num_classes + 8.0
    return float(sum(per_voxel * level_voxels(patch_size, aniso_d, level) for level in range(levels)))


def saved_bytes(patch_size: Sequence[int], batch_size: int, aniso_d: int, net: NetworkShape,
                precision: Precision = FP32) -> float:
    """Bytes autograd keeps for backward in one forward + loss of a batch."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    per_sample = (vit_saved_bytes(patch_size, aniso_d, net, precision)
                  + decoder_saved_bytes(patch_size, aniso_d, net, precision) + loss_saved_bytes(patch_size, aniso_d, net))
    return batch_size * per_sample


def parameter_count(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> int:
    """Parameters of the network for this patch (the position embedding has one vector per token)."""
    return net.parameters_without_pos_embed + net.embed_dim * math.prod(token_grid(patch_size, aniso_d))


def state_bytes(patch_size: Sequence[int], aniso_d: int, net: NetworkShape) -> float:
    """fp32 parameters, gradients, AdamW's two moments (16 bytes per parameter) and its step counters."""
    return 16.0 * parameter_count(patch_size, aniso_d, net) + 4.0 * net.parameter_tensors


def training_memory_bytes(patch_size: Sequence[int], batch_size: int, aniso_d: int, net: NetworkShape,
                          precision: Precision = FP32) -> float:
    """Saved-for-backward + training-state bytes (what :mod:`memory_count` measures); monotone in every patch
    axis and the batch size."""
    return saved_bytes(patch_size, batch_size, aniso_d, net, precision) + state_bytes(patch_size, aniso_d, net)


def peak_memory_bytes(patch_size: Sequence[int], batch_size: int, aniso_d: int, net: NetworkShape,
                      precision: Precision = BF16_AUTOCAST, overhead: GpuOverhead = GpuOverhead()) -> float:
    """Estimated peak CUDA memory of one training step (what the planners compare with the budget)."""
    saved = saved_bytes(patch_size, batch_size, aniso_d, net, precision)
    return overhead.fixed + state_bytes(patch_size, aniso_d, net) + overhead.activation_factor * saved


def max_batch_size(patch_size: Sequence[int], aniso_d: int, net: NetworkShape, budget_bytes: float) -> int:
    """Largest batch size whose peak estimate fits ``budget_bytes`` (0 when not even one sample fits)."""
    one = peak_memory_bytes(patch_size, 1, aniso_d, net)
    per_sample = peak_memory_bytes(patch_size, 2, aniso_d, net) - one
    if one > budget_bytes:
        return 0
    return 1 + int((budget_bytes - one) // per_sample)
