"""``pumit-nnunet demo``: PUMIT beside nnU-Net's own trainer on real CT scans, with the stock commands, on a CPU.

The task: the lung fields of a chest CT (a threshold label: air inside the body, see
``pumit_nnunet.nnunet.demo_data``), trained on one patient (``lung1``) and tested on another (``lung2``, never
seen in training). The scans are the pyradiomics 3.0.1 source distribution's, fetched once by
``pumit_nnunet.data`` (pip, cached, verified). The demo then runs nnU-Net's own commands:
``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train -tr nnUNetTrainer_demo`` (nnU-Net's default trainer and
U-Net) and ``-tr PumitTrainer_T_demo`` (the tiny PUMIT ViT) on the same plans, patch (32x64x64 on the lung task), batch (2),
iteration budget (4 epochs x 20 iterations) and seed, then ``nnUNetv2_predict`` on the held-out scan with each,
and prints one table: Dice, HD95, training and prediction time per trainer, whatever the numbers are.

  --weights FILE  also fine-tunes the PUMIT trainer from pre-trained ViT-T weights (any format
                  `pumit-nnunet weights inspect` reads; passed as nnU-Net's -pretrained_weights): one more row.
  --pretrain      first runs the PUMIT chain on the fetched unlabelled scans (corpus -> tokenizer -> MIM, tiny
                  presets, a few CPU minutes; the test patient is left out) and fine-tunes from its ViT: one more row.

Everything goes under --out (a folder this command made, or an empty one); a rerun reuses every finished step
and prints the table again. This is a CPU-minutes demonstration on two patients, not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pumit_nnunet.io import replace_folder_atomic
from pumit_nnunet.nnunet.demo_steps import DemoState, claim_out_folder, nnunet_env, run_logged

__all__ = ["register", "DemoRow", "demo_rows"]

DATASET_ID = 990
CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class DemoRow:
    """One trainer run of the table; rows of the same trainer train in different folds of identical splits."""

    key: str
    trainer: str
    fold: int
    start: str
    weights: Path | None = None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="PUMIT beside nnU-Net's default trainer on real CT scans: "
                                   "train, predict, compare (CPU minutes)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("pumit-demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="also fine-tune PumitTrainer_T_demo from these ViT-T weights")
    parser.add_argument("--pretrain", action="store_true", help="also pre-train here (corpus, tokenizer, MIM) and "
                        "fine-tune from the result")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"), help="default: %(default)s")
    # the end-to-end test's budget (1 epoch x 3 iterations); not for users
    parser.add_argument("--budget", default=os.environ.get("PUMIT_DEMO_BUDGET", "standard"),
                        choices=("standard", "quick"), help=argparse.SUPPRESS)
    parser.set_defaults(func=_run)


def demo_rows(budget: str, weights: Path | None, pretrained_here: Path | None) -> list[DemoRow]:
    """The table's rows: nnU-Net's trainer, PUMIT from scratch, then the fine-tuned PUMIT rows asked for."""
    from pumit_nnunet.nnunet.demo_trainers import demo_trainer_pair

    pumit, nnunet = demo_trainer_pair(budget)
    rows = [DemoRow("nnunet", nnunet, 0, "from scratch"), DemoRow("pumit", pumit, 0, "from scratch")]
    if weights is not None:
        rows.append(DemoRow("pumit_weights", pumit, 1, f"--weights {weights.name}", weights))
    if pretrained_here is not None:
        rows.append(DemoRow("pumit_pretrained_here", pumit, 2, "pre-trained here", pretrained_here))
    return rows


def _check_weights(weights: Path, plans_file: Path) -> None:
    """Load the weights into the demo's ViT-T before minutes of training: a wrong file fails now, in one line."""
    from pumit_nnunet.checkpoints.load import load_vit_weights
    from pumit_nnunet.models.vit import UniversalViT, vit_config
    from pumit_nnunet.nnunet.pretrained import plan_vit_config

    if not weights.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(weights))
    load_vit_weights(UniversalViT(plan_vit_config(vit_config("T"), plans_file, CONFIGURATION)), weights, log=None)


def _results_folder(out: Path, dataset: str, row: DemoRow) -> Path:
    return out / "nnUNet_results" / dataset / f"{row.trainer}__nnUNetPlans__{CONFIGURATION}" / f"fold_{row.fold}"


def _trained_patch(row: DemoRow, ctx: "_Context") -> list[int]:
    """The patch a trainer actually trained on (nnU-Net copies the adapted plans into its results folder)."""
    import json

    plans = _results_folder(ctx.out, ctx.dataset, row).parent / "plans.json"
    return json.loads(plans.read_text(encoding="utf-8"))["configurations"][CONFIGURATION]["patch_size"]


def _train(row: DemoRow, ctx: "_Context") -> None:
    from pumit_nnunet.data.cache import sha256_file
    from pumit_nnunet.errors import UsageError

    folder = _results_folder(ctx.out, ctx.dataset, row)
    recorded = ctx.state.get(row.key, "weights_sha256")
    wanted = sha256_file(row.weights) if row.weights else None
    if (folder / "checkpoint_final.pth").is_file() and ctx.state.get(row.key, "train_s") is not None:
        if recorded != wanted:
            raise UsageError(f"this folder's {row.start!r} row was trained from other weights; use a new --out", ctx.out)
        print(f"(done before: {folder / 'checkpoint_final.pth'})", flush=True)
        return
    command = ["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, str(row.fold), "-tr", row.trainer, "-device", ctx.device]
    if (folder / "checkpoint_latest.pth").is_file():
        command.append("--c")  # an interrupted run continues (its weights are in the checkpoint)
    elif row.weights is not None:
        command += ["-pretrained_weights", str(row.weights)]
    seconds = run_logged(command, nnunet_env(ctx.out, training=True), ctx.out / "logs" / f"train_{row.key}.log")
    ctx.state.set(row.key, "weights_sha256", wanted)
    ctx.state.set(row.key, "train_s", seconds)
    ctx.state.set(row.key, "predict_s", None)  # a prediction of an earlier model of this row is stale now


def _predict(row: DemoRow, ctx: "_Context") -> Path:
    """Predict the held-out scan into a partial folder that is renamed when complete (a rerun redoes a partial one)."""
    final = ctx.out / "predictions" / row.key
    if (final / f"{ctx.test_case}.nii.gz").is_file() and ctx.state.get(row.key, "predict_s") is not None:
        print(f"(done before: {final / f'{ctx.test_case}.nii.gz'})", flush=True)
        return final / f"{ctx.test_case}.nii.gz"
    partial = final.with_name(f".{row.key}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # our own leftover from an interrupted prediction
    seconds = run_logged(["nnUNetv2_predict", "-i", str(ctx.raw / "imagesTs"), "-o", str(partial), "-d",
                          str(DATASET_ID), "-c", CONFIGURATION, "-tr", row.trainer, "-f", str(row.fold),
                          "-device", ctx.device, "-npp", "1", "-nps", "1", "--disable_tta"],
                         nnunet_env(ctx.out, training=False), ctx.out / "logs" / f"predict_{row.key}.log")
    replace_folder_atomic(partial, final)  # the old prediction stays until the new one is complete
    ctx.state.set(row.key, "predict_s", seconds)
    return final / f"{ctx.test_case}.nii.gz"


@dataclass
class _Context:
    out: Path
    raw: Path
    dataset: str
    test_case: str
    device: str
    state: DemoState


def _prepare(out: Path, device: str) -> tuple[_Context, Path]:
    """Fetch the scans, write the raw dataset, plan and preprocess (each skipped when done)."""
    from pumit_nnunet.data import fetch
    from pumit_nnunet.nnunet.demo_data import LUNG_DEMO, build_lung_demo

    _header("1/4 real scans (pyradiomics 3.0.1 data, fetched once with pip, verified)")
    data = fetch("pyradiomics-data")
    print(data, flush=True)
    scans = {name: data / f"{name}_image.nrrd" for name in (LUNG_DEMO.train_scan, LUNG_DEMO.test_scan)}
    raw = build_lung_demo(scans, out / "nnUNet_raw", DATASET_ID, folds=3)
    ctx = _Context(out, raw, raw.name, LUNG_DEMO.test_scan, device, DemoState(out / "demo_state.json"))
    _header("2/4 nnUNetv2_plan_and_preprocess (stock)")
    plans = out / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json"
    if plans.is_file() and ctx.state.get("dataset", "preprocess_s") is not None:
        print(f"(done before: {plans})", flush=True)
    else:
        seconds = run_logged(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION,
                              "-np", "2", "-npfp", "2"],
                             nnunet_env(out, training=False), out / "logs" / "plan_and_preprocess.log")
        ctx.state.set("dataset", "preprocess_s", seconds)
    return ctx, data


def _header(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _report(rows: list[DemoRow], predictions: dict[str, Path], ctx: _Context, budget_note: str) -> None:
    from pumit_nnunet.nnunet.demo_report import RowResult, format_table, save_overlay_png, score_prediction

    label = ctx.raw / "labelsTs" / f"{ctx.test_case}.nii.gz"
    results = []
    for row in rows:
        dice, hd95 = score_prediction(predictions[row.key], label)
        results.append(RowResult(row.trainer, row.start, dice, hd95, ctx.state.get(row.key, "train_s"),
                                 ctx.state.get(row.key, "predict_s")))
    picture = save_overlay_png(ctx.raw / "imagesTs" / f"{ctx.test_case}_0000.nii.gz", label,
                               {f"{r.trainer}\n({r.start})": predictions[r.key] for r in rows},
                               ctx.out / "demo_overlay.png")
    print(f"\n=== held-out patient {ctx.test_case} (never seen in training): lung fields, {budget_note}")
    print(format_table(results))
    print(f"\noverlay (image, label, each prediction, same slices): {picture}")
    for row in rows:
        print(f"training curves of {row.trainer} ({row.start}): {_results_folder(ctx.out, ctx.dataset, row) / 'progress.png'}")
    print(f"logs: {ctx.out / 'logs'}\nA few CPU minutes on one training patient: a demonstration, not a benchmark.")


def _run(args: argparse.Namespace) -> int:
    from pumit_nnunet.nnunet.demo_trainers import DEMO_BUDGETS

    budget = DEMO_BUDGETS[args.budget]
    weights = args.weights.expanduser().resolve() if args.weights else None
    if weights is not None and not weights.is_file():  # before minutes of planning, not after
        raise FileNotFoundError(2, "No such file or directory", str(weights))
    out = claim_out_folder(args.out)
    ctx, data = _prepare(out, args.device)
    if weights is not None:
        _check_weights(weights, out / "nnUNet_preprocessed" / ctx.dataset / "nnUNetPlans.json")
    pretrained_here = None
    if args.pretrain:
        from pumit_nnunet.nnunet.demo_pretrain import PRETRAIN_BUDGETS, pretrain_chain

        _header("pre-training here: corpus -> tokenizer -> MIM (tiny presets)")
        pretrained_here = pretrain_chain(data, out / "pretrain", PRETRAIN_BUDGETS[args.budget], args.device)
    rows = demo_rows(args.budget, weights, pretrained_here)
    predictions = {}
    for number, row in enumerate(rows, 1):
        _header(f"3/4 [{number}/{len(rows)}] nnUNetv2_train -tr {row.trainer} ({row.start}, "
                f"{budget.total_iterations} iterations)")
        _train(row, ctx)
        _header(f"4/4 [{number}/{len(rows)}] nnUNetv2_predict -tr {row.trainer} ({row.start}) on {ctx.test_case}")
        predictions[row.key] = _predict(row, ctx)
    note = (f"same budget: {budget.epochs} epochs x {budget.iterations} iterations, patch "
            f"{'x'.join(map(str, _trained_patch(rows[1], ctx)))}, batch {budget.batch_size}, seed {budget.seed}")
    _report(rows, predictions, ctx, note)
    return 0

