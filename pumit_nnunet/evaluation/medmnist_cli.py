"""``pumit-nnunet medmnist {train,sweep,evaluate}``: MedMNIST-3D fine-tuning, the lr sweep, and evaluation.

torch is imported inside the handlers so that ``pumit-nnunet --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pumit_nnunet.io import write_text_atomic  # stdlib only

__all__ = ["register_medmnist", "add_command_group"]

DATASETS = ("organ", "nodule", "adrenal", "fracture", "vessel", "synapse")


def add_command_group(subparsers: argparse._SubParsersAction, name: str, help: str, description: str) -> argparse._SubParsersAction:
    """A top-level command whose actions are nested sub-commands (one of them is required)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    return parser.add_subparsers(dest=f"{name.replace('-', '_')}_command", metavar="ACTION", required=True)


def register_medmnist(subparsers: argparse._SubParsersAction) -> None:
    """Add ``medmnist`` with its nested ``train``, ``sweep`` and ``evaluate`` commands."""
    nested = add_command_group(
        subparsers, "medmnist", "MedMNIST-3D classification: fine-tune, sweep the learning rate, evaluate",
        "Fine-tune the PUMIT classifier (CLS token -> linear head, whole model trained) on an official MedMNIST-3D "
        ".npz file that you downloaded yourself; AUC and ACC as the official evaluator computes them.",
    )
    train = nested.add_parser("train", help="one fine-tuning run (resumable)")
    _add_training_arguments(train)
    train.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    train.set_defaults(func=_run_train)
    sweep = nested.add_parser("sweep", help="one run per learning rate, then a table selected on validation AUC")
    _add_training_arguments(sweep)
    sweep.add_argument("--lrs", type=float, nargs="+", help="learning rates (default: the authors' 5e-7 ... 5e-4)")
    sweep.set_defaults(func=_run_sweep)
    evaluate = nested.add_parser("evaluate", help="AUC/ACC of a fine-tuned classifier on one split")
    evaluate.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="checkpoint_best.pt of a run")
    evaluate.add_argument("--npz", type=Path, required=True, help="the official .npz file")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default test)")
    evaluate.add_argument("--scores-csv", type=Path, help="also write the scores as the official evaluator's CSV")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    evaluate.set_defaults(func=_run_evaluate)


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--npz", type=Path, required=True, help="official file, e.g. organmnist3d.npz (28^3) or _64")
    parser.add_argument("--dataset", required=True, help=f"dataset: {', '.join(DATASETS)} (or e.g. organmnist3d)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes it)")
    parser.add_argument("--pretrained", type=Path, help="backbone weights: PUMIT, EVA-02 or our checkpoint")
    parser.add_argument("--allow-partial", action="store_true", help="load the backbone even if keys are missing")
    parser.add_argument("--vit-size", default="B", help="ViT preset T, S, B or L (default B)")
    parser.add_argument("--input-size", type=int, default=160, help="cube edge after trilinear resizing (default 160)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    parser.add_argument("--milestones", type=int, nargs="*", default=[50, 75], help="lr x0.1 epochs (default 50 75)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--shape-transform", action="store_true",
                        help="the authors' intensity augmentation for adrenal and vessel (x U(0,1) train, x0.5 eval)")
    parser.add_argument("--seed", type=int, default=3407, help="seed (default 3407)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap the iterations per epoch (smoke runs)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations (less memory)")


def _config(args: argparse.Namespace, out_dir: Path, lr: float) -> Any:
    from pumit_nnunet.evaluation.medmnist_train import FinetuneConfig

    return FinetuneConfig(
        npz=str(args.npz), dataset=args.dataset, out_dir=str(out_dir), lr=lr,
        pretrained=str(args.pretrained) if args.pretrained else None, allow_partial=args.allow_partial,
        vit_size=args.vit_size, input_size=args.input_size, epochs=args.epochs, milestones=tuple(args.milestones),
        batch_size=args.batch_size, eval_batch_size=args.batch_size, weight_decay=args.weight_decay,
        shape_transform=args.shape_transform, seed=args.seed, device=args.device,
        max_steps_per_epoch=args.max_steps_per_epoch, grad_checkpointing=args.grad_checkpointing,
    )


def _run_train(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.medmnist_train import finetune

    result = finetune(_config(args, args.out, args.lr))
    print(f"best epoch {result.best_epoch}: val AUC {result.val.auc:.4f} ACC {result.val.acc:.4f}; "
          f"test AUC {result.test.auc:.4f} ACC {result.test.acc:.4f}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.medmnist_train import PAPER_LRS, run_sweep

    lrs = list(args.lrs or PAPER_LRS)
    chosen, csv_path, md_path = run_sweep(_config(args, args.out, lrs[0]), lrs, args.out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"selected lr {chosen.lr:g}; wrote {csv_path} and {md_path}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from pumit_nnunet.evaluation.medmnist import load_medmnist
    from pumit_nnunet.evaluation.medmnist_metrics import medmnist_metrics
    from pumit_nnunet.evaluation.medmnist_train import eval_intensity_scale, load_classifier, predict_scores

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, extra = load_classifier(args.checkpoint, device)
    split = load_medmnist(args.npz, [args.split])[args.split]
    scale = eval_intensity_scale(bool(extra.get("shape_transform")))
    scores = predict_scores(model, split, extra["task"], extra["input_size"], intensity_scale=scale)
    metrics = medmnist_metrics(split.labels, scores, extra["task"])
    if args.scores_csv:
        rows = [",".join([str(i), *(repr(float(v)) for v in row)]) for i, row in enumerate(np.atleast_2d(scores))]
        write_text_atomic(args.scores_csv, "\n".join(rows) + "\n")
    print(f"{extra['dataset']} {args.split}: AUC {metrics.auc:.4f} ACC {metrics.acc:.4f}")
    return 0
