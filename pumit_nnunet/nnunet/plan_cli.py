"""``pumit-nnunet plan``: run the PUMIT planner (and optionally nnU-Net's preprocessing) for one dataset.

nnU-Net's ``-pl`` only finds planners inside its own package, so this command hands
:class:`~pumit_nnunet.nnunet.planner.PumitPlanner` to ``plan_experiment_dataset`` itself. nnU-Net reads its
folders from the environment when it is imported; the checks below read the same variables.
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from pumit_nnunet.errors import UsageError

__all__ = ["register_plan", "find_dataset", "PlanError"]

DEFAULT_PLANS = "PumitPlans"
#: the trainer whose backbone is the ViT size the plans were made for
TRAINER_FOR_VIT = {"T": "PumitTrainer_T", "S": "PumitTrainer_S", "B": "PumitTrainer", "L": "PumitTrainer_L"}


class PlanError(UsageError):
    """A problem with the user's input: ``main()`` prints it in one line (exit 2)."""


def register_plan(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-parser."""
    from pumit_nnunet.nnunet.presets import preset_help

    parser = subparsers.add_parser(
        "plan", help="plan (and preprocess) an nnU-Net dataset for PumitTrainer: token-aligned patches, token memory model",
        description="Writes nnUNet_preprocessed/DatasetXXX/<plans name>.json with PUMIT configurations, then prints the "
        "nnUNetv2_train/nnUNetv2_predict commands. Presets: btcv, chaos, pretraining-match or a preset .json file.",
        epilog=preset_help(), formatter_class=argparse.RawDescriptionHelpFormatter,  # the presets' recipes, as written
    )
    parser.add_argument("-d", "--dataset", required=True, help="dataset id (950) or name (Dataset950_Name)")
    parser.add_argument("-c", "--configurations", nargs="+", default=None, metavar="CFG",
                        help="configurations to preprocess and print commands for (default: 3d_fullres and 2d, "
                        "those the dataset has)")
    parser.add_argument("--vit", default="B", help="ViT size the memory model plans for: T, S, B (default), L")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GPU memory budget of one training process in GiB (default: $PUMIT_GPU_MEMORY_GB, else "
                        "nnU-Net's reference 8); over budget the planner enables activation checkpointing, then shrinks "
                        "the patch")
    parser.add_argument("--decoder", choices=("authors", "lite"), default="authors",
                        help="decoder widths: authors (default; 512 channels at 1/16 and 1/32, as the PUMIT code) or "
                        "lite (nnU-Net's widths capped at 320; a deliberate difference from the authors, less memory)")
    parser.add_argument("--plans-name", default=None, help=f"plans name (default {DEFAULT_PLANS}, or the preset's)")
    spacing = parser.add_mutually_exclusive_group()
    spacing.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                         help="fixed target spacing D H W in nnU-Net's axis order (depth first for NIfTI)")
    spacing.add_argument("--spacing-mode", choices=("default", "fixed"), default=None,
                         help="default: nnU-Net's median-based spacing (overrides a preset's); fixed: the preset's")
    parser.add_argument("--preset", default=None, help="btcv, chaos, pretraining-match or a preset .json file")
    parser.add_argument("--preprocess", action="store_true", help="run nnU-Net's preprocessing for these plans")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="processes for fingerprint/preprocessing")
    parser.set_defaults(func=_plan)


def _folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise PlanError(f"{variable} is not set; nnU-Net needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    return Path(value)


def find_dataset(raw: Path, dataset: str) -> tuple[int, str]:
    """``(id, DatasetXXX_Name)`` of a dataset id or name in the nnU-Net raw folder."""
    text = dataset.strip()
    if text.startswith("Dataset") and "_" in text:
        text = text[len("Dataset"):].split("_", 1)[0]
    if not text.isdigit():
        raise PlanError(f"dataset {dataset!r} is neither an id (950) nor a name (Dataset950_Name)")
    matches = sorted(p.name for p in raw.glob(f"Dataset{int(text):03d}_*") if p.is_dir())
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)} ({', '.join(matches)})"
        raise PlanError(f"dataset {dataset}: {found} matching folders Dataset{int(text):03d}_* in nnUNet_raw={raw}")
    if not (raw / matches[0] / "dataset.json").is_file():
        raise PlanError(f"{raw / matches[0] / 'dataset.json'} is missing: not an nnU-Net raw dataset")
    return int(text), matches[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PlanError(f"{path} is not valid JSON: {error}") from None


def _check_inputs(args: argparse.Namespace):
    from pumit_nnunet.nnunet.presets import PresetError, load_preset, resolve_spacing

    try:
        preset = load_preset(args.preset) if args.preset else None
        spacing = resolve_spacing(args.spacing, args.spacing_mode, preset)
    except PresetError as error:
        raise PlanError(str(error)) from None
    if args.vit not in TRAINER_FOR_VIT:
        raise PlanError(f"unknown ViT size {args.vit!r}; choose T, S, B or L")
    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory-gb must be positive, got {args.gpu_memory_gb}")
    raw, preprocessed = _folder("nnUNet_raw"), _folder("nnUNet_preprocessed")
    dataset_id, name = find_dataset(raw, str(args.dataset))
    dataset_json = _read_json(raw / name / "dataset.json")
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if preset is not None and preset.channels is not None and preset.channels != channels:
        raise PlanError(f"preset {preset.name} expects {preset.channels} input channel(s); {name} has {channels}")
    fingerprint = preprocessed / name / "dataset_fingerprint.json"
    if fingerprint.is_file():
        _read_json(fingerprint)
    plans_name = args.plans_name or (preset.plans_name if preset and preset.plans_name else DEFAULT_PLANS)
    return preset, spacing, dataset_id, name, plans_name, fingerprint


def _fingerprint(dataset_id: int, fingerprint: Path, num_processes: int) -> None:
    if fingerprint.is_file():
        return
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset

    print(f"No fingerprint at {fingerprint}: extracting it (and checking the raw dataset) ...")
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=True)


def _preprocess(dataset_id: int, name: str, plans_name: str, plans: dict, configurations: list[str], num_processes: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    from pumit_nnunet.nnunet.planner import STOCK_PLANS

    todo = []
    for configuration in configurations:
        identifier = plans["configurations"][configuration]["data_identifier"]
        folder = _folder("nnUNet_preprocessed") / name / identifier
        if identifier.startswith(f"{STOCK_PLANS}_") and _complete(folder, plans):
            print(f"{configuration}: reusing nnU-Net's preprocessed data in {folder} (same spacing and normalisation)")
        else:
            todo.append(configuration)
    if todo:
        preprocess_dataset(dataset_id, plans_name, todo, [num_processes] * len(todo))


def _complete(folder: Path, plans: dict) -> bool:
    """Every training case of the raw dataset has a preprocessed properties file in ``folder``."""
    raw = _folder("nnUNet_raw") / plans["dataset_name"]
    dataset = _read_json(raw / "dataset.json")
    return folder.is_dir() and len(list(folder.glob("*.pkl"))) >= int(dataset.get("numTraining", 1 << 30))


def _summary(dataset_id: int, plans_name: str, plans: dict, configurations: list[str], plans_file: Path, vit: str) -> None:
    from pumit_nnunet.nnunet.planner import PLANNER_KEY
    from pumit_nnunet.nnunet.presets import predict_options, protocol_from_plans

    print(f"\nPUMIT plans: {plans_file}")
    for configuration in configurations:
        c = plans["configurations"][configuration]
        info = c.get(PLANNER_KEY)
        if info is None:  # e.g. 3d_cascade_fullres inherits its settings
            print(f"  {configuration}: {json.dumps(c)}")
            continue
        print(f"  {configuration}: spacing {c['spacing']} (aniso_d {info['aniso_d']}), patch {c['patch_size']} "
              f"({info['tokens']} tokens), batch {c['batch_size']}, ~{info['estimated_memory_gb']} GiB with ViT-{info['vit']} "
              f"(activation checkpointing {info.get('activation_checkpointing', 'none')!r}, budget "
              f"{info['gpu_memory_target_gb']:g} GiB), normalisation {c['normalization_schemes']}, data {c['data_identifier']}")
        for step in info.get("memory_fit", []):
            print(f"    memory fit: {step}")
    print("\nTrain and predict with the stock nnU-Net commands:")
    trainer = TRAINER_FOR_VIT[vit]
    for configuration in configurations:
        protocol = protocol_from_plans(plans["configurations"][configuration])
        print(f"  nnUNetv2_train {dataset_id} {configuration} 0 -tr {trainer} -p {plans_name}")
        predict = ["nnUNetv2_predict", "-i", "INPUT_FOLDER", "-o", "OUTPUT_FOLDER", "-d", str(dataset_id), "-c",
                   configuration, "-tr", trainer, "-p", plans_name, "-f", "0", *predict_options(protocol)]
        print(f"  {' '.join(predict)}")
        if protocol is not None:
            print(f"    protocol: {protocol.iterations} iterations ({protocol.epochs} epochs x {protocol.iterations_per_epoch}), "
                  f"lr {protocol.learning_rate:g}, warm-up {protocol.warmup_iterations}, {protocol.schedule} decay; "
                  f"Gaussian sliding window (step {protocol.sliding_window_step_size:g}), "
                  f"{'8-flip' if protocol.mirroring_tta else 'no'} TTA; model selection: {protocol.model_selection}")


def _plan(args: argparse.Namespace) -> int:
    from pumit_nnunet.nnunet.memory_fit import gpu_budget_gb

    preset, spacing, dataset_id, name, plans_name, fingerprint = _check_inputs(args)
    budget, source = gpu_budget_gb(args.gpu_memory_gb)
    _fingerprint(dataset_id, fingerprint, args.num_processes)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset

    from pumit_nnunet.nnunet.planner import PumitPlanner

    planner = partial(PumitPlanner, vit=args.vit, preset=preset, budget_source=source,
                      arch_overrides={"decoder": "lite"} if args.decoder == "lite" else None)
    try:
        plans, _ = plan_experiment_dataset(dataset_id, planner, gpu_memory_target_in_gb=budget,
                                           overwrite_target_spacing=spacing, overwrite_plans_name=plans_name)
    except ValueError as error:
        raise PlanError(str(error)) from None
    plans_file = _folder("nnUNet_preprocessed") / name / f"{plans_name}.json"
    plans = _read_json(plans_file)
    configurations = args.configurations or [c for c in ("3d_fullres", "2d") if c in plans["configurations"]]
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise PlanError(f"configurations {missing} were not planned for {name} (planned: {sorted(plans['configurations'])})")
    if args.preprocess:
        _preprocess(dataset_id, name, plans_name, plans, configurations, args.num_processes)
    _summary(dataset_id, plans_name, plans, configurations, plans_file, args.vit)
    return 0
