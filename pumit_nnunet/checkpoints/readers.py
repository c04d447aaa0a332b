"""Reading checkpoints of every supported format and finding the ViT inside them.

Formats (``SourceWeights.format``):

- ``"pumit"``: ours (:mod:`pumit_nnunet.checkpoints.format`), any kind but ``tokenizer``;
- ``"pumit-released"``: the authors' Lightning checkpoint (``pumit-b.ckpt``), weights under ``state_dict``;
- ``"eva02"``: BAAI's original EVA-02 MIM file, weights under ``module`` (4D 14x14 kernel, 1D ``pos_embed``);
- ``"timm-eva02"``: a timm ``Eva`` state dict (``mlp.fc1_g``, ``attn.q_proj.bias``, ``fc_norm`` ...);
- ``"nnunet-results"``: an nnU-Net ``checkpoint_*.pth`` (weights under ``network_weights``);
- ``"state-dict"``: a bare state dict in PUMIT names.

Files are always read with ``torch.load(weights_only=True)`` and their tensors must be finite. Lightning checkpoints may pickle foreign objects
(hyper-parameters, callbacks); those are replaced by inert stubs instead of being imported, so reading a
checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from pumit_nnunet.checkpoints.layout import CheckpointError, PumitCheckpoint, checkpoint_from_dict, is_pumit_checkpoint
from pumit_nnunet.checkpoints.safety import load_weights_only, require_finite

__all__ = ["SourceWeights", "torch_load_checked", "read_weights", "find_encoder_prefix", "vit_flavour"]

PATCH_KEY = "patch_embed.proj.weight"
#: prefixes added by wrappers (DDP, torch.compile) that never belong to a state-dict name
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TIMM_MARKERS = (".mlp.fc1_g.", ".mlp.fc2.", ".attn.q_proj.bias", ".attn.qkv.weight")


@dataclass
class SourceWeights:
    """A checkpoint reduced to its state dict, the format it came in and where the ViT sits inside it."""

    format: str
    state_dict: dict[str, Tensor]
    encoder_prefix: str
    source: str
    checkpoint: PumitCheckpoint | None = None

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The ViT's entries with the prefix removed (heads such as ``mim_head`` stay in)."""
        p = self.encoder_prefix
        return {k[len(p):]: v for k, v in self.state_dict.items() if k.startswith(p)}


class _ForeignObject:
    """Stands in for any pickled class that is not a tensor or a plain value; keeps its arguments inertly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


#: standard-library globals that only hold data (Lightning pickles hyper-parameters as these); any other
#: standard-library global (``io.open``, ``builtins.eval``, ``os.system``...) is how a payload runs code
_DATA_STDLIB_GLOBALS = ("argparse.Namespace", "pathlib.", "datetime.", "collections.", "uuid.UUID", "decimal.Decimal",
                        "fractions.Fraction", "enum.")


def _code_globals(names: list[str]) -> list[str]:
    """The standard-library callables among ``names``: a file calling them is refused, never stubbed."""
    return [name for name in names if name.split(".", 1)[0] in sys.stdlib_module_names
            and not name.startswith(_DATA_STDLIB_GLOBALS)]


def _stubs_for(path: Path) -> list[tuple[type, str]]:
    """Inert stand-ins for the foreign classes of ``path`` (third-party hyper-parameter objects); refuses files
    that would call standard-library functions (a stub would keep the payload from running, but such a file is
    an attack, not a checkpoint: say so)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    code = _code_globals(names)
    if code:
        raise pickle.UnpicklingError(f"GLOBAL {code[0]} (a standard-library callable)")
    return [(type(name.rsplit(".", 1)[-1], (_ForeignObject,), {"qualname": name}), name) for name in names]


def torch_load_checked(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """:func:`~pumit_nnunet.checkpoints.safety.load_weights_only` that also reads Lightning files: their foreign
    hyper-parameter classes load as inert stubs (standard-library callables are still refused)."""
    return load_weights_only(path, map_location=map_location, stand_ins=_stubs_for)


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def find_encoder_prefix(state_dict: Mapping[str, Any], source: str = "checkpoint") -> str:
    """The prefix in front of the ViT's ``patch_embed.proj.weight`` (``""`` for a bare ViT, ``"backbone."`` ...)."""
    hits = sorted((k[: -len(PATCH_KEY)] for k in state_dict if k.endswith(PATCH_KEY)), key=len)
    hits = [h for h in hits if h == "" or h.endswith(".")]
    if not hits:
        sample = ", ".join(list(state_dict)[:8])
        raise CheckpointError(
            f"holds no ViT weights: no '{PATCH_KEY}' among its {len(state_dict)} entries "
            f"(first keys: {sample}); is it a state dict from another model?", source)
    return hits[0]


def vit_flavour(encoder: Mapping[str, Tensor]) -> str:
    """``"timm-eva02"`` for timm names, ``"eva02"`` for EVA-02's own 2D names, else ``"pumit"`` (5D kernel)."""
    if any(marker in "." + key for key in encoder for marker in TIMM_MARKERS):
        return "timm-eva02"
    return "eva02" if encoder[PATCH_KEY].dim() == 4 else "pumit"


def _container(obj: Any, source: str) -> tuple[str, Mapping[str, Any]]:
    """Which container the weights sit in, and the raw state dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a checkpoint dict", source)
    if "network_weights" in obj:
        return "nnunet-results", obj["network_weights"]
    for key in ("state_dict", "module", "model"):
        if isinstance(obj.get(key), Mapping):
            return ("pumit-released" if key == "state_dict" else "eva02"), obj[key]
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return "state-dict", obj
    raise CheckpointError(f"unrecognised checkpoint layout; top-level keys {sorted(map(str, obj))[:12]}", source)


def read_weights(source: str | os.PathLike | Mapping[str, Any]) -> SourceWeights:
    """Read a checkpoint file (or an already loaded dict) of any supported format."""
    name = "in-memory checkpoint" if isinstance(source, Mapping) else str(source)
    obj = source if isinstance(source, Mapping) else torch_load_checked(source)
    if is_pumit_checkpoint(obj):
        ckpt = checkpoint_from_dict(obj, name)
        if ckpt.kind == "tokenizer":
            raise CheckpointError("is a tokenizer checkpoint; it holds no ViT weights", name)
        state = _strip_wrappers(ckpt.state_dict)
        require_finite(state, name)
        prefix = ckpt.adaptation.key_to_encoder if ckpt.adaptation else find_encoder_prefix(state, name)
        prefix = f"{prefix}." if prefix and not prefix.endswith(".") else prefix
        return SourceWeights("pumit", state, prefix, name, ckpt)
    container, raw = _container(obj, name)
    state = _strip_wrappers(raw)
    require_finite(state, name)  # every format: NaN weights would fine-tune into a NaN model
    prefix = find_encoder_prefix(state, name)
    flavour = vit_flavour({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    if flavour != "pumit" and container in ("state-dict", "pumit-released", "eva02"):
        container = flavour
    return SourceWeights(container, state, prefix, name)
