"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by file name (``case.nii.gz`` in both folders, as ``nnUNetv2_predict`` writes them). Every
prediction must have a reference and share its voxel grid. Results go to ``metrics.json`` (per case, per class,
mean/std per class and the foreground mean, laid out like nnU-Net's ``summary.json``), ``metrics.csv`` (one row per
case and class) and a printed summary table; files are written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pumit_nnunet.evaluation.files import Geometry, check_same_geometry, list_images, read_image
from pumit_nnunet.io import write_json_atomic, write_text_atomic
from pumit_nnunet.evaluation.metrics import METRIC_NAMES, case_metrics, chaos_score


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate: the foreground labels, their names, NSD tolerances (mm) and surface conventions."""

    labels: tuple[int, ...]
    label_names: Mapping[int, str] = field(default_factory=dict)
    nsd_tolerance_mm: Mapping[int, float] = field(default_factory=dict)
    image_border_is_surface: bool = False
    with_chaos_score: bool = False

    def tolerance(self, label: int) -> float:
        return float(self.nsd_tolerance_mm.get(label, 1.0))

    def name(self, label: int) -> str:
        return self.label_names.get(label, str(label))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRIC_NAMES + (("chaos_score",) if self.with_chaos_score else ())


@dataclass
class EvaluationResult:
    """Per-case metrics (``cases[i]["metrics"][label][metric]``) and their per-class summary."""

    config: EvaluationConfig
    cases: list[dict[str, Any]]
    mean: dict[int, dict[str, float]]
    std: dict[int, dict[str, float]]
    foreground_mean: dict[str, float]


def labels_from_dataset_json(path: Path | str) -> tuple[tuple[int, ...], dict[int, str]]:
    """Foreground labels and their names from an nnU-Net v2 ``dataset.json`` (region-based labels unsupported)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset.json not found: {path}")
    labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    if not isinstance(labels, dict):
        raise ValueError(f"{path}: no 'labels' mapping")
    names = {}
    for name, value in labels.items():
        if not isinstance(value, int):
            raise ValueError(f"{path}: label {name!r} is region-based ({value}); give --labels explicitly")
        if value != 0 and name != "ignore":
            names[value] = name
    return tuple(sorted(names)), names


def evaluate_case(pred_path: Path, ref_path: Path, config: EvaluationConfig) -> dict[int, dict[str, float]]:
    """Metrics of one case after checking that prediction and reference share the voxel grid."""
    import SimpleITK as sitk

    pred_image, ref_image = read_image(pred_path), read_image(ref_path)
    check_same_geometry(pred_image, ref_image, str(pred_path))
    pred, ref = sitk.GetArrayViewFromImage(pred_image), sitk.GetArrayViewFromImage(ref_image)
    tolerances = {label: config.tolerance(label) for label in config.labels}
    spacing = Geometry.of(ref_image).numpy_spacing
    per_class = case_metrics(pred, ref, config.labels, spacing, tolerances, config.image_border_is_surface)
    results = {}
    for label, metrics in per_class.items():
        values = metrics.as_dict()
        if config.with_chaos_score:
            values["chaos_score"] = chaos_score(metrics.dice, metrics.ravd, metrics.assd, metrics.hd)
        results[label] = values
    return results


def match_cases(pred_dir: Path, label_dir: Path) -> list[tuple[str, Path, Path]]:
    """(case, prediction, reference) for every prediction; fails naming predictions that lack a reference."""
    predictions, references = list_images(Path(pred_dir)), list_images(Path(label_dir))
    if not predictions:
        raise FileNotFoundError(f"no images found in {pred_dir}")
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        raise FileNotFoundError(f"no reference in {label_dir} for predictions: {', '.join(orphans)}")
    return [(case, predictions[case], references[case]) for case in sorted(predictions)]


def evaluate_folders(
    pred_dir: Path | str, label_dir: Path | str, config: EvaluationConfig, workers: int = 1, progress: bool = True
) -> EvaluationResult:
    """Evaluate every prediction in ``pred_dir`` against the same-named file in ``label_dir``."""
    from tqdm import tqdm

    matched = match_cases(Path(pred_dir), Path(label_dir))
    jobs = [(pred, ref) for _, pred, ref in matched]
    bar = dict(total=len(jobs), desc="evaluate", unit="case", disable=not progress)
    if workers <= 1:
        per_case = [evaluate_case(pred, ref, config) for pred, ref in tqdm(jobs, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(evaluate_case, pred, ref, config) for pred, ref in jobs]
            per_case = [future.result() for future in tqdm(futures, **bar)]
    cases = [
        {"case": case, "prediction_file": str(pred), "reference_file": str(ref), "metrics": metrics}
        for (case, pred, ref), metrics in zip(matched, per_case)
    ]
    return summarize(cases, config)


def summarize(cases: Sequence[dict[str, Any]], config: EvaluationConfig) -> EvaluationResult:
    """Per-class mean and std over cases (NaN skipped, inf kept) and the mean of the class means."""
    mean: dict[int, dict[str, float]] = {}
    std: dict[int, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns and inf - inf in std
        for label in config.labels:
            columns = {m: np.array([c["metrics"][label][m] for c in cases], dtype=float) for m in config.metric_names}
            mean[label] = {m: _nan_stat(np.nanmean, v) for m, v in columns.items()}
            std[label] = {m: _nan_stat(np.nanstd, v) for m, v in columns.items()}
        foreground = {
            m: _nan_stat(np.nanmean, np.array([mean[label][m] for label in config.labels])) for m in config.metric_names
        }
    return EvaluationResult(config, list(cases), mean, std, foreground)


def _nan_stat(function: Any, values: np.ndarray) -> float:
    return float(function(values)) if values.size and not np.isnan(values).all() else math.nan


def result_to_json(result: EvaluationResult) -> dict[str, Any]:
    config = result.config
    return {
        "labels": {str(label): config.name(label) for label in config.labels},
        "nsd_tolerance_mm": {str(label): config.tolerance(label) for label in config.labels},
        "surface": "6-connected erosion; image border "
        + ("is surface (MONAI)" if config.image_border_is_surface else "is not surface (CHAOS evaluator)"),
        "metric_per_case": [{**case, "metrics": _by_label(case["metrics"])} for case in result.cases],
        "mean": _by_label(result.mean),
        "std": _by_label(result.std),
        "foreground_mean": result.foreground_mean,
    }


def _by_label(table: Mapping[int, Any]) -> dict[str, Any]:
    return {str(label): values for label, values in table.items()}


def result_to_csv(result: EvaluationResult) -> str:
    config = result.config
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "label_name", *config.metric_names, "n_pred", "n_ref"])
    for case in result.cases:
        for label in config.labels:
            values = case["metrics"][label]
            row = [values[m] for m in (*config.metric_names, "n_pred", "n_ref")]
            writer.writerow([case["case"], label, config.name(label), *row])
    return buffer.getvalue()


def format_summary_table(result: EvaluationResult) -> str:
    """Per-class ``mean ± std`` of every metric as an aligned text table."""
    config = result.config
    header = ["label", *config.metric_names]
    rows = [
        [f"{label} {config.name(label)}", *(_mean_std(result, label, m) for m in config.metric_names)]
        for label in config.labels
    ]
    rows.append(["foreground mean", *(f"{result.foreground_mean[m]:.4g}" for m in config.metric_names)])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _mean_std(result: EvaluationResult, label: int, metric: str) -> str:
    return f"{result.mean[label][metric]:.4g} ± {result.std[label][metric]:.3g}"


def write_results(result: EvaluationResult, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.csv`` atomically into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / "metrics.json", out_dir / "metrics.csv"
    write_json_atomic(json_path, result_to_json(result))
    write_text_atomic(csv_path, result_to_csv(result))
    return json_path, csv_path
