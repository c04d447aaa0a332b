"""LPIPS perceptual distance with VGG16 features, applied to 3D images slice by slice.

Weights come from local files only (nothing is downloaded): torchvision's ImageNet VGG16 state dict
(``vgg16-397923af.pth``; only its ``features.*`` entries are used) and the LPIPS linear-layer weights shipped by
the ``lpips`` PyPI package (``lpips/weights/v0.1/vgg.pth``, keys ``lin{0..4}.model.1.weight``). Both are checked
key by key and shape by shape; problems raise an error naming the file.

Two deliberate differences from the original PUMIT code (its LPIPS wrapper, github function2-llx/PUMIT):

* the [-1, 1] -> ImageNet normalisation is the correct ``(x - (2·mean - 1)) / (2·std)`` (the original subtracts
  ``1 - 2·mean``, a sign error);
* the distance is the standard LPIPS value; the original multiplied it by 2. That factor is the same thing as a
  perceptual-loss weight of 2, so it lives in the loss weights (``--perceptual-weight``), not here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VGG16_SLICES",
    "VGG16_CHANNELS",
    "imagenet_normalize_from_pm1",
    "build_vgg16_features",
    "vgg16_feature_shapes",
    "lpips_lin_shapes",
    "LPIPS",
    "select_slices",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: feature slices of ``vgg16().features`` whose outputs LPIPS compares (ends of relu1_2 ... relu5_3)
VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
_VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def imagenet_normalize_from_pm1(x: Tensor) -> Tensor:
    """Map RGB in [-1, 1] to ImageNet-normalised input: ``((x + 1)/2 - mean) / std = (x - (2·mean - 1)) / (2·std)``."""
    shift = torch.tensor([2 * m - 1 for m in IMAGENET_MEAN], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    scale = torch.tensor([2 * s for s in IMAGENET_STD], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - shift) / scale


def build_vgg16_features() -> nn.Sequential:
    """The first 30 modules of torchvision's ``vgg16().features`` (same indices, hence the same state-dict keys)."""
    layers: list[nn.Module] = []
    c_in = 3
    for item in _VGG16_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU()]
            c_in = item
    return nn.Sequential(*layers)


def vgg16_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Expected ``features.*`` keys and shapes of a torchvision VGG16 state dict."""
    return {f"features.{k}": tuple(v.shape) for k, v in build_vgg16_features().state_dict().items()}


def lpips_lin_shapes() -> dict[str, tuple[int, ...]]:
    """Expected keys and shapes of the lpips package's ``weights/v0.1/vgg.pth``."""
    return {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(VGG16_CHANNELS)}


def _load_checked(path: str | os.PathLike, expected: dict[str, tuple[int, ...]], what: str) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # the lpips file was saved from CUDA
    except Exception as error:
        raise ValueError(f"{what} file {path} cannot be read: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{what} file {path} holds a {type(state).__name__}, expected a state dict")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{what} file {path} lacks {len(missing)} keys, e.g. {missing[:3]}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {shape}" for k, shape in expected.items() if tuple(state[k].shape) != shape]
    if wrong:
        raise ValueError(f"{what} file {path} has wrong shapes: {'; '.join(wrong[:3])}")
    return {k: state[k].float() for k in expected}


def _normalize_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant) between images in [-1, 1], frozen; 3D inputs are compared per 2D depth slice.

    Args:
        vgg16_path: torchvision VGG16 ImageNet state dict (``vgg16-397923af.pth``).
        lin_path: LPIPS linear weights (``lpips/weights/v0.1/vgg.pth``).
    """

    def __init__(self, vgg16_path: str | os.PathLike, lin_path: str | os.PathLike) -> None:
        super().__init__()
        features = build_vgg16_features()
        vgg_state = _load_checked(vgg16_path, vgg16_feature_shapes(), "VGG16")
        features.load_state_dict({k.removeprefix("features."): v for k, v in vgg_state.items()})
        self.slices = nn.ModuleList(features[a:b] for a, b in VGG16_SLICES)
        lin_state = _load_checked(lin_path, lpips_lin_shapes(), "LPIPS linear-weights")
        self.lins = nn.ParameterList(lin_state[f"lin{i}.model.1.weight"] for i in range(len(VGG16_CHANNELS)))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # frozen feature extractor: never switch to training mode
        return super().train(False)

    def forward_2d(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image LPIPS ``(N,)`` of 2D batches ``(N, 3, H, W)`` in [-1, 1]."""
        fx, fy = imagenet_normalize_from_pm1(x), imagenet_normalize_from_pm1(y)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for block, lin in zip(self.slices, self.lins):
            fx, fy = block(fx), block(fy)
            diff = (_normalize_channels(fx.float()) - _normalize_channels(fy.float())).pow(2)
            total = total + F.conv2d(diff, lin.float()).mean((1, 2, 3))
        return total

    def forward(self, x: Tensor, y: Tensor, max_slices: int | None = None,
                generator: torch.Generator | None = None) -> Tensor:
        """Mean LPIPS over the depth slices of ``(B, 3, D, H, W)`` volumes (or over ``(B, 3, H, W)`` images).

        Args:
            max_slices: compare at most this many random slices per sample (the same slices of ``x`` and ``y``),
                drawn from ``generator`` (CPU; torch's global generator when ``None``).
        """
        if x.ndim == 4:
            return self.forward_2d(x, y).mean()
        x2, y2 = select_slices(x, y, max_slices, generator)
        return self.forward_2d(x2, y2).mean()


def select_slices(x: Tensor, y: Tensor, max_slices: int | None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(B, C, D, H, W)`` pairs -> ``(B·D', C, H, W)`` 2D slices, ``D' = min(D, max_slices)`` random ones per sample."""
    b, c, d, h, w = x.shape
    if max_slices is not None and d > max_slices:
        index = torch.stack([torch.randperm(d, generator=generator)[:max_slices] for _ in range(b)]).to(x.device)
        gather = index.view(b, 1, -1, 1, 1).expand(b, c, max_slices, h, w)
        x, y = x.gather(2, gather), y.gather(2, gather)
        d = max_slices
    return x.transpose(1, 2).reshape(b * d, c, h, w), y.transpose(1, 2).reshape(b * d, c, h, w)
