"""The dict layout of our checkpoint format, without any file reading (so the readers can build on it).

A file is a plain dict (only tensors and plain Python values inside, so it loads with
``torch.load(weights_only=True)``)::

    {"format": "pumit-nnunet", "format_version": 1,
     "kind": "vit" | "mim" | "tokenizer" | "segmentation" | "classifier",
     "version": <package version>, "architecture": {...}, "pretrain_plan": {...} | None,
     "adaptation": {...} | None, "extra": {...}, "state_dict": {name: tensor}}

``adaptation`` uses the nnssl / dynamic-network-architectures vocabulary (``key_to_encoder``, ``key_to_stem``,
``keys_to_in_proj``, ``key_to_lpe``) so that other tools can adapt our checkpoints without knowing our code.
:mod:`pumit_nnunet.checkpoints.format` writes and reads such files; this module only defines and validates the dict.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Mapping

import torch

from pumit_nnunet.errors import DataError
from pumit_nnunet.plain import PlainFormatError, from_plain, to_plain

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "CHECKPOINT_KINDS", "CheckpointError", "PretrainPlan", "AdaptationPlan",
    "VIT_ADAPTATION", "PumitCheckpoint", "storable", "is_pumit_checkpoint", "checkpoint_from_dict",
]

FORMAT_NAME = "pumit-nnunet"
FORMAT_VERSION = 1
#: ``classifier``: a ViT with a task head (MedMNIST); older releases stored it as ``vit`` with ``extra.classifier``
CHECKPOINT_KINDS = ("vit", "mim", "tokenizer", "segmentation", "classifier")


class CheckpointError(DataError, ValueError):
    """A checkpoint file is absent, unreadable or does not match what it is loaded into (exit 1 on the CLI;
    still a ``ValueError`` for callers that catch that)."""


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

    def encoder_prefix(self) -> str:
        """``key_to_encoder`` as a state-dict prefix: ``""`` or ends with a dot (``"vit."``, ``"backbone."``)."""
        key = self.key_to_encoder
        return f"{key}." if key and not key.endswith(".") else key


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
            "architecture": storable(self.architecture),
            "pretrain_plan": to_plain(self.pretrain_plan) if self.pretrain_plan else None,
            "adaptation": to_plain(self.adaptation) if self.adaptation else None,
            "extra": storable(self.extra),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
        }


def storable(value: Any) -> Any:
    """Recursively turn dataclasses, numpy values and paths into what ``torch.load(weights_only=True)`` accepts
    with no extra globals: our checkpoints and nnU-Net's (training log, ``_best_ema``, ``init_args``).

    Tensors move to the CPU; tuples, ``torch.device`` and ``str``/``int`` keys stay (all allowed); numpy is tested
    before ``float`` because ``np.float64`` is a float yet pickles as a numpy object, which weights-only refuses.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, torch.device):
        return value
    if hasattr(value, "dtype"):  # numpy arrays become tensors (as nnssl does), scalars Python numbers
        return torch.as_tensor(value) if getattr(value, "ndim", 0) > 0 else value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return storable(to_plain(value))
    if isinstance(value, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): storable(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(storable(v) for v in value)
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a weights-only checkpoint")


def is_pumit_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a dict of our format."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME and "state_dict" in obj


def _plan(cls: type, data: Mapping[str, Any] | None, what: str, source: str) -> Any:
    if data is None:
        return None
    try:
        return from_plain(cls, data, strict=True, what=what, source=source)
    except PlainFormatError as error:
        raise CheckpointError(error.problem, source) from None
    except TypeError as error:
        raise CheckpointError(f"{what}: {error}", source) from None


def checkpoint_from_dict(obj: Mapping[str, Any], source: str = "checkpoint") -> PumitCheckpoint:
    """Validate and wrap an already loaded dict of our format."""
    if not is_pumit_checkpoint(obj):
        raise CheckpointError(f"is not a pumit-nnunet checkpoint (no 'format': {FORMAT_NAME!r} entry)", source)
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"has format version {obj['format_version']}, newer than this package reads ({FORMAT_VERSION}); "
            "upgrade pumit-nnunet", source)
    if obj.get("kind") not in CHECKPOINT_KINDS:
        raise CheckpointError(f"has unknown kind {obj.get('kind')!r}", source)
    return PumitCheckpoint(
        kind=obj["kind"],
        state_dict=dict(obj["state_dict"]),
        architecture=dict(obj.get("architecture") or {}),
        pretrain_plan=_plan(PretrainPlan, obj.get("pretrain_plan"), "pretrain_plan", source),
        adaptation=_plan(AdaptationPlan, obj.get("adaptation"), "adaptation", source),
        extra=dict(obj.get("extra") or {}),
        version=str(obj.get("version", "")),
        format_version=int(obj.get("format_version", FORMAT_VERSION)),
    )
