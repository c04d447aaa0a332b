"""Our own checkpoint format: weights plus what is needed to rebuild and adapt them.

A file is a plain dict (only tensors and plain Python values inside, so it loads with
``torch.load(weights_only=True)``)::

    {"format": "pumit-nnunet", "format_version": 1, "kind": "vit" | "mim" | "tokenizer" | "segmentation",
     "version": <package version>, "architecture": {...}, "pretrain_plan": {...} | None,
     "adaptation": {...} | None, "extra": {...}, "state_dict": {name: tensor}}

``adaptation`` uses the nnssl / dynamic-network-architectures vocabulary (``key_to_encoder``, ``key_to_stem``,
``keys_to_in_proj``, ``key_to_lpe``) so that other tools can adapt our checkpoints without knowing our code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch

from pumit_nnunet.io import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CHECKPOINT_KINDS",
    "PretrainPlan",
    "AdaptationPlan",
    "PumitCheckpoint",
    "VIT_ADAPTATION",
    "CheckpointError",
    "save_pumit_checkpoint",
    "load_pumit_checkpoint",
    "is_pumit_checkpoint",
    "checkpoint_from_dict",
    "atomic_torch_save",
    "to_plain",
]

FORMAT_NAME = "pumit-nnunet"
FORMAT_VERSION = 1
CHECKPOINT_KINDS = ("vit", "mim", "tokenizer", "segmentation")


class CheckpointError(ValueError):
    """A checkpoint file is absent, unreadable or does not match what it is loaded into."""


@dataclass
class PretrainPlan:
    """What the weights were trained with (input channels, intensity convention, spacing, patch).

    ``intensity`` names the input convention: ``"unit-range-imagenet"`` (PUMIT MIM: each image scaled to [0, 1],
    replicated to RGB, ImageNet-normalised), ``"minus1-1"`` (2x - 1, the tokenizer and BTCV), ``"zscore"``,
    ``"ct-window"``.
    """

    in_channels: int
    intensity: str
    spacing: list[float] | None = None
    patch_size: list[int] | None = None
    notes: str = ""


@dataclass
class AdaptationPlan:
    """Where the encoder, stem, input projections and learned position embedding sit in the state dict."""

    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: list[str]
    key_to_lpe: str


#: the adaptation block of a bare :class:`~pumit_nnunet.models.vit.UniversalViT` state dict
VIT_ADAPTATION = AdaptationPlan(
    key_to_encoder="", key_to_stem="patch_embed", keys_to_in_proj=["patch_embed.proj"], key_to_lpe="pos_embed"
)


@dataclass
class PumitCheckpoint:
    """A loaded checkpoint of our format (see the module docstring)."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    architecture: dict[str, Any]
    pretrain_plan: PretrainPlan | None = None
    adaptation: AdaptationPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (plain values and tensors only)."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "kind": self.kind,
            "version": self.version,
            "architecture": to_plain(self.architecture),
            "pretrain_plan": asdict(self.pretrain_plan) if self.pretrain_plan else None,
            "adaptation": asdict(self.adaptation) if self.adaptation else None,
            "extra": to_plain(self.extra),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
        }


def to_plain(value: Any) -> Any:
    """Recursively turn numpy values, tuples and paths into types ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if getattr(value, "ndim", 0) > 0:  # numpy arrays become tensors (as nnssl does), scalars Python numbers
        return torch.as_tensor(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (only tensors and plain Python values)")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace`` (no half-written files)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())


def save_pumit_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    state_dict: Mapping[str, torch.Tensor],
    architecture: Mapping[str, Any],
    pretrain_plan: PretrainPlan | None = None,
    adaptation: AdaptationPlan | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint of our format atomically; it records the package version.

    ``architecture`` is the model's config dict (e.g. ``ViTConfig.to_dict()``); ``extra`` may hold anything plain
    (step, optimiser state, manifests); tensors are moved to the CPU.
    """
    from pumit_nnunet import __version__

    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {CHECKPOINT_KINDS}")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict values must be tensors; not for {bad[:5]}")
    checkpoint = PumitCheckpoint(
        kind=kind,
        state_dict=dict(state_dict),
        architecture=dict(architecture),
        pretrain_plan=pretrain_plan,
        adaptation=adaptation,
        extra=dict(extra or {}),
        version=__version__,
    )
    atomic_torch_save(checkpoint.to_dict(), path)


def is_pumit_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a dict of our format."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME and "state_dict" in obj


def _dataclass_from(cls: type, data: Mapping[str, Any] | None, what: str) -> Any:
    if data is None:
        return None
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise CheckpointError(f"{what} has unknown fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as error:
        raise CheckpointError(f"{what} is incomplete: {error}") from None


def checkpoint_from_dict(obj: Mapping[str, Any], source: str = "checkpoint") -> PumitCheckpoint:
    """Validate and wrap an already loaded dict of our format."""
    if not is_pumit_checkpoint(obj):
        raise CheckpointError(f"{source} is not a pumit-nnunet checkpoint (no 'format': {FORMAT_NAME!r} entry)")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {obj['format_version']}, newer than this package reads ({FORMAT_VERSION}); "
            "upgrade pumit-nnunet"
        )
    if obj.get("kind") not in CHECKPOINT_KINDS:
        raise CheckpointError(f"{source} has unknown kind {obj.get('kind')!r}")
    return PumitCheckpoint(
        kind=obj["kind"],
        state_dict=dict(obj["state_dict"]),
        architecture=dict(obj.get("architecture") or {}),
        pretrain_plan=_dataclass_from(PretrainPlan, obj.get("pretrain_plan"), f"{source}: pretrain_plan"),
        adaptation=_dataclass_from(AdaptationPlan, obj.get("adaptation"), f"{source}: adaptation"),
        extra=dict(obj.get("extra") or {}),
        version=str(obj.get("version", "")),
        format_version=int(obj.get("format_version", FORMAT_VERSION)),
    )


def load_pumit_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> PumitCheckpoint:
    """Read a checkpoint of our format (``weights_only=True``); clear errors for absent or broken files."""
    from pumit_nnunet.checkpoints.readers import torch_load_checked

    return checkpoint_from_dict(torch_load_checked(path, map_location=map_location), source=str(path))
