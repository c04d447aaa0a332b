"""Label efficiency: the segmentation protocol trained on 20/40/60/80/100% of the training cases, scratch vs pre-trained.

1. **Splits.** The training cases of one fold of the dataset's ``splits_final.json`` are shuffled once (seeded); the
   first ``round(f * n)`` of that order form the subset for fraction ``f``, so the subsets are nested. Each
   (arm, fraction) becomes an extra fold appended to ``splits_final.json`` with the base fold's validation cases;
   the original folds keep their indices. Scratch and pre-trained runs get separate folds because the stock
   ``nnUNetv2_train`` writes a fold's results to ``<trainer>__<plans>__<configuration>/fold_N`` whatever the weights.
   ``label_efficiency.json`` beside it records which fold is which.
2. **Runs.** The stock ``nnUNetv2_train`` (with ``-pretrained_weights`` for the pre-trained arm) and
   ``nnUNetv2_predict`` commands, printed and executed; finished steps are skipped, interrupted training continues
   with ``--c``. Predictions are evaluated with :mod:`pumit_nnunet.evaluation.evaluate` (physical units).
3. **Report.** Dice, ASSD and HD (foreground mean of the per-class means) per arm and fraction: CSV, markdown, plot.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import null_to_nonfinite, write_json_atomic, write_text_atomic
from pumit_nnunet.evaluation.nnunet_raw import Fold, check_folds, write_splits

__all__ = ["FRACTIONS", "ARMS", "MANIFEST", "subset_size", "nested_subsets", "LabelEfficiencyRun",
           "label_efficiency_folds", "write_label_efficiency_splits", "nnunet_folder", "read_manifest", "RunnerSettings", "RunStep",
           "plan_steps", "run_steps", "cases_of_images", "held_out_cases", "link_validation_images", "collect_rows", "report_tables", "plot_label_efficiency", "write_report"]

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
ARMS = ("scratch", "pretrained")
MANIFEST = "label_efficiency.json"
BACKUP = "splits_final.before_label_efficiency.json"
REPORT_METRICS = ("dice", "assd", "hd")


def subset_size(n_cases: int, fraction: float) -> int:
    """``round(fraction * n)`` (halves up), at least one case, at most all."""
    if not 0 < fraction <= 1:
        raise UsageError(f"fraction {fraction} must lie in (0, 1]")
    return min(max(math.floor(fraction * n_cases + 0.5), 1), n_cases)


def nested_subsets(cases: Sequence[str], fractions: Sequence[float], seed: int = 0) -> dict[float, list[str]]:
    """Seeded nested subsets: one shuffled order of the (sorted) cases, each fraction takes a prefix of it."""
    if not cases:
        raise DataError("no training cases to subsample")
    order = [sorted(cases)[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    return {f: sorted(order[: subset_size(len(cases), f)]) for f in fractions}


@dataclass(frozen=True)
class LabelEfficiencyRun:
    """One extra fold: which arm and fraction it serves, and how many training cases it has."""

    arm: str
    fraction: float
    fold: int
    n_train: int


def label_efficiency_folds(base_folds: Sequence[Fold], base_fold: int, fractions: Sequence[float], seed: int,
                           arms: Sequence[str] = ARMS) -> tuple[list[Fold], list[LabelEfficiencyRun]]:
    """The base folds followed by one fold per (arm, fraction), and the runs describing them."""
    if not 0 <= base_fold < len(base_folds):
        raise UsageError(f"fold {base_fold} does not exist; the splits have {len(base_folds)} folds")
    unknown = set(arms) - set(ARMS)
    if unknown or not arms:
        raise UsageError(f"arms must be among {ARMS}, got {list(arms)}")
    base = base_folds[base_fold]
    subsets = nested_subsets(base["train"], sorted(set(fractions)), seed)
    folds, runs = [dict(f) for f in base_folds], []
    for arm in arms:
        for fraction, train in subsets.items():
            runs.append(LabelEfficiencyRun(arm, fraction, len(folds), len(train)))
            folds.append({"train": train, "val": list(base["val"])})
    return folds, runs


def nnunet_folder(variable: str, dataset: str) -> Path:
    """``$variable/DatasetXXX_Name`` for a dataset given by id (``"4"``, ``"004"``) or full name (read at call time)."""
    root = os.environ.get(variable)
    if not root:
        raise UsageError(f"{variable} is not set: export the nnU-Net folders first")
    if not dataset.isdigit():
        return Path(root) / dataset
    hits = sorted(Path(root).glob(f"Dataset{int(dataset):03d}_*"))
    if len(hits) != 1:
        raise DataError(f"{'no' if not hits else 'several'} Dataset{int(dataset):03d}_* folders", root)
    return hits[0]


def read_manifest(preprocessed_dataset_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(preprocessed_dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError("not found: run 'pumit-nnunet label-efficiency splits' first", path)
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["runs"] = [LabelEfficiencyRun(**run) for run in manifest["runs"]]
    return manifest


def _read_splits(path: Path) -> list[Fold]:
    if not path.is_file():
        raise DataError(f"{path} not found: give the dataset a splits_final.json (nnUNetv2_train writes the "
                                "default 5-fold one on its first run, or copy your own there)")
    return json.loads(path.read_text(encoding="utf-8"))


def write_label_efficiency_splits(preprocessed_dataset_dir: str | os.PathLike, base_fold: int = 0,
                                  fractions: Sequence[float] = FRACTIONS, seed: int = 0,
                                  arms: Sequence[str] = ARMS, overwrite: bool = False) -> dict[str, Any]:
    """Append the label-efficiency folds to ``splits_final.json`` (original kept as a backup) and write the manifest.

    Re-running with the same settings changes nothing; other settings would re-define folds that may already have
    been trained, so they are refused unless ``overwrite``.
    """
    folder = Path(preprocessed_dataset_dir)
    splits_path = folder / "splits_final.json"
    splits = _read_splits(splits_path)
    previous = json.loads((folder / MANIFEST).read_text(encoding="utf-8")) if (folder / MANIFEST).is_file() else None
    base_folds = splits[: previous["n_base_folds"]] if previous else splits
    folds, runs = label_efficiency_folds(base_folds, base_fold, fractions, seed, arms)
    check_folds(folds, sorted({c for f in base_folds for c in (*f["train"], *f["val"])}))
    if previous and folds != splits and not overwrite:
        raise UsageError(f"{splits_path} already holds label-efficiency folds made with other settings "
                              f"(see {folder / MANIFEST}); pass overwrite to replace them")
    if not (folder / BACKUP).exists():
        write_splits(folder / BACKUP, base_folds)
    if folds != splits:
        write_splits(splits_path, folds)
    manifest = {"base_fold": base_fold, "n_base_folds": len(base_folds), "fractions": sorted(set(fractions)),
                "seed": seed, "arms": list(arms), "runs": [asdict(r) for r in runs]}
    write_json_atomic(folder / MANIFEST, manifest)
    return {**manifest, "runs": runs, "folds": folds}


# --- runner ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunnerSettings:
    """How to train and predict each run with the stock nnU-Net commands."""

    dataset: str
    out_dir: Path
    configuration: str = "3d_fullres"
    trainer: str = "PumitTrainer"
    plans: str = "nnUNetPlans"
    pretrained_weights: str | None = None
    device: str = "cuda"
    checkpoint: str = "checkpoint_final.pth"
    step_size: float | None = None
    disable_tta: bool = False


@dataclass(frozen=True)
class RunStep:
    """Train, predict and evaluate one (arm, fraction)."""

    run: LabelEfficiencyRun
    train: list[str]
    predict: list[str]
    fold_dir: Path
    model_file: Path
    pred_dir: Path
    metrics_dir: Path


def run_dir(out_dir: Path, arm: str, fraction: float) -> Path:
    return Path(out_dir) / arm / f"{round(fraction * 100):03d}pct"


def _train_command(s: RunnerSettings, run: LabelEfficiencyRun) -> list[str]:
    cmd = ["nnUNetv2_train", s.dataset, s.configuration, str(run.fold), "-tr", s.trainer, "-p", s.plans, "-device", s.device]
    if run.arm == "pretrained":
        if not s.pretrained_weights:
            raise UsageError("the pre-trained arm needs pretrained weights (--pretrained-weights)")
        cmd += ["-pretrained_weights", str(s.pretrained_weights)]
    return cmd


def _predict_command(s: RunnerSettings, run: LabelEfficiencyRun, test_images: Path, pred_dir: Path) -> list[str]:
    cmd = ["nnUNetv2_predict", "-i", str(test_images), "-o", str(pred_dir), "-d", s.dataset, "-c", s.configuration,
           "-f", str(run.fold), "-tr", s.trainer, "-p", s.plans, "-chk", s.checkpoint, "-device", s.device]
    cmd += ["-step_size", str(s.step_size)] if s.step_size is not None else []
    return cmd + (["--disable_tta"] if s.disable_tta else [])


def plan_steps(settings: RunnerSettings, manifest: dict[str, Any], results_dir: Path, test_images: Path) -> list[RunStep]:
    """One step per run of the manifest; ``results_dir`` is ``$nnUNet_results/DatasetXXX_Name``."""
    model_dir = Path(results_dir) / f"{settings.trainer}__{settings.plans}__{settings.configuration}"
    steps = []
    for run in manifest["runs"]:
        base = run_dir(settings.out_dir, run.arm, run.fraction)
        fold_dir = model_dir / f"fold_{run.fold}"
        predict = _predict_command(settings, run, test_images, base / "predictions")
        steps.append(RunStep(run, _train_command(settings, run), predict, fold_dir, fold_dir / settings.checkpoint,
                             base / "predictions", base))
    return steps


def link_validation_images(raw_dataset_dir: Path, cases: Sequence[str], target: Path) -> Path:
    """Symlink the channel files of ``cases`` from ``imagesTr`` into ``target`` (the prediction input folder)."""
    ending = json.loads((raw_dataset_dir / "dataset.json").read_text(encoding="utf-8"))["file_ending"]
    target.mkdir(parents=True, exist_ok=True)
    for case in cases:
        files = sorted((raw_dataset_dir / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
        if not files:
            raise DataError(f"no images of case {case}", raw_dataset_dir / "imagesTr")
        for source in files:
            link = target / source.name
            if not link.exists():
                link.symlink_to(source.resolve())
    return target


def _default_runner(cmd: list[str]) -> None:
    done = subprocess.run(cmd)
    if done.returncode != 0:  # nnU-Net printed why above; say which step failed, in one line
        raise DataError(f"{shlex.join(cmd)} exited with status {done.returncode} (see its output above)")


def cases_of_images(folder: Path, file_ending: str) -> list[str]:
    """Case names of an nnU-Net input folder (``<case>_<XXXX><ending>``): the cases a prediction must cover."""
    cases = sorted({p.name[: -len(file_ending) - 5] for p in Path(folder).glob(f"*_[0-9][0-9][0-9][0-9]{file_ending}")})
    if not cases:
        raise DataError(f"no images <case>_XXXX{file_ending}", folder)
    return cases


def run_steps(steps: Sequence[RunStep], label_dir: Path, dataset_json: Path, dry_run: bool = False,
              runner: Callable[[list[str]], None] = _default_runner, log: Callable[[str], None] = print,
              cases: Sequence[str] | None = None) -> None:
    """Train, predict and evaluate every step not done yet (``metrics.json`` present = done).

    ``cases`` are the test cases: each must have a prediction and a label (None: every label in ``label_dir``).
    """
    from pumit_nnunet.evaluation import evaluate as ev

    labels, names = ev.labels_from_dataset_json(dataset_json)
    config = ev.EvaluationConfig(labels, names, known_labels=ev.ignore_label_of(dataset_json))
    for step in steps:
        if (step.metrics_dir / "metrics.json").is_file():
            log(f"# {step.run.arm} {step.run.fraction:.0%}: done")
            continue
        train = step.train + (["--c"] if (step.fold_dir / "checkpoint_latest.pth").is_file() else [])
        if not step.model_file.is_file():
            log(shlex.join(train))
            if not dry_run:
                runner(train)
        log(shlex.join(step.predict))
        if dry_run:
            continue
        runner(step.predict)
        result = ev.evaluate_folders(step.pred_dir, label_dir, config, progress=False, cases=cases)
        ev.write_results(result, step.metrics_dir)
        for line in ev.findings(result):
            log(f"# warning: {step.run.arm} {step.run.fraction:.0%}: {line}")


# --- report ----------------------------------------------------------------------------------------------------------
def collect_rows(out_dir: Path, runs: Sequence[LabelEfficiencyRun]) -> list[dict[str, Any]]:
    """One row per run with a ``metrics.json``: arm, fraction, n_train and the foreground mean of each metric."""
    rows = []
    for run in runs:
        path = run_dir(out_dir, run.arm, run.fraction) / "metrics.json"
        if path.is_file():  # strict JSON: non-finite means are null + "<metric>_status"
            summary = null_to_nonfinite(json.loads(path.read_text(encoding="utf-8")))["foreground_mean"]
            rows.append({"arm": run.arm, "fraction": run.fraction, "n_train": run.n_train,
                         **{m: float(summary[m]) for m in REPORT_METRICS}})
    return rows


def report_tables(rows: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(long CSV, wide markdown with one column per metric and arm)."""
    header = ["arm", "fraction", "n_train", *REPORT_METRICS]
    csv_lines = [",".join(header)] + [",".join(str(row[k]) for k in header) for row in rows]
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    by_key = {(r["arm"], r["fraction"]): r for r in rows}
    columns = [f"{m.upper() if m != 'dice' else 'Dice'} {arm}" for m in REPORT_METRICS for arm in arms]
    md = ["| fraction | training cases | " + " | ".join(columns) + " |", "|" + "---|" * (2 + len(columns))]
    for fraction in sorted({r["fraction"] for r in rows}):
        n_train = next(r["n_train"] for r in rows if r["fraction"] == fraction)
        cells = [f"{by_key[(a, fraction)][m]:.4f}" if (a, fraction) in by_key else "–" for m in REPORT_METRICS for a in arms]
        md.append(f"| {fraction:.0%} | {n_train} | " + " | ".join(cells) + " |")
    md += ["", "Foreground mean over classes of the per-class mean over test cases; ASSD and HD in mm."]
    return "\n".join(csv_lines) + "\n", "\n".join(md) + "\n"


def plot_label_efficiency(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Dice, ASSD and HD against the fraction of training cases, one line per arm."""
    from pumit_nnunet.io import write_figure_atomic
    from pumit_nnunet.pretrain.plots import FIGURE_LOOK, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(REPORT_METRICS), figsize=(4.2 * len(REPORT_METRICS), 3.4))
    for ax, metric in zip(axes, REPORT_METRICS):
        for arm in ARMS:
            points = sorted((r["fraction"] * 100, r[metric]) for r in rows if r["arm"] == arm)
            if points:
                ax.plot(*zip(*points), marker="o", label=arm)
        ax.set_xlabel("training cases (%)")
        ax.set_ylabel("Dice" if metric == "dice" else f"{metric.upper()} (mm)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_figure_atomic(fig, path, **FIGURE_LOOK)


def write_report(out_dir: Path, runs: Sequence[LabelEfficiencyRun]) -> tuple[Path, Path, Path]:
    """``label_efficiency.{csv,md,png}`` in ``out_dir`` from the runs' ``metrics.json`` files."""
    rows = collect_rows(out_dir, runs)
    if not rows:
        raise DataError("no metrics.json under <arm>/<NNN>pct/: run the label-efficiency runs first", out_dir)
    csv_text, md_text = report_tables(rows)
    paths = tuple(Path(out_dir) / f"label_efficiency.{ext}" for ext in ("csv", "md", "png"))
    write_text_atomic(paths[0], csv_text)
    write_text_atomic(paths[1], md_text)
    plot_label_efficiency(rows, paths[2])
    return paths  # type: ignore[return-value]


def held_out_cases(manifest: dict[str, Any], preprocessed_dataset_dir: Path) -> list[str]:
    """The base fold's validation cases (the held-out cases every run is evaluated on by default)."""
    splits = _read_splits(Path(preprocessed_dataset_dir) / "splits_final.json")
    return list(splits[manifest["base_fold"]]["val"])

