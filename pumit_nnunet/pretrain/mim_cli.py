"""``pumit-nnunet pretrain mim``: masked image modelling of the universal ViT on the frozen tokenizer's soft tokens.

The run's boundary dataclass, :class:`MIMTrainConfig`, lives here (stdlib only) so that the parser takes its
options, types, defaults (the paper's ViT-B recipe) and help from it without importing torch; the trainer
(:mod:`pumit_nnunet.pretrain.mim_trainer`) is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

__all__ = ["MIMTrainConfig", "register_mim", "config_from_args"]

MIM_EPILOG = """\
Distributed training (DDP) goes through torchrun; --batch-size is per process, and every process draws its own
crops while the token masks of the global batch are shared:
  one node, 8 GPUs:
    torchrun --standalone --nproc-per-node 8 -m pumit_nnunet.cli pretrain mim --data STORE --tokenizer TOK.pth \\
      --init eva02_B_pt_in21k_p14.pt --out RUN
  two nodes (run on each, NODE_RANK 0 and 1, HOST = address of node 0):
    torchrun --nnodes 2 --node-rank NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
      --rdzv-endpoint HOST:29500 -m pumit_nnunet.cli pretrain mim --data STORE --tokenizer TOK.pth --out RUN
  CPU only (gloo), 2 processes:
    torchrun --standalone --nproc-per-node 2 -m pumit_nnunet.cli pretrain mim --device cpu ...
Re-run the same command with --resume to continue exactly from RUN/checkpoint_latest.pth (same number of
processes). Fine-tune in nnU-Net from the result:
  nnUNetv2_train DATASET 3d_fullres 0 -tr PumitTrainer -pretrained_weights RUN/pumit_mim_final.pth
"""

def _opt(default=MISSING, help: str = "", kind: type | None = None):
    """A config field whose command-line help (and, for ``None`` defaults, value type) sits next to it."""
    return field(default=default, metadata={"help": help, "type": kind})


@dataclass
class MIMTrainConfig:
    """Everything a MIM run is made of (recorded in its checkpoints). Defaults are the paper's ViT-B recipe."""

    data: str = _opt(help="corpus store, nnU-Net raw dataset folder or image folder (raw data is converted "
                          "into OUT/corpus)")
    out: str = _opt(help="run folder: checkpoints, progress.png, pictures/")
    tokenizer: str = _opt(help="frozen tokenizer checkpoint (from `pumit-nnunet pretrain tokenizer`)")
    vit: str = _opt("B", "ViT size: T, S, B (paper), L")
    init: str | None = _opt(None, "initial weights: EVA-02 2D MIM file (eva02_B_pt_in21k_p14.pt), a PUMIT or "
                                  "our checkpoint; omitted: from scratch", str)
    steps: int = _opt(300_000, "total optimisation steps")
    warmup_steps: int = _opt(10_000, "linear warm-up steps before the cosine decay")
    lr: float = _opt(2e-5, "AdamW learning rate")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = _opt(0.05, "AdamW weight decay (none on biases, norms, tokens, position embeddings)")
    grad_clip: float = _opt(0.5, "gradient norm clip")
    batch_size: int = _opt(8, "crops per process and step")
    crop_depth_tokens: int = _opt(5, "crop depth in tokens (at aniso_d 0; 1 for 2D images)")
    crop_inplane_tokens: int = _opt(10, "crop side in tokens of 16 pixels")
    mask_ratio: float = _opt(0.55, "fraction of patch tokens masked per sample")
    mask_layers_from: int | None = _opt(None, "first block that processes mask tokens (earlier ones see only "
                                              "visible tokens); default: 0 for B, 18 for L", int)
    precision: str = _opt("bf16", "autocast on CUDA: bf16, fp16 or fp32 (CPU runs are fp32)")
    device: str | None = _opt(None, "cpu, cuda or cuda:N (default: cuda when available)", str)
    seed: int = _opt(666, "seed of the weights, crops and masks")
    num_workers: int = _opt(0, "loader worker processes")
    log_every: int = _opt(10, "record curves every N steps")
    ckpt_every: int = _opt(1000, "checkpoint every N steps (and at the end)")
    image_every: int = _opt(500, "save prediction pictures every N steps (and at the end)")
    grad_checkpointing: bool = _opt(False, "recompute block activations in the backward pass (saves memory)")
    augment: bool = _opt(True, "augment crops (scale, flips, intensity)")


def _add_field(parser: argparse.ArgumentParser, f) -> None:
    flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"]
    if f.default is MISSING:
        parser.add_argument(flag, required=True, help=text)
    elif isinstance(f.default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
    else:
        kind = f.metadata["type"] or type(f.default)
        parser.add_argument(flag, type=kind, default=f.default, help=f"{text} (default: {f.default})")


def register_mim(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mim`` to the ``pumit-nnunet pretrain`` sub-commands."""
    parser = subparsers.add_parser(
        "mim", help="masked image modelling of the ViT on soft tokens (then fine-tune with PumitTrainer)",
        description="Pre-train the universal ViT (paper: SPAD-ViT) by predicting the frozen tokenizer's soft "
        "tokens at 55%% randomly masked positions.",
        epilog=MIM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(MIMTrainConfig):
        _add_field(parser, f)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_latest.pth")
    parser.set_defaults(func=_run_mim)


def config_from_args(args: argparse.Namespace):
    """The ``MIMTrainConfig`` the parsed arguments describe."""
    return MIMTrainConfig(**{f.name: getattr(args, f.name) for f in fields(MIMTrainConfig)})


def _run_mim(args: argparse.Namespace) -> int:
    import sys

    from pumit_nnunet.pretrain.mim_trainer import run_mim

    try:
        final = run_mim(config_from_args(args), resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as error:  # bad paths, files or sizes: no traceback
        print(f"pumit-nnunet pretrain mim: error: {error}", file=sys.stderr)
        return 2
    print(f"MIM checkpoint (fine-tune with -pretrained_weights): {final}")
    return 0
