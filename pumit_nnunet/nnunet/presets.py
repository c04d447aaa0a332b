"""Plan presets: the paper's downstream protocols (and a pre-training-matched normalisation) as JSON files.

A preset (``plans/<name>.json`` in a source checkout, ``pumit_nnunet/_plan_presets`` in a wheel, or any file)
fixes what the PUMIT planner would otherwise choose: the target spacing, the intensity normalisation, patch and
batch size per configuration, and records the training/inference protocol and pre-trained-weights options in
the plans. Keys (all optional except ``name``)::

    name, description, plans_name, spacing [d, h, w], channels,
    normalization {"scheme": nnU-Net normalisation class, "window": [lower, upper] (CTNormalization only)},
    configurations {"3d_fullres": {"patch_size": [...], "batch_size": n}},
    protocol {see Protocol}, pretrained {"channel_mode": ..., "allow_partial": ...}

**Fixed CT window with nnU-Net's own CTNormalization.** ``CTNormalization`` clips to the plans'
``percentile_00_5``/``percentile_99_5`` and z-scores with ``mean``/``std`` from
``foreground_intensity_properties_per_channel``. Writing ``lower``/``upper`` as the percentiles, ``mean = lower``
and ``std = upper - lower`` turns it into ``clip(x, lower, upper) -> [0, 1]`` (BTCV: [-175, 250] -> [0, 1]),
without a custom normalisation class (nnU-Net only finds built-in ones).

**Matching pre-training.** PUMIT's MIM saw per-image 0.5-99.5 percentile scaling to [0, 1], replicated to RGB
and ImageNet-normalised. The closest built-in per-image scheme is ``RescaleTo01Normalization`` (min-max, so
outliers are not clipped as the percentiles did); the weights converter's ``imagenet-fold`` channel mode folds
the RGB replication and ImageNet affine into the patch embedding, so the network's first layer then computes
what it computed in pre-training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "PresetError", "Normalization", "Protocol", "ConfigurationPreset", "PlanPreset", "preset_folder",
    "available_presets", "load_preset", "parse_preset", "ct_window_intensity_properties", "protocol_from_plans",
    "PROTOCOL_KEY", "NORMALIZATION_SCHEMES", "predict_options", "resolve_spacing", "preset_help",
]

PROTOCOL_KEY = "pumit_protocol"
#: nnU-Net's built-in normalisation classes (its preprocessor cannot find others)
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization", "RescaleTo01Normalization", "NoNormalization",
                         "RGBTo01Normalization", "PumitPercentileZScoreNormalization")
_PRESET_KEYS = {"name", "description", "plans_name", "spacing", "channels", "normalization", "configurations",
                "protocol", "pretrained"}


class PresetError(ValueError):
    """A preset that cannot be found or is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Normalization:
    """An nnU-Net normalisation scheme for every channel, optionally with a fixed CT window mapped to [0, 1]."""

    scheme: str
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Protocol:
    """Training and inference protocol recorded in a plans configuration (``pumit_protocol``).

    ``sliding_window_step_size`` is nnU-Net's ``-step_size`` (overlap 0.75 = step 0.25); nnU-Net blends with a
    Gaussian and averages the 8 mirrorings of the 3 axes by default, which PUMIT's protocol also used.
    ``recipe`` is ``"nnunet"`` (nnU-Net's loss, sampling and augmentation with the authors' [8, 4, 2, 1]/15 head
    weights) or ``"authors"``; ``crop_weights``
    (uniform, class-balanced), ``affine_scale_range`` and ``input_affine`` (scale, shift) configure the authors'
    recipe, see :mod:`pumit_nnunet.nnunet.recipe`.
    """

    iterations: int = 50_000
    epochs: int = 200
    iterations_per_epoch: int = 250
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-6
    weight_decay: float = 0.05
    warmup_iterations: int = 5_000
    schedule: str = "cosine"
    grad_clip: float = 1.0
    sliding_window_step_size: float = 0.25
    gaussian_blending: bool = True
    mirroring_tta: bool = True
    checkpoint: str = "checkpoint_final.pth"
    model_selection: str = ("validation split only: train on the fold's training cases, pick settings on its "
                            "validation cases, never on the cases reported as test")
    recipe: str = "nnunet"
    crop_weights: tuple[float, float] = (1.0, 3.0)
    affine_scale_range: tuple[float, float] = (-0.3, 0.4)
    input_affine: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        from pumit_nnunet.nnunet.recipe import recipe_settings

        for name in ("crop_weights", "affine_scale_range", "input_affine"):  # JSON gives lists
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ValueError(f"protocol: {name} must be two numbers, got {value!r}")
                object.__setattr__(self, name, tuple(float(v) for v in value))
        recipe_settings(self)  # validates the recipe fields
        if self.epochs * self.iterations_per_epoch != self.iterations:
            raise ValueError(f"protocol: epochs x iterations_per_epoch ({self.epochs} x {self.iterations_per_epoch}) "
                             f"must equal iterations ({self.iterations})")
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ValueError(f"protocol: warmup_iterations {self.warmup_iterations} must be in [0, {self.iterations})")
        if not 0 < self.sliding_window_step_size <= 1:
            raise ValueError(f"protocol: sliding_window_step_size must be in (0, 1], got {self.sliding_window_step_size}")
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(f"protocol: schedule must be 'cosine' or 'poly', got {self.schedule!r}")

    @property
    def warmup_fraction(self) -> float:
        return self.warmup_iterations / self.iterations

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ConfigurationPreset:
    """Fixed patch and batch size of one configuration (``None``: the planner chooses)."""

    patch_size: tuple[int, ...] | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class PlanPreset:
    """A parsed preset file; see the module docstring for the JSON keys."""

    name: str
    source: str
    description: str = ""
    plans_name: str | None = None
    spacing: tuple[float, float, float] | None = None
    channels: int | None = None
    normalization: Normalization | None = None
    configurations: dict[str, ConfigurationPreset] = field(default_factory=dict)
    protocol: Protocol | None = None
    pretrained: dict[str, Any] | None = None

    def intensity_properties(self, fingerprint_properties: dict[str, dict]) -> dict[str, dict]:
        """The plans' ``foreground_intensity_properties_per_channel`` under this preset."""
        if self.normalization is None or self.normalization.window is None:
            return fingerprint_properties
        return {c: ct_window_intensity_properties(*self.normalization.window) for c in fingerprint_properties}


def ct_window_intensity_properties(lower: float, upper: float) -> dict[str, float]:
    """Intensity properties that make nnU-Net's ``CTNormalization`` map ``[lower, upper]`` linearly onto [0, 1]
    (clipping outside): clip bounds = the window, ``mean = lower``, ``std = upper - lower``."""
    if not upper > lower:
        raise ValueError(f"CT window must have upper > lower, got [{lower}, {upper}]")
    lower, upper = float(lower), float(upper)
    return {"max": upper, "mean": lower, "median": (lower + upper) / 2, "min": lower,
            "percentile_00_5": lower, "percentile_99_5": upper, "std": upper - lower}


def preset_folder() -> Path | None:
    """Folder of the shipped presets: ``pumit_nnunet/_plan_presets`` in a wheel, ``plans/`` in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "_plan_presets", package.parent / "plans"):
        if folder.is_dir() and any(folder.glob("*.json")):
            return folder
    return None


def available_presets() -> list[str]:
    folder = preset_folder()
    return sorted(p.stem for p in folder.glob("*.json")) if folder else []


def load_preset(name_or_path: str | os.PathLike) -> PlanPreset:
    """Load a shipped preset by name (``btcv``) or any preset JSON file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not (text.endswith(".json") or path.is_file()):
        folder = preset_folder()
        if text not in available_presets() or folder is None:
            raise PresetError(f"unknown preset {text!r}; shipped presets: {', '.join(available_presets()) or 'none'} "
                              "(or pass a preset .json file)")
        path = folder / f"{text}.json"
    if not path.is_file():
        raise PresetError(f"preset file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"preset file {path} is not valid JSON: {error}") from None
    return parse_preset(data, str(path))


def _floats(value: Any, length: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{what} must be a list of {length} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _normalization(value: Any) -> Normalization:
    if not isinstance(value, dict) or set(value) - {"scheme", "window"} or "scheme" not in value:
        raise ValueError(f"normalization must be {{'scheme': ..., 'window': [lower, upper]}}, got {value!r}")
    if value["scheme"] not in NORMALIZATION_SCHEMES:
        raise ValueError(f"normalization scheme {value['scheme']!r} is not one of {NORMALIZATION_SCHEMES}")
    if value["scheme"].startswith("Pumit"):
        # ours is added to nnU-Net's normalisation module (the start-up hook does it in every process); the
        # planner of this process looks the class up there right after parsing the preset
        from pumit_nnunet.nnunet.recipe_normalization import register

        register()
    window = value.get("window")
    if window is not None:
        if value["scheme"] != "CTNormalization":
            raise ValueError("a normalization window needs the CTNormalization scheme")
        window = _floats(window, 2, "normalization window")
        ct_window_intensity_properties(*window)  # checks upper > lower
    return Normalization(value["scheme"], window)


def _configuration(name: str, value: Any) -> ConfigurationPreset:
    if not isinstance(value, dict) or set(value) - {"patch_size", "batch_size"}:
        raise ValueError(f"configurations.{name} may only set patch_size and batch_size, got {value!r}")
    patch = value.get("patch_size")
    if patch is not None and (not isinstance(patch, list) or len(patch) not in (2, 3)
                              or not all(isinstance(p, int) and p > 0 for p in patch)):
        raise ValueError(f"configurations.{name}.patch_size must be 2 or 3 positive integers, got {patch!r}")
    batch = value.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or batch < 2):
        raise ValueError(f"configurations.{name}.batch_size must be an integer >= 2, got {batch!r}")
    return ConfigurationPreset(tuple(patch) if patch else None, batch)


def _pretrained(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or "path" in value:
        raise ValueError("pretrained holds loading options only (channel_mode, allow_partial); attach weights with "
                         "`pumit-nnunet weights attach`")
    from pumit_nnunet.nnunet.pretrained import validate_pretrained_options

    validate_pretrained_options(value)
    return dict(value)


def parse_preset(data: Any, source: str = "<preset>") -> PlanPreset:
    """Validate a preset's JSON object; raises :class:`PresetError` naming ``source`` and the problem."""
    try:
        if not isinstance(data, dict):
            raise ValueError("the top level must be a JSON object")
        unknown = set(data) - _PRESET_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(_PRESET_KEYS)}")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise ValueError("'name' must be a non-empty string")
        spacing = data.get("spacing")
        if spacing is not None:
            spacing = _floats(spacing, 3, "spacing (depth, h, w)")
            if min(spacing) <= 0:
                raise ValueError(f"spacing must be positive, got {list(spacing)}")
        channels = data.get("channels")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        configurations = data.get("configurations", {})
        if not isinstance(configurations, dict):
            raise ValueError("configurations must be an object keyed by configuration name")
        return PlanPreset(
            name=data["name"], source=source, description=str(data.get("description", "")),
            plans_name=data.get("plans_name"), spacing=spacing, channels=channels,
            normalization=_normalization(data["normalization"]) if "normalization" in data else None,
            configurations={k: _configuration(k, v) for k, v in configurations.items()},
            protocol=Protocol(**data["protocol"]) if "protocol" in data else None,
            pretrained=_pretrained(data["pretrained"]) if "pretrained" in data else None,
        )
    except (TypeError, ValueError) as error:
        raise PresetError(f"preset {source}: {error}") from None


def preset_help(width: int = 100) -> str:
    """The shipped presets with their descriptions (which fine-tuning recipe each uses and what still differs
    from the paper), wrapped for ``pumit-nnunet plan --help``; a preset that does not parse is listed as such."""
    import textwrap

    lines, folder = ["presets (--preset NAME):"], preset_folder()
    for name in available_presets():
        try:  # the raw JSON only: the parser is built on every start, full validation would import torch
            data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            recipe = (data.get("protocol") or {}).get("recipe", "nnunet")
            text = f"{name} [recipe: {recipe}]: {data.get('description', '')}"
        except (OSError, ValueError, AttributeError) as error:
            text = f"{name}: (unreadable: {error})"
        lines.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)


def protocol_from_plans(configuration: dict[str, Any]) -> Protocol | None:
    """The protocol recorded in a (resolved) plans configuration, for trainers and prediction helpers."""
    block = configuration.get(PROTOCOL_KEY)
    return None if block is None else Protocol(**block)


def predict_options(protocol: Protocol | None) -> list[str]:
    """Extra ``nnUNetv2_predict`` arguments that realise a protocol's inference settings."""
    if protocol is None:
        return []
    options = ["-step_size", f"{protocol.sliding_window_step_size:g}", "-chk", protocol.checkpoint]
    return options if protocol.mirroring_tta else [*options, "--disable_tta"]


def resolve_spacing(spacing: Sequence[float] | None, mode: str | None, preset: PlanPreset | None) -> list[float] | None:
    """Target spacing for the planner: explicit ``spacing`` wins; ``mode='default'`` is nnU-Net's choice (even with
    a preset); otherwise the preset's. ``mode='fixed'`` requires a spacing from one of them."""
    if spacing is not None:
        values = [float(s) for s in spacing]
        if len(values) != 3 or min(values) <= 0:
            raise PresetError(f"--spacing needs 3 positive numbers (depth, h, w in nnU-Net's axis order), got {list(spacing)}")
        return values
    if mode == "default":
        return None
    if preset is not None and preset.spacing is not None:
        return list(preset.spacing)
    if mode == "fixed":
        raise PresetError("--spacing-mode fixed needs --spacing D H W or a preset that sets a spacing")
    return None
