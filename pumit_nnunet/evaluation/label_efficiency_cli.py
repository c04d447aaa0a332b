"""``pumit-nnunet label-efficiency {splits,run,report}``: nested training subsets, the runs, the table and plot."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pumit_nnunet.evaluation.medmnist_cli import add_command_group

__all__ = ["register_label_efficiency"]


def register_label_efficiency(subparsers: argparse._SubParsersAction) -> None:
    """Add ``label-efficiency`` with its nested ``splits``, ``run`` and ``report`` commands."""
    nested = add_command_group(
        subparsers, "label-efficiency", "train on 20-100%% of the training cases, scratch vs pre-trained; table and plot",
        "Nested subsets of one fold's training cases become extra folds of splits_final.json; the stock "
        "nnUNetv2_train / nnUNetv2_predict commands run each (arm, fraction); Dice/ASSD/HD are tabulated and plotted.",
    )
    splits = nested.add_parser("splits", help="append the label-efficiency folds to splits_final.json")
    splits.add_argument("dataset", metavar="DATASET", help="dataset id or DatasetXXX_Name")
    splits.add_argument("--fold", type=int, default=0, help="base fold whose training cases are subsampled (default 0)")
    splits.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0],
                        help="fractions of the training cases (default 0.2 0.4 0.6 0.8 1.0)")
    splits.add_argument("--seed", type=int, default=0, help="seed of the case order (default 0)")
    splits.add_argument("--arms", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    splits.add_argument("--overwrite", action="store_true", help="replace label-efficiency folds made with other settings")
    splits.set_defaults(func=_run_splits)
    run = nested.add_parser("run", help="train, predict and evaluate every (arm, fraction) not done yet, then report")
    run.add_argument("dataset", metavar="DATASET", help="dataset id or DatasetXXX_Name")
    run.add_argument("--out", type=Path, required=True, help="folder for predictions, metrics and the report")
    run.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    run.add_argument("-tr", "--trainer", default="PumitTrainer", help="trainer class (default PumitTrainer)")
    run.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    run.add_argument("--pretrained-weights", help="weights for the pre-trained arm (-pretrained_weights)")
    run.add_argument("--device", default="cuda", help="cuda, cpu or mps (default cuda)")
    run.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint to predict with")
    run.add_argument("--step-size", type=float, help="sliding-window step (0.25 = the paper's overlap 0.75)")
    run.add_argument("--disable-tta", action="store_true", help="no mirroring at test time")
    run.add_argument("--test-images", type=Path, help="input folder (default: the base fold's validation cases)")
    run.add_argument("--test-labels", type=Path, help="reference labels (default: the raw dataset's labelsTr)")
    run.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    run.set_defaults(func=_run_runs)
    report = nested.add_parser("report", help="label_efficiency.{csv,md,png} from the runs' metrics")
    report.add_argument("dataset", metavar="DATASET", help="dataset id or DatasetXXX_Name")
    report.add_argument("--out", type=Path, required=True, help="the folder given to 'run'")
    report.set_defaults(func=_run_report)


def _run_splits(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.label_efficiency import nnunet_folder, write_label_efficiency_splits

    folder = nnunet_folder("nnUNet_preprocessed", args.dataset)
    done = write_label_efficiency_splits(folder, args.fold, args.fractions, args.seed, args.arms, args.overwrite)
    for run in done["runs"]:
        print(f"fold {run.fold}: {run.arm:<10} {run.fraction:>4.0%}  {run.n_train} training cases")
    print(f"wrote {folder / 'splits_final.json'} and {folder / 'label_efficiency.json'}")
    return 0


def _run_runs(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation import label_efficiency as le

    preprocessed = le.nnunet_folder("nnUNet_preprocessed", args.dataset)
    raw = le.nnunet_folder("nnUNet_raw", preprocessed.name)
    manifest = le.read_manifest(preprocessed)
    test_images = args.test_images or le.link_validation_images(
        raw, le.held_out_cases(manifest, preprocessed), args.out / "test_images")
    settings = le.RunnerSettings(
        args.dataset, args.out, args.configuration, args.trainer, args.plans, args.pretrained_weights, args.device,
        args.checkpoint, args.step_size, args.disable_tta,
    )
    results = Path(os.environ.get("nnUNet_results", "")) / preprocessed.name
    steps = le.plan_steps(settings, manifest, results, test_images)
    ending = json.loads((raw / "dataset.json").read_text(encoding="utf-8"))["file_ending"]
    le.run_steps(steps, args.test_labels or raw / "labelsTr", raw / "dataset.json", dry_run=args.dry_run,
                 cases=le.cases_of_images(test_images, ending))
    if not args.dry_run:
        _print_report(le.write_report(args.out, manifest["runs"]))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.label_efficiency import nnunet_folder, read_manifest, write_report

    manifest = read_manifest(nnunet_folder("nnUNet_preprocessed", args.dataset))
    _print_report(write_report(args.out, manifest["runs"]))
    return 0


def _print_report(paths: tuple[Path, Path, Path]) -> None:
    print(paths[1].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(map(str, paths))}")
