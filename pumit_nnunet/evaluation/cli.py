"""Sub-commands of the evaluation layer: ``evaluate``, ``convert {btcv,chaos}``, ``export {btcv,chaos}``.

Heavy imports (SimpleITK, nnU-Net, scipy) stay inside the handlers so ``pumit-nnunet --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this layer's top-level commands (one small function per command)."""
    from pumit_nnunet.evaluation.label_efficiency_cli import register_label_efficiency
    from pumit_nnunet.evaluation.medmnist_cli import register_medmnist

    _register_evaluate(subparsers)
    _register_convert(subparsers)
    _register_export(subparsers)
    register_medmnist(subparsers)
    register_label_efficiency(subparsers)


# --- evaluate ------------------------------------------------------------------------------------------------------
def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Dice, ASSD, HD, HD95, RAVD and NSD per class: a prediction folder against a label folder",
        description="Evaluate every label in LABEL_DIR against the same-named prediction in PRED_DIR (any format "
        "SimpleITK reads; integer labels, float files only when they hold exact integers). Writes metrics.json "
        "(strict JSON: a non-finite value is null with <metric>_status \"inf\" or \"nan\") and metrics.csv "
        "(inf/nan as words) into --out and prints a per-class summary; labels found in the images but not "
        "evaluated are reported.",
    )
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR")
    parser.add_argument("label_dir", type=Path, metavar="LABEL_DIR")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", type=int, nargs="+", help="foreground labels to evaluate")
    labels.add_argument("--dataset-json", type=Path, help="take labels and names from an nnU-Net dataset.json")
    parser.add_argument(
        "--nsd-tolerance", nargs="+", default=["1.0"], metavar="MM|LABEL=MM",
        help="NSD tolerance in mm: one value for all classes and/or LABEL=MM per class (default 1.0)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: PRED_DIR)")
    parser.add_argument(
        "--missing-as-empty", action="store_true",
        help="score labelled cases without a prediction as empty predictions (listed in the output); "
        "default: a missing prediction is an error",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--chaos-score", action="store_true", help="add the CHAOS challenge score per class")
    parser.add_argument(
        "--image-border-is-surface", action="store_true",
        help="count mask voxels on the image border as surface (MONAI); default: not (CHAOS evaluator)",
    )
    parser.set_defaults(func=_run_evaluate)


def parse_tolerances(items: list[str], labels: tuple[int, ...]) -> dict[int, float]:
    """``["1.0", "3=2.5"]`` -> ``{label: mm}`` for every label."""
    from pumit_nnunet.errors import UsageError

    default, per_label = 1.0, {}
    for item in items:
        try:
            if "=" in item:
                label, value = item.split("=", 1)
                per_label[int(label)] = float(value)
            else:
                default = float(item)
        except ValueError:
            raise UsageError(f"--nsd-tolerance {item!r}: expected MM or LABEL=MM") from None
    unknown = sorted(set(per_label) - set(labels))
    if unknown:
        raise UsageError(f"--nsd-tolerance names labels {unknown} that are not evaluated")
    return {label: per_label.get(label, default) for label in labels}


def _evaluation_config(args: argparse.Namespace):
    from pumit_nnunet.evaluation.evaluate import EvaluationConfig, ignore_label_of, labels_from_dataset_json

    if args.dataset_json is not None:
        labels, names = labels_from_dataset_json(args.dataset_json)
        known = ignore_label_of(args.dataset_json)
    else:
        labels, names, known = tuple(sorted(set(args.labels))), {}, ()
    tolerances = parse_tolerances(args.nsd_tolerance, labels)
    return EvaluationConfig(labels, names, tolerances, args.image_border_is_surface, args.chaos_score, known)


def _run_evaluate(args: argparse.Namespace) -> int:
    import sys

    from pumit_nnunet.evaluation.evaluate import evaluate_folders, findings, format_summary_table, write_results

    config = _evaluation_config(args)
    result = evaluate_folders(args.pred_dir, args.label_dir, config, workers=args.workers,
                              missing_as_empty=args.missing_as_empty)
    json_path, csv_path = write_results(result, args.out or args.pred_dir)
    print(format_summary_table(result))
    print(f"{len(result.cases)} cases; wrote {json_path} and {csv_path}")
    for line in findings(result):
        print(f"pumit-nnunet evaluate: warning: {line}", file=sys.stderr)
    return 0


def _add_benchmark_group(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """A top-level command whose nested sub-commands are the benchmarks (``btcv``, ``chaos``)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="BENCHMARK", required=True)


# --- convert -------------------------------------------------------------------------------------------------------
def _register_convert(subparsers: argparse._SubParsersAction) -> None:
    nested = _add_benchmark_group(subparsers, "convert", "convert a public benchmark to an nnU-Net raw dataset")
    btcv = nested.add_parser("btcv", help="BTCV abdomen (RawData layout) with SMIT / nnU-Net 5-fold / MONAI splits")
    btcv.add_argument("source", type=Path, metavar="SOURCE", help="folder holding RawData/ (or Training/, or img/)")
    _add_output_arguments(btcv, default_id=666, default_name="BTCV")
    btcv.add_argument("--copy", action="store_true", help="copy the files instead of symlinking them")
    btcv.add_argument(
        "--split", default="smit", choices=["smit", "nnunet5fold", "monai", "none"],
        help="protocol written to splits_final.json (default smit: the paper's 21/9); all go to splits/",
    )
    btcv.set_defaults(func=_run_convert_btcv)
    chaos = nested.add_parser("chaos", help="CHAOS MR (DICOM + PNG ground truth), T1-DUAL and T2-SPIR cases")
    chaos.add_argument("source", type=Path, metavar="SOURCE", help="folder holding Train_Sets/ and Test_Sets/")
    _add_output_arguments(chaos, default_id=667, default_name="CHAOS_MR")
    chaos.set_defaults(func=_run_convert_chaos)


def _add_output_arguments(parser: argparse.ArgumentParser, default_id: int, default_name: str) -> None:
    parser.add_argument("--out", type=Path, help="dataset folder (default: $nnUNet_raw/DatasetXXX_NAME)")
    parser.add_argument("--dataset-id", type=int, default=default_id, help=f"dataset id (default {default_id})")
    parser.add_argument("--name", default=default_name, help=f"dataset name (default {default_name})")


def _output_dir(args: argparse.Namespace) -> Path:
    from pumit_nnunet.evaluation.nnunet_raw import raw_dataset_dir

    return args.out if args.out is not None else raw_dataset_dir(args.dataset_id, args.name)


def _run_convert_btcv(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.btcv import convert_btcv

    split = None if args.split == "none" else args.split
    done = convert_btcv(args.source, _output_dir(args), "copy" if args.copy else "symlink", split)
    print(f"{done.dataset_dir}: {len(done.train_cases)} training, {len(done.test_cases)} test cases; "
          f"splits/{{{','.join(done.split_protocols)}}}.json; splits_final.json = {done.splits_final or 'none'}")
    return 0


def _run_convert_chaos(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.chaos import convert_chaos

    done = convert_chaos(args.source, _output_dir(args))
    print(f"{done.dataset_dir}: {len(done.train_cases)} training, {len(done.test_cases)} test cases")
    return 0


# --- export --------------------------------------------------------------------------------------------------------
def _register_export(subparsers: argparse._SubParsersAction) -> None:
    nested = _add_benchmark_group(subparsers, "export", "package predictions for a challenge leaderboard")
    btcv = nested.add_parser("btcv", help="BTCV test predictions as a flat zip of label maps")
    _add_export_arguments(btcv)
    btcv.add_argument(
        "--name-pattern", default="img{case_id}.nii.gz",
        help="file name inside the zip; {case_id} is the 4-digit id (default img{case_id}.nii.gz)",
    )
    btcv.set_defaults(func=_run_export_btcv)
    chaos = nested.add_parser("chaos", help="CHAOS MR Task 3/5 PNG submission zip")
    _add_export_arguments(chaos)
    chaos.add_argument("--tasks", type=int, nargs="+", default=[3, 5], choices=[3, 5], help="tasks (default 3 5)")
    chaos.add_argument("--cases", default="test", choices=["test", "train", "all"], help="which cases (default test)")
    chaos.set_defaults(func=_run_export_chaos)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR", help="nnUNetv2_predict output folder")
    parser.add_argument("dataset_dir", type=Path, metavar="DATASET_DIR", help="the converted nnU-Net raw dataset")
    parser.add_argument("out_zip", type=Path, metavar="OUT_ZIP")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_ZIP if it exists")


def _run_export_btcv(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.btcv import export_btcv
    from pumit_nnunet.evaluation.files import refuse_to_overwrite

    refuse_to_overwrite(args.out_zip, args.overwrite)
    names = export_btcv(args.pred_dir, args.dataset_dir, args.out_zip, args.name_pattern)
    print(f"wrote {args.out_zip}: {len(names)} test cases")
    return 0


def _run_export_chaos(args: argparse.Namespace) -> int:
    from pumit_nnunet.evaluation.chaos_export import export_chaos
    from pumit_nnunet.evaluation.files import refuse_to_overwrite

    refuse_to_overwrite(args.out_zip, args.overwrite)
    cases = export_chaos(args.pred_dir, args.dataset_dir, args.out_zip, args.tasks, args.cases)
    print(f"wrote {args.out_zip}: {len(cases)} cases, tasks {' '.join(map(str, args.tasks))}")
    return 0
