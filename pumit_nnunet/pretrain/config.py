"""The two pre-training runs as frozen dataclasses, and the command-line parsers generated from them.

Every option is declared once, as a field whose metadata carries its help text, its choices, and whether it may
differ when a run is resumed (``resume=True``: paths, devices, logging cadence, the length of the run). Both
``pumit-nnunet pretrain tokenizer`` and ``pumit-nnunet pretrain mim`` are built from these declarations by
:func:`add_config_arguments`, so both show the same option names and help style, with every default. Values are
checked in ``__post_init__``; each run records ``to_plain()`` in its checkpoints and reads it back with
``from_plain(strict=True)``. Stdlib only: ``--help`` never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Mapping, TypeVar

from pumit_nnunet.errors import UsageError
from pumit_nnunet.plain import from_plain, to_plain

__all__ = ["PRECISIONS", "PRIOR_MEANS", "ConfigError", "RunConfig", "TokenizerTrainConfig", "MIMTrainConfig",
           "add_config_arguments", "config_from_args", "resume_may_change"]

PRECISIONS = ("bf16", "fp16", "fp32")
#: how p̄ is averaged over processes: over every token of the global batch (ours) or the per-process means (authors)
PRIOR_MEANS = ("tokens", "processes")
C = TypeVar("C", bound="RunConfig")


class ConfigError(UsageError, ValueError):
    """A run configuration asks for something impossible (exit 2 on the CLI; a ``ValueError`` for library callers)."""


def option(default: Any = MISSING, help: str = "", *, kind: type | None = None, choices: tuple | None = None,
           resume: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its command-line declaration: help, value type (for ``None`` defaults), choices,
    ``resume`` (may differ when the run is resumed) and hidden, deprecated ``aliases``."""
    metadata = {"help": help, "type": kind, "choices": choices, "resume": resume, "aliases": aliases}
    return field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What both pre-training stages share: data, run folder, optimiser, precision, cadence, ``--stop-at``."""

    #: fields a subclass refuses to see changed on resume are all those without ``resume=True`` metadata
    STAGE: ClassVar[str] = ""

    data: str = option(help="corpus store, nnU-Net raw dataset folder or image folder (raw data is converted into "
                            "OUT/corpus)", resume=True)
    out: str = option(help="run folder: checkpoints, history.json, progress.png and pictures", resume=True)
    init: str | None = option(None, "start from these weights (a new run, not a resume)", kind=str, resume=True)
    steps: int = option(1, "total optimisation steps (may change on resume: the cosine is stretched)", resume=True)
    stop_at: int | None = option(None, "stop after this step with a checkpoint, as an interruption would; continue "
                                       "later with --resume", kind=int, resume=True)
    lr: float = option(1e-4, "AdamW learning rate (peak, after the warm-up)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine (the authors' lr_min)")
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay")
    weight_decay: float = option(0.05, "AdamW weight decay (none on biases, norms, the codebook, tokens and "
                                       "position embeddings)")
    batch_size: int = option(1, "crops per process and step (the global batch is this times the processes)")
    crop_depth_tokens: int = option(1, "crop depth in tokens of 16 slices (at aniso_d 0; 1 for 2D images)")
    crop_inplane_tokens: int = option(1, "crop side in tokens of 16 pixels")
    augment: bool = option(True, "augment crops (scale, flips, intensity)")
    precision: str = option("bf16", "autocast on CUDA (CPU runs are fp32)", choices=PRECISIONS)
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)", kind=str, resume=True)
    seed: int = option(0, "seed of the weights, crops and masks")
    num_workers: int = option(0, "loader worker processes", resume=True)
    log_every: int = option(10, "record the training curves every N steps", resume=True)
    ckpt_every: int = option(1000, "checkpoint every N steps (and at the end)", resume=True)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "crop_depth_tokens", "crop_inplane_tokens", "log_every", "ckpt_every")
        for name in positive:
            _require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        for name in ("warmup_steps", "num_workers"):
            _require(getattr(self, name) >= 0, name, "must not be negative", getattr(self, name))
        _require(self.lr > 0, "lr", "must be positive", self.lr)
        _require(0 <= self.min_lr <= self.lr, "min_lr", f"must lie in [0, --lr {self.lr:g}]", self.min_lr)
        _require(self.weight_decay >= 0, "weight_decay", "must not be negative", self.weight_decay)
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}", self.precision)
        _require(self.stop_at is None or self.stop_at >= 1, "stop_at", "must be at least 1", self.stop_at)

    def to_plain(self) -> dict[str, Any]:
        """The run as plain values (recorded in every checkpoint and in ``train_config.json``)."""
        return to_plain(self)

    @classmethod
    def from_plain(cls: type[C], data: Mapping[str, Any], strict: bool = True,
                   source: str | os.PathLike | None = None) -> C:
        """The run recorded by :meth:`to_plain` (strict: unknown keys are named and refused)."""
        return from_plain(cls, cls._upgrade(dict(data)), strict=strict, what=f"{cls.STAGE} run config", source=source)

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Translate the keys of configs written by earlier releases (none to translate by default)."""
        data.pop("resume", None)  # earlier releases recorded the --resume switch in the config
        return data

    def last_step(self) -> int:
        """Where this invocation stops: ``steps``, or ``stop_at`` when it is earlier."""
        return min(self.steps, self.stop_at or self.steps)


def _require(ok: bool, name: str, problem: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{_flag(name)} {problem}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig(RunConfig):
    """A tokenizer run (paper: SPAD-VT). Defaults are the authors' README recipe (500k steps, 1024 soft codes)."""

    STAGE: ClassVar[str] = "tokenizer"

    preset: str = option("base", "tokenizer preset: base (paper), small, tiny", aliases=("--config",))
    codebook_size: int | None = option(None, "override the preset's number of codes", kind=int)
    steps: int = option(500_000, "total optimisation steps (may change on resume: the cosine is stretched)",
                        resume=True)
    batch_size: int = option(4, "crops per process and step (the global batch is this times the processes)")
    crop_depth_tokens: int = option(4, "crop depth in tokens of 16 slices (at aniso_d 0; 1 for 2D images)")
    crop_inplane_tokens: int = option(8, "crop side in tokens of 16 pixels")
    lr: float = option(1e-4, "generator AdamW learning rate")
    lr_disc: float = option(1e-3, "discriminator AdamW learning rate")
    min_lr: float = option(1e-6, "generator learning rate at the end of the cosine (the authors' lr_min)")
    min_lr_disc: float = option(1e-6, "discriminator learning rate at the end of the cosine (the authors' lr_min)")
    warmup_steps: int = option(25_000, "linear warm-up steps before the cosine decay (both optimisers)")
    vgg16: str | None = option(None, "torchvision VGG16 ImageNet state dict (vgg16-397923af.pth) for LPIPS", kind=str,
                               resume=True)
    lpips_lin: str | None = option(None, "LPIPS linear weights (the lpips package's weights/v0.1/vgg.pth)", kind=str,
                                   resume=True)
    perceptual: bool = option(True, "train with the LPIPS loss (needs --vgg16 and --lpips-lin)")
    perceptual_weight: float = option(2.0, "LPIPS weight; 2 reproduces the authors, whose LPIPS carries a x2 "
                                           "inside (ours does not)")
    quant_weight: float = option(0.03, "w_quant of -H(p̄); negative values give the sharpening stage")
    entropy_weight: float = option(1.0, "w_ent of mean_i H(p_i)")
    prior_mean: str = option("tokens", "p̄ across processes: 'tokens' = mean over every token of the global batch "
                                      "(ours: N processes equal 1 process with the whole batch, even when their crops "
                                      "differ in size); 'processes' = unweighted mean of the per-process means (the "
                                      "authors')", choices=PRIOR_MEANS)
    gan_weight: float = option(3e-3, "fixed weight of the generator's hinge GAN term")
    gan_threshold: float = option(0.025, "the GAN term is on while max(EMA, last) discriminator loss <= this")
    max_perceptual_slices: int = option(24, "random 2D slices per sample that LPIPS sees while training")
    seed: int = option(2333, "seed of the weights, crops and masks")
    log_every: int = option(50, "average the training curves over N steps", resume=True)
    val_every: int = option(1000, "validation metrics and figures every N steps (and at the end)", resume=True)
    max_val_images: int = option(8, "held-out images reconstructed at each validation", resume=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.lr_disc > 0, "lr_disc", "must be positive", self.lr_disc)
        _require(0 <= self.min_lr_disc <= self.lr_disc, "min_lr_disc", f"must lie in [0, --lr-disc {self.lr_disc:g}]",
                 self.min_lr_disc)
        _require(self.prior_mean in PRIOR_MEANS, "prior_mean", f"must be one of {', '.join(PRIOR_MEANS)}",
                 self.prior_mean)
        _require(self.codebook_size is None or self.codebook_size >= 2, "codebook_size", "must be at least 2",
                 self.codebook_size)
        for name in ("val_every", "max_perceptual_slices"):
            _require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))

    @classmethod
    def _upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        data = super()._upgrade(data)
        ratio = data.pop("min_lr_ratio", None)  # earlier releases: one ratio for both optimisers
        if ratio is not None:
            data.setdefault("min_lr", ratio * data.get("lr", 1e-4))
            data.setdefault("min_lr_disc", ratio * data.get("lr_disc", 1e-3))
        return data


@dataclass(frozen=True, kw_only=True)
class MIMTrainConfig(RunConfig):
    """A MIM run of the ViT on the frozen tokenizer's soft tokens. Defaults are the paper's ViT-B recipe."""

    STAGE: ClassVar[str] = "mim"

    tokenizer: str = option(help="frozen tokenizer checkpoint: ours (pumit_tokenizer_final.pth), an earlier "
                                 "release's checkpoint_final.pth, or the authors' simple-soft.ckpt", resume=True)
    vit: str = option("B", "ViT preset: T, S, B (paper), L")
    init: str | None = option(None, "initial weights: EVA-02 2D MIM file (eva02_B_pt_in21k_p14.pt), a PUMIT or our "
                                    "checkpoint; omitted: from scratch", kind=str, resume=True)
    steps: int = option(300_000, "total optimisation steps (may change on resume: the cosine is stretched)",
                        resume=True)
    warmup_steps: int = option(10_000, "linear warm-up steps before the cosine decay")
    lr: float = option(2e-5, "AdamW learning rate (peak, after the warm-up)")
    grad_clip: float = option(0.5, "gradient norm clip")
    batch_size: int = option(8, "crops per process and step (the global batch is this times the processes)")
    crop_depth_tokens: int = option(5, "crop depth in tokens of 16 slices (at aniso_d 0; 1 for 2D images)")
    crop_inplane_tokens: int = option(10, "crop side in tokens of 16 pixels")
    mask_ratio: float = option(0.55, "fraction of patch tokens masked per sample")
    mask_layers_from: int | None = option(None, "first block that processes mask tokens (earlier ones see only "
                                                "visible tokens); default: 0 for B, 18 for L", kind=int)
    seed: int = option(666, "seed of the weights, crops and masks")
    image_every: int = option(500, "save prediction pictures every N steps (and at the end)", resume=True)
    grad_checkpointing: bool = option(False, "recompute block activations in the backward pass (saves memory)",
                                      resume=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 < self.mask_ratio < 1, "mask_ratio", "must lie in (0, 1)", self.mask_ratio)
        _require(self.grad_clip > 0, "grad_clip", "must be positive", self.grad_clip)
        _require(self.image_every >= 1, "image_every", "must be at least 1", self.image_every)
        _require(self.mask_layers_from is None or self.mask_layers_from >= 0, "mask_layers_from",
                 "must not be negative", self.mask_layers_from)


def resume_may_change(cls: type[RunConfig]) -> frozenset[str]:
    """The fields of ``cls`` that a resumed run may set differently (declared with ``resume=True``)."""
    return frozenset(f.name for f in fields(cls) if f.metadata.get("resume"))


# --- command line ------------------------------------------------------------------------------------------------
class _DeprecatedMinLrRatio(argparse.Action):
    """``--min-lr-ratio R`` of earlier releases: sets ``--min-lr`` and ``--min-lr-disc`` to R times their lrs."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: warning: --min-lr-ratio is deprecated; use --min-lr / --min-lr-disc (absolute "
              "learning rates)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta, flag = f.metadata, _flag(f.name)
    text = meta["help"] + (" [may change on --resume]" if meta["resume"] else "")
    if f.default is MISSING:
        parser.add_argument(flag, required=True, help=text)
    elif isinstance(f.default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f"{text} (default: "
                            f"{'yes' if f.default else 'no'})")
        return
    else:
        kind = meta["type"] or type(f.default)
        parser.add_argument(flag, type=kind, default=f.default, choices=meta["choices"],
                            help=f"{text} (default: {f.default})")
    for alias in meta["aliases"]:  # hidden: old names keep working
        parser.add_argument(alias, dest=f.name, type=meta["type"] or type(f.default or ""), help=argparse.SUPPRESS)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[RunConfig]) -> None:
    """One option per field of ``cls``, plus ``--resume`` (an action of the command, not part of the recipe)."""
    for f in fields(cls):
        _add_field(parser, f)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint_latest.pth exactly (same number of "
                             "processes); options marked [may change on --resume] may differ, any other difference "
                             "is refused with the fields named")
    if "min_lr_disc" in {f.name for f in fields(cls)}:
        parser.add_argument("--min-lr-ratio", type=float, default=None, action=_DeprecatedMinLrRatio,
                            help=argparse.SUPPRESS)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The run the parsed arguments describe (``--min-lr-ratio`` of earlier releases translated)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    ratio = getattr(args, "min_lr_ratio", None)
    if ratio is not None:
        values.update(min_lr=ratio * values["lr"], min_lr_disc=ratio * values["lr_disc"])
    return cls(**values)
