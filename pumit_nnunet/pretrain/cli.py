"""``pumit-nnunet pretrain``: the pre-training sub-commands (``tokenizer``; ``mim`` when its module is installed).

Heavy imports (torch, the trainers) happen inside the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

__all__ = ["register"]

TOKENIZER_EPILOG = """\
Distributed training (DDP) goes through torchrun; every process reads its share of each global batch:
  one node, 8 GPUs:
    torchrun --standalone --nproc-per-node 8 -m pumit_nnunet.cli pretrain tokenizer --data STORE --out RUN
  two nodes (run on each, NODE_RANK 0 and 1, HOST = address of node 0):
    torchrun --nnodes 2 --node-rank NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
      --rdzv-endpoint HOST:29500 -m pumit_nnunet.cli pretrain tokenizer --data STORE --out RUN
  CPU only (gloo), 2 processes:
    torchrun --standalone --nproc-per-node 2 -m pumit_nnunet.cli pretrain tokenizer --device cpu ...
Perceptual loss (LPIPS, VGG16) weights are local files, never downloaded: --vgg16 is torchvision's ImageNet
file vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth), --lpips-lin is lpips/weights/v0.1/
vgg.pth from the lpips wheel (pip download lpips --no-deps; unzip). Or pass --no-perceptual.
Sharpening stage (the original's experiment): continue from a finished run with a negative quant weight:
  ... --init RUN/checkpoint_final.pth --quant-weight -0.1 --steps 300000 --out RUN_SHARP
--batch-size is per process. Re-run the same command with --resume to continue from RUN/checkpoint_latest.pth
exactly (model, discriminator, optimisers, scaler, RNG, sampler and the GAN gate are all restored).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain`` with its nested sub-commands to the top-level ``pumit-nnunet`` parser."""
    parser = subparsers.add_parser("pretrain", help="pre-train the visual tokenizer or the ViT (MIM)",
                                   description="Pre-training stages of PUMIT.")
    sub = parser.add_subparsers(dest="pretrain_command", metavar="STAGE")
    _register_tokenizer(sub)
    if importlib.util.find_spec("pumit_nnunet.pretrain.mim_cli") is not None:
        importlib.import_module("pumit_nnunet.pretrain.mim_cli").register_mim(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _register_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer", help="train the universal visual tokenizer (soft tokens, SAC encoder/decoder)",
        description="Train the universal visual tokenizer (paper: SPAD-VT) on a corpus store, an nnU-Net raw "
        "dataset folder or an image folder.",
        epilog=TOKENIZER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="corpus store, nnU-Net raw dataset folder or image folder")
    p.add_argument("--out", required=True, help="run folder: checkpoints, figures, history")
    p.add_argument("--config", default="base", help="tokenizer preset: base (paper), small, tiny (default: base)")
    p.add_argument("--codebook-size", type=int, default=None, help="override the preset's number of codes")
    p.add_argument("--steps", type=int, default=500_000, help="total optimisation steps (default: 500000)")
    p.add_argument("--batch-size", type=int, default=4, help="images per process and step (default: 4)")
    p.add_argument("--crop-depth-tokens", type=int, default=4, help="crop depth in tokens (default: 4)")
    p.add_argument("--crop-inplane-tokens", type=int, default=8, help="crop side in tokens, 16 px each (default: 8)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_latest.pth")
    p.add_argument("--init", default=None, help="start from the weights of a tokenizer checkpoint (e.g. sharpening)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"), help="autocast on CUDA (default bf16)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--vgg16", default=None, help="torchvision VGG16 ImageNet state dict (vgg16-397923af.pth)")
    p.add_argument("--lpips-lin", default=None, help="LPIPS linear weights (the lpips package's weights/v0.1/vgg.pth)")
    p.add_argument("--no-perceptual", action="store_true", help="train without the LPIPS loss")
    p.add_argument("--lr", type=float, default=1e-4, help="generator learning rate (default 1e-4)")
    p.add_argument("--lr-disc", type=float, default=1e-3, help="discriminator learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=25_000)
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / lr of the cosine (default 0.01)")
    p.add_argument("--quant-weight", type=float, default=0.03, help="w_quant of -H(mean p); negative sharpens")
    p.add_argument("--entropy-weight", type=float, default=1.0, help="w_ent of mean H(p_i)")
    p.add_argument("--perceptual-weight", type=float, default=2.0,
                   help="LPIPS weight (default 2: the original multiplies LPIPS by 2 inside the loss; ours does not)")
    p.add_argument("--gan-weight", type=float, default=3e-3)
    p.add_argument("--gan-threshold", type=float, default=0.025, help="GAN term on while max(EMA, last) D loss <= this")
    p.add_argument("--max-perceptual-slices", type=int, default=24)
    p.add_argument("--seed", type=int, default=2333)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--val-every", type=int, default=1000, help="figures and validation every N steps (and at the end)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--max-val-images", type=int, default=8)
    p.add_argument("--log-every", type=int, default=50, help="average the train curves over N steps (default 50)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step; resume later")
    p.set_defaults(func=_run_tokenizer)


def _run_tokenizer(args: argparse.Namespace) -> int:
    from pumit_nnunet.pretrain.tokenizer_trainer import run_from_args

    return run_from_args(args)
