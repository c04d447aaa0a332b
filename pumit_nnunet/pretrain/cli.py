"""``pumit-nnunet pretrain``: the two pre-training stages, ``tokenizer`` and ``mim``.

Both parsers are generated from the run dataclasses of :mod:`pumit_nnunet.pretrain.config` (stdlib only), so both
stages show the same option names, help style and defaults, and ``--help`` stays free of torch; the trainers are
imported only when a command runs. Errors propagate to ``pumit_nnunet.cli.main``, which prints one line.
"""

from __future__ import annotations

import argparse

from pumit_nnunet.pretrain.config import MIMTrainConfig, TokenizerTrainConfig, add_config_arguments, config_from_args

__all__ = ["register"]

_DDP = """\
Distributed training (DDP) goes through torchrun; --batch-size is per process:
  one node, 8 GPUs:
    torchrun --standalone --nproc-per-node 8 -m pumit_nnunet.cli pretrain {stage} {example} --out RUN
  two nodes (run on each, NODE_RANK 0 and 1, HOST = address of node 0):
    torchrun --nnodes 2 --node-rank NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
      --rdzv-endpoint HOST:29500 -m pumit_nnunet.cli pretrain {stage} {example} --out RUN
  CPU only (gloo), 2 processes:
    torchrun --standalone --nproc-per-node 2 -m pumit_nnunet.cli pretrain {stage} --device cpu ...
Resume: re-run the same command with --resume to continue exactly from RUN/checkpoint_latest.pth (same number of
processes; models, optimisers, schedules, scalers, RNG and sampler state are restored). Options marked
[may change on --resume] may differ; any other difference is refused with the differing fields named. --resume on a
folder without a checkpoint starts a new run and says so. --stop-at N stops after step N with a checkpoint.
"""

TOKENIZER_EPILOG = _DDP.format(stage="tokenizer", example="--data STORE") + """\
Perceptual loss (LPIPS, VGG16) weights are local files, never downloaded: --vgg16 is torchvision's ImageNet
file vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth), --lpips-lin is lpips/weights/v0.1/
vgg.pth from the lpips wheel (pip download lpips --no-deps; unzip). Or pass --no-perceptual.
Sharpening stage (the authors' experiment): continue from a finished run with a negative quant weight:
  ... --init RUN/pumit_tokenizer_final.pth --quant-weight -0.1 --steps 300000 --out RUN_SHARP
The result, RUN/pumit_tokenizer_final.pth, is what `pretrain mim --tokenizer` takes.
"""

MIM_EPILOG = _DDP.format(stage="mim", example="--data STORE --tokenizer TOK.pth --init eva02_B_pt_in21k_p14.pt") + """\
Every process draws its own crops; the token masks of the global batch are shared. Fine-tune in nnU-Net from the
result:
  nnUNetv2_train DATASET 3d_fullres 0 -tr PumitTrainer -pretrained_weights RUN/pumit_mim_final.pth
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` with its nested sub-commands to the top-level ``pumit-nnunet`` parser."""
    parser = subparsers.add_parser("pretrain", help="pre-train the visual tokenizer or the ViT (MIM)",
                                   description="Pre-training stages of PUMIT: first the tokenizer, then MIM.")
    sub = parser.add_subparsers(dest="pretrain_command", metavar="STAGE")
    _stage(sub, "tokenizer", TokenizerTrainConfig, TOKENIZER_EPILOG,
           help="train the universal visual tokenizer (soft tokens, SAC encoder/decoder)",
           description="Train the universal visual tokenizer (paper: SPAD-VT) on a corpus store, an nnU-Net raw "
           "dataset folder or an image folder.")
    _stage(sub, "mim", MIMTrainConfig, MIM_EPILOG,
           help="masked image modelling of the ViT on soft tokens (then fine-tune with PumitTrainer)",
           description="Pre-train the universal ViT (paper: SPAD-ViT) by predicting the frozen tokenizer's soft "
           "tokens at randomly masked positions (55%% by default).")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _stage(sub: argparse._SubParsersAction, name: str, config_class: type, epilog: str, **text: str) -> None:
    parser = sub.add_parser(name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **text)
    add_config_arguments(parser, config_class)
    parser.set_defaults(func=lambda args: _run(name, config_from_args(config_class, args), args.resume))


def _run(stage: str, config, resume: bool) -> int:
    if stage == "tokenizer":
        from pumit_nnunet.pretrain.tokenizer_trainer import run_tokenizer as run
    else:
        from pumit_nnunet.pretrain.mim_trainer import run_mim as run
    final = run(config, resume)
    if final is None:
        print(f"stopped at step {config.last_step()} (--stop-at); continue with --resume")
    else:
        print(f"{stage} checkpoint: {final}")
    return 0
