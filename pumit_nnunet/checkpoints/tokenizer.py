"""Reading a visual tokenizer from any file that holds one: ours, this package's older layout, or the authors'.

Layouts (``TokenizerWeights.format``):

- ``"pumit"``: our checkpoint format, kind ``tokenizer`` (what ``pumit-nnunet pretrain tokenizer`` writes:
  ``pumit_tokenizer_final.pth``); the discriminator, when kept, sits in ``extra["discriminator"]``;
- ``"pumit-nnunet/tokenizer/1"``: the training-state dict of earlier releases of this package
  (``checkpoint_final.pth`` with ``config``, ``model`` and ``discriminator`` entries);
- ``"authors"``: the authors' Lightning-Fabric dict ``{model, discriminator, optimizer_g, optimizer_d, step}``
  (``simple-soft.ckpt``), or a bare state dict with the same key names. It records no architecture, so the
  sizes are read off the tensor shapes (:func:`infer_tokenizer_config`).

Every file goes through the one weights-only loader,
:func:`~pumit_nnunet.checkpoints.readers.torch_load_checked`, and its weights must be finite.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from pumit_nnunet.checkpoints.layout import CheckpointError, checkpoint_from_dict, is_pumit_checkpoint
from pumit_nnunet.checkpoints.readers import torch_load_checked
from pumit_nnunet.checkpoints.safety import require_finite
from pumit_nnunet.models.tokenizer import TokenizerConfig, UniversalTokenizer
from pumit_nnunet.plain import PlainFormatError

__all__ = ["LEGACY_TOKENIZER_FORMAT", "TokenizerWeights", "infer_tokenizer_config", "read_tokenizer_weights",
           "load_tokenizer"]

#: the ``format`` entry of the tokenizer training state that earlier releases used as their final artefact
LEGACY_TOKENIZER_FORMAT = "pumit-nnunet/tokenizer/1"
_CODEBOOK = "quantize.embedding.weight"


@dataclass
class TokenizerWeights:
    """A tokenizer's architecture and weights, and the discriminator's weights when the file kept them."""

    format: str
    config: TokenizerConfig
    state_dict: dict[str, Tensor]
    discriminator: dict[str, Tensor] | None
    source: str


def _indices(state: Mapping[str, Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in state if (m := regex.fullmatch(key))})


def infer_tokenizer_config(state: Mapping[str, Tensor], source: str = "checkpoint") -> TokenizerConfig:
    """The sizes of the tokenizer whose state dict is ``state`` (the authors' key names, which are ours).

    The encoder's down convs are the convs followed by a ``LayerNormNd`` (``encoder.{3i + 1}.1``); the decoder's
    up layers are its ``*.transposed_conv`` modules. ``norm_groups`` leaves no trace in the shapes: the authors'
    value (8) is assumed, and a different one would still load but compute other features.
    """
    downs = _indices(state, r"encoder\.(\d+)\.1\.weight")
    ups = _indices(state, r"decoder\.(\d+)\.transposed_conv\.weight")
    if _CODEBOOK not in state or "encoder.0.weight" not in state or not downs or "decoder.0.weight" not in state:
        raise CheckpointError(f"holds no tokenizer weights (no '{_CODEBOOK}' / 'encoder.0.weight'); "
                              f"first keys: {', '.join(list(state)[:6])}", source)
    stem = state["encoder.0.weight"]
    down_channels = tuple(int(state[f"encoder.{i - 1}.weight"].shape[0]) for i in downs)
    up_outputs = [int(state["decoder.0.weight"].shape[0])]
    up_outputs += [int(state[f"decoder.{i}.transposed_conv.weight"].shape[1]) for i in ups]
    num_embeddings, embedding_dim = state[_CODEBOOK].shape
    return TokenizerConfig(in_channels=int(stem.shape[1]), start_stride=int(stem.shape[-1]),
                           down_channels=down_channels, up_channels=tuple(reversed(up_outputs)),
                           num_embeddings=int(num_embeddings), embedding_dim=int(embedding_dim))


def _config(data: Mapping[str, Any], source: str) -> TokenizerConfig:
    try:
        return TokenizerConfig.from_dict(data)
    except (PlainFormatError, TypeError, ValueError) as error:
        raise CheckpointError(f"its tokenizer architecture cannot be used: {error}", source) from None


def _from_dict(obj: Any, source: str) -> TokenizerWeights:
    if is_pumit_checkpoint(obj):
        checkpoint = checkpoint_from_dict(obj, source)
        if checkpoint.kind != "tokenizer":
            raise CheckpointError(f"is a {checkpoint.kind!r} checkpoint, expected a tokenizer checkpoint", source)
        disc = checkpoint.extra.get("discriminator")
        return TokenizerWeights("pumit", _config(checkpoint.architecture, source), checkpoint.state_dict, disc, source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a tokenizer checkpoint", source)
    if obj.get("format") == LEGACY_TOKENIZER_FORMAT:
        return TokenizerWeights(LEGACY_TOKENIZER_FORMAT, _config(obj["config"], source), dict(obj["model"]),
                                obj.get("discriminator"), source)
    state = obj.get("model", obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"unrecognised tokenizer checkpoint layout; top-level keys "
                              f"{sorted(map(str, obj))[:12]}", source)
    state = {k.removeprefix("_forward_module."): v for k, v in state.items()}  # a Fabric-wrapped module
    disc = obj.get("discriminator") if isinstance(obj.get("discriminator"), Mapping) else None
    return TokenizerWeights("authors", infer_tokenizer_config(state, source), dict(state), disc, source)


def read_tokenizer_weights(source: str | os.PathLike | Mapping[str, Any],
                           map_location: str | torch.device = "cpu") -> TokenizerWeights:
    """The tokenizer in a file (or an already loaded dict) of any layout above; weights must be finite."""
    name = "in-memory checkpoint" if isinstance(source, Mapping) else os.fspath(source)
    obj = source if isinstance(source, Mapping) else torch_load_checked(source, map_location=map_location)
    weights = _from_dict(obj, name)
    require_finite(weights.state_dict, name)
    return weights


def load_tokenizer(source: str | os.PathLike | Mapping[str, Any],
                   map_location: str | torch.device = "cpu") -> UniversalTokenizer:
    """A frozen (eval mode, no gradients) tokenizer from a file of any layout this module reads."""
    weights = read_tokenizer_weights(source, map_location)
    model = UniversalTokenizer(weights.config)
    try:
        model.load_state_dict(weights.state_dict)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise CheckpointError(f"the tokenizer weights do not fit the architecture "
                              f"{weights.config.to_dict()}: {' '.join(first[:2])}", weights.source) from None
    return model.to(map_location).requires_grad_(False).eval()
