"""Pure conversions from a checkpoint's ViT state dict to any :class:`~pumit_nnunet.models.vit.ViTConfig`.

- names: timm's EVA renames undone (``fc1_g -> w1``, ``fc1_x -> w2``, ``norm -> ffn_ln``, ``fc2 -> w3``,
  ``q_proj.bias -> q_bias``, ``v_proj.bias -> v_bias``, ``fc_norm -> norm``; a fused ``qkv`` split);
- patch kernel: a 2D (EVA-02) kernel is resized bicubically to 16x16 and inflated along depth by averaging; a 3D
  kernel is fitted to the target depth by SAC sum-pooling of depth taps (16^3 -> (16 >> aniso_d, 16, 16));
- input channels: ``"sum"`` or ``"imagenet-fold"`` (see :func:`adapt_in_channels`);
- position embedding: EVA-02's 1D ``(1, 1 + N, C)`` becomes a ``(1, C, 1, h, w)`` grid with its CLS entry folded
  into ``cls_token``; the grid is resampled (area down, then trilinear) to the target ``pos_embed_shape``;
- heads (``mim_head``, ``lm_head``, ``head``) and RoPE buffers are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pumit_nnunet.layers.lpips import IMAGENET_MEAN, IMAGENET_STD
from pumit_nnunet.layers.pos_embed import resample_pos_embed
from pumit_nnunet.layers.sac import reduce_depth_kernel

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CHANNEL_MODES",
    "ConversionResult",
    "rename_timm_eva",
    "resize_kernel_2d",
    "inflate_kernel_depth",
    "fit_kernel_depth",
    "sum_share_channels",
    "fold_input_normalisation",
    "adapt_in_channels",
    "split_eva_pos_embed",
    "convert_vit_state_dict",
]

CHANNEL_MODES = ("sum", "imagenet-fold")
HEAD_PREFIXES = ("mim_head.", "lm_head.", "head.", "rope.")
PATCH_W, PATCH_B = "patch_embed.proj.weight", "patch_embed.proj.bias"
TIMM_RENAMES = (
    (".mlp.fc1_g.", ".mlp.w1."),
    (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.norm.", ".mlp.ffn_ln."),
    (".mlp.fc2.", ".mlp.w3."),
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
)


@dataclass
class ConversionResult:
    """A converted state dict plus what was done to which key and which keys were left out on purpose."""

    state_dict: dict[str, Tensor]
    converted: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _split_fused_qkv(state: dict[str, Tensor], converted: dict[str, str]) -> None:
    for key in [k for k in state if k.endswith(".attn.qkv.weight")]:
        base = key[: -len("qkv.weight")]
        for name, part in zip(("q_proj", "k_proj", "v_proj"), state.pop(key).chunk(3, dim=0)):
            state[f"{base}{name}.weight"] = part
            converted[f"{base}{name}.weight"] = f"split from timm fused '{key}'"
        state.pop(f"{base}k_bias", None)  # timm keeps a zero k bias buffer; EVA has no k bias


def rename_timm_eva(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Undo timm's EVA-02 renames; returns the renamed dict and ``{new name: what was done}``."""
    state, converted = dict(state_dict), {}
    _split_fused_qkv(state, converted)
    out = {}
    for key, value in state.items():
        new = "." + key
        for old, repl in TIMM_RENAMES:
            new = new.replace(old, repl)
        new = new[1:]
        if new.startswith("fc_norm.") and "norm.weight" not in state:
            new = new[3:]  # timm moves EVA-02's final norm to fc_norm when global_pool='avg'
        if new != key:
            converted[new] = f"renamed from timm '{key}'"
        out[new] = value
    return out, converted


def resize_kernel_2d(weight: Tensor, size: int) -> Tensor:
    """Bicubic resize of the last two axes to ``size x size`` without magnitude correction (as the original)."""
    if weight.shape[-2:] == (size, size):
        return weight
    lead = weight.shape[:-2]
    flat = weight.reshape(-1, 1, *weight.shape[-2:]).float()
    resized = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False)
    return resized.reshape(*lead, size, size).to(weight.dtype)


def inflate_kernel_depth(weight: Tensor, depth: int) -> Tensor:
    """``(o, i, h, w) -> (o, i, depth, h, w)`` by averaging ('average' inflation: each tap is ``weight / depth``)."""
    return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth


def fit_kernel_depth(weight: Tensor, depth: int) -> Tensor:
    """Fit a 5D kernel's depth taps to ``depth``: SAC sum-pooling when shrinking; when growing (e.g. a fine-tuned
    (4, 16, 16) kernel back to 16^3) each tap is spread evenly over its group, the inverse of sum-pooling."""
    kd = weight.shape[2]
    if kd == depth:
        return weight
    if kd % depth == 0:
        return reduce_depth_kernel(weight, kd // depth)
    if depth % kd == 0:
        group = depth // kd
        return weight.repeat_interleave(group, dim=2) / group
    raise ValueError(f"cannot fit a kernel of {kd} depth taps to {depth} taps (neither divides the other)")


def sum_share_channels(weight: Tensor, in_channels: int) -> Tensor:
    """The original's rule: sum the kernel over input channels, share it equally among ``in_channels``.

    A grey image replicated to the source's channels gives exactly the same output as the grey image through the
    summed kernel (1 channel); with ``c`` identical input channels, each gets ``1/c`` of the sum.
    """
    summed = weight.sum(dim=1, keepdim=True) / in_channels
    return summed.repeat(1, in_channels, *([1] * (weight.dim() - 2)))


def fold_input_normalisation(
    weight: Tensor, bias: Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Fold ``x -> (x - mean_c) / std_c`` into a conv without padding: ``W_c / std_c`` and
    ``b - sum_c sum_taps W_c * mean_c / std_c``. Exact for patch embeddings (no padding)."""
    shape = (1, -1) + (1,) * (weight.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=torch.float64).view(shape)
    std_t = torch.as_tensor(std, dtype=torch.float64).view(shape)
    w64 = weight.double()
    new_bias = bias.double() - (w64 * mean_t / std_t).flatten(1).sum(1)
    return (w64 / std_t).to(weight.dtype), new_bias.to(bias.dtype)


def adapt_in_channels(
    weight: Tensor,
    bias: Tensor,
    in_channels: int,
    mode: str = "sum",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[Tensor, Tensor, str | None]:
    """Adapt a patch kernel to ``in_channels``; returns ``(weight, bias, description or None if unchanged)``.

    ``"sum"`` (the original's rule) matches feeding the source model the input replicated to its channels, with
    whatever intensity convention the user's data has (PUMIT's own fine-tuning used 2x - 1 or z-score).
    ``"imagenet-fold"`` matches feeding the source model what it was pre-trained on: an image in [0, 1]
    replicated to RGB and ImageNet-normalised. The normalisation moves into the kernel and bias, so the
    fine-tuning input should be in [0, 1].
    """
    if mode not in CHANNEL_MODES:
        raise ValueError(f"channel mode {mode!r} is not one of {CHANNEL_MODES}")
    source_channels = weight.shape[1]
    if mode == "imagenet-fold":
        if source_channels != len(mean):
            raise ValueError(f"imagenet-fold needs a {len(mean)}-channel source kernel, got {source_channels}")
        weight, bias = fold_input_normalisation(weight, bias, mean, std)
        if in_channels != source_channels:
            weight = sum_share_channels(weight, in_channels)
        return weight, bias, f"input normalisation folded into kernel and bias, {source_channels} -> {in_channels} channels"
    if in_channels == source_channels:
        return weight, bias, None
    return sum_share_channels(weight, in_channels), bias, f"channels summed and shared, {source_channels} -> {in_channels}"


def split_eva_pos_embed(pos_embed: Tensor, cls_index: int = 0) -> tuple[Tensor | None, Tensor]:
    """EVA's ``(1, [1 +] h*w, C)`` -> (CLS position embedding ``(1, 1, C)`` or None, grid ``(1, C, 1, h, w)``).

    ``cls_index=1`` reproduces the original code's bug (it folded the first *patch* entry into the CLS token).
    """
    n = pos_embed.shape[1]
    side = math.isqrt(n - 1)
    if side * side == n - 1:
        cls, patches = pos_embed[:, cls_index : cls_index + 1], pos_embed[:, 1:]
    elif math.isqrt(n) ** 2 == n:
        side, cls, patches = math.isqrt(n), None, pos_embed
    else:
        raise ValueError(f"a 1D position embedding of {n} entries is not a square grid (with or without CLS)")
    grid = patches.transpose(1, 2).reshape(1, -1, 1, side, side)
    return cls, grid


def _convert_pos_embed(state: dict[str, Tensor], result: ConversionResult, grid_shape: Sequence[int], cls_index: int) -> None:
    pe = state.get("pos_embed")
    if pe is None:
        return
    notes = []
    if pe.dim() == 3:
        cls_pe, pe = split_eva_pos_embed(pe, cls_index)
        notes.append("EVA 1D embedding reshaped to a (1, h, w) grid")
        if cls_pe is not None and "cls_token" in state:
            state["cls_token"] = state["cls_token"] + cls_pe
            result.converted["cls_token"] = f"EVA CLS position embedding (index {cls_index}) folded in"
    if tuple(pe.shape[2:]) != tuple(grid_shape):
        notes.append(f"resampled {tuple(pe.shape[2:])} -> {tuple(grid_shape)}")
        pe = resample_pos_embed(pe.float(), grid_shape).to(pe.dtype)
    if notes:
        result.converted["pos_embed"] = "; ".join(notes)
    state["pos_embed"] = pe


def _convert_patch_kernel(
    state: dict[str, Tensor], result: ConversionResult, patch_size: int, patch_depth: int, in_channels: int, mode: str
) -> None:
    weight = state.get(PATCH_W)
    if weight is None:
        return
    notes = []
    if weight.dim() == 4:
        if weight.shape[-1] != patch_size:
            notes.append(f"2D kernel resized bicubically {tuple(weight.shape[-2:])} -> ({patch_size}, {patch_size})")
            weight = resize_kernel_2d(weight, patch_size)
        weight = inflate_kernel_depth(weight, patch_size)
        notes.append(f"inflated along depth to {patch_size} taps (average)")
    elif tuple(weight.shape[-2:]) != (patch_size, patch_size):
        raise ValueError(f"patch kernel in-plane size {tuple(weight.shape[-2:])} differs from the model's {patch_size}")
    if weight.shape[2] != patch_depth:
        notes.append(f"depth taps {weight.shape[2]} -> {patch_depth} (SAC sum-pooling)")
        weight = fit_kernel_depth(weight, patch_depth)
    bias = state.get(PATCH_B, torch.zeros(weight.shape[0], dtype=weight.dtype))
    weight, bias, note = adapt_in_channels(weight, bias, in_channels, mode)
    if note:
        notes.append(note)
        state[PATCH_B] = bias
        result.converted[PATCH_B] = note
    state[PATCH_W] = weight
    if notes:
        result.converted[PATCH_W] = "; ".join(notes)


def _is_head_or_buffer(key: str) -> bool:
    # EVA-02 stores its RoPE tables both at the root and inside every attention (``blocks.N.attn.rope.freqs_cos``)
    return key.startswith(HEAD_PREFIXES) or ".rope." in f".{key}"


def convert_vit_state_dict(
    state_dict: dict[str, Tensor],
    *,
    flavour: str,
    patch_size: int,
    patch_depth: int,
    in_channels: int,
    pos_embed_shape: Sequence[int],
    has_mask_token: bool,
    channel_mode: str = "sum",
    eva_cls_pos_index: int = 0,
) -> ConversionResult:
    """Convert a ViT state dict (``flavour`` in ``pumit``, ``eva02``, ``timm-eva02``) to a target geometry.

    ``patch_depth`` is the target kernel's depth (``patch_size`` for an adaptive SAC model).
    """
    state, converted = (rename_timm_eva(state_dict) if flavour == "timm-eva02" else (dict(state_dict), {}))
    result = ConversionResult({}, converted)
    for key in list(state):
        if _is_head_or_buffer(key) or (key == "mask_token" and not has_mask_token):
            result.skipped.append(key)
            state.pop(key)
    _convert_pos_embed(state, result, pos_embed_shape, eva_cls_pos_index)
    _convert_patch_kernel(state, result, patch_size, patch_depth, in_channels, channel_mode)
    result.state_dict = state
    return result
