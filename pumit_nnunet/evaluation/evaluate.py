"""Evaluate a folder of predicted label maps against a folder of reference label maps.

Cases are matched by file name (``case.nii.gz`` in both folders, as ``nnUNetv2_predict`` writes them). No case is
dropped or misread silently:

* every prediction needs a reference, and every reference a prediction: a missing prediction is an error naming
  the cases, or, with ``missing_as_empty``, scored as an empty prediction and listed in ``missing_predictions``
  (a run that fails on its hard cases must not score higher);
* label maps must hold integer labels (float files holding exact integers are accepted, 0.75 is refused with the
  file named) and share the reference's voxel grid;
* labels found in the images but not evaluated (absent from ``dataset.json`` or ``--labels``) are reported in
  ``labels_not_evaluated`` with the cases that hold them.

Results go to ``metrics.json`` (per case, per class, mean/std per class and the foreground mean, laid out like
nnU-Net's ``summary.json``), ``metrics.csv`` (one row per case and class) and a printed summary table; files are
written atomically. ``metrics.json`` is strict JSON: a non-finite value is ``null`` with a ``<metric>_status`` of
``"inf"`` or ``"nan"`` beside it (:func:`pumit_nnunet.io.nonfinite_to_null`; read it back with
:func:`read_metrics_json`); the CSV writes ``inf`` and ``nan``.
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

from pumit_nnunet.errors import DataError
from pumit_nnunet.evaluation.files import Geometry, check_same_geometry, list_images, read_label_map
from pumit_nnunet.io import nonfinite_to_null, null_to_nonfinite, write_json_atomic, write_text_atomic
from pumit_nnunet.evaluation.metrics import METRIC_NAMES, case_metrics, chaos_score

#: how metrics.json writes non-finite values (also recorded in the file itself)
NONFINITE_CONVENTION = ('a non-finite value is written as null with "<metric>_status": "inf" (a structure missed '
                        'or hallucinated) or "nan" (undefined: the class is absent from both masks)')


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate: the foreground labels, their names, NSD tolerances (mm) and surface conventions.

    ``known_labels`` are values the images may hold without being evaluated (the ignore label of a dataset.json);
    any other unevaluated value found in an image is reported.
    """

    labels: tuple[int, ...]
    label_names: Mapping[int, str] = field(default_factory=dict)
    nsd_tolerance_mm: Mapping[int, float] = field(default_factory=dict)
    image_border_is_surface: bool = False
    with_chaos_score: bool = False
    known_labels: tuple[int, ...] = ()

    def tolerance(self, label: int) -> float:
        return float(self.nsd_tolerance_mm.get(label, 1.0))

    def name(self, label: int) -> str:
        return self.label_names.get(label, str(label))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return METRIC_NAMES + (("chaos_score",) if self.with_chaos_score else ())

    @property
    def expected_values(self) -> frozenset[int]:
        return frozenset((0, *self.labels, *self.known_labels))


@dataclass
class EvaluationResult:
    """Per-case metrics (``cases[i]["metrics"][label][metric]``), their per-class summary and what was noticed."""

    config: EvaluationConfig
    cases: list[dict[str, Any]]
    mean: dict[int, dict[str, float]]
    std: dict[int, dict[str, float]]
    foreground_mean: dict[str, float]
    missing_predictions: list[str] = field(default_factory=list)
    labels_not_evaluated: dict[int, list[str]] = field(default_factory=dict)


def _dataset_json_labels(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError("is a folder, expected a dataset.json" if path.is_dir() else "does not exist", path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise DataError(f"not a dataset.json ({type(error).__name__}: {error})", path) from error
    if not isinstance(labels, dict):
        raise DataError("no 'labels' mapping", path)
    return labels


def labels_from_dataset_json(path: Path | str) -> tuple[tuple[int, ...], dict[int, str]]:
    """Foreground labels and their names from an nnU-Net v2 ``dataset.json`` (region-based labels unsupported)."""
    path = Path(path)
    names = {}
    for name, value in _dataset_json_labels(path).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise DataError(f"label {name!r} is region-based or not an integer ({value}); give --labels explicitly",
                            path)
        if value != 0 and name != "ignore":
            names[value] = name
    return tuple(sorted(names)), names


def ignore_label_of(path: Path | str) -> tuple[int, ...]:
    """The ``ignore`` label of a dataset.json, if any (present in references, never evaluated)."""
    value = _dataset_json_labels(Path(path)).get("ignore")
    return (value,) if isinstance(value, int) else ()


@dataclass(frozen=True)
class CaseFiles:
    """One case to evaluate: its reference and its prediction (None: missing, scored as empty)."""

    case: str
    prediction: Path | None
    reference: Path


def evaluate_case(
    pred_path: Path | None, ref_path: Path, config: EvaluationConfig
) -> tuple[dict[int, dict[str, float]], list[int]]:
    """Metrics of one case and the label values found in either image (``pred_path`` None: an empty prediction)."""
    ref_image, ref = read_label_map(ref_path)
    if pred_path is None:
        pred = np.zeros(ref.shape, dtype=ref.dtype)
    else:
        pred_image, pred = read_label_map(pred_path)
        check_same_geometry(pred_image, ref_image, str(pred_path))
    tolerances = {label: config.tolerance(label) for label in config.labels}
    spacing = Geometry.of(ref_image).numpy_spacing
    per_class = case_metrics(pred, ref, config.labels, spacing, tolerances, config.image_border_is_surface)
    results = {}
    for label, metrics in per_class.items():
        values = metrics.as_dict()
        if config.with_chaos_score:
            values["chaos_score"] = chaos_score(metrics.dice, metrics.ravd, metrics.assd, metrics.hd)
        results[label] = values
    found = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(ref)))
    return results, found


def match_cases(
    pred_dir: Path, label_dir: Path, missing_as_empty: bool = False, cases: Sequence[str] | None = None
) -> list[CaseFiles]:
    """Pair predictions and references by name; ``cases`` restricts the evaluation to those cases.

    A prediction without a reference is an error; so is a reference without a prediction, unless
    ``missing_as_empty`` (then its prediction is None and it is scored as empty).
    """
    predictions, references = list_images(Path(pred_dir)), list_images(Path(label_dir))
    if cases is not None:
        wanted = set(cases)
        if absent := sorted(wanted - set(references)):
            raise DataError(f"no reference for cases {_listing(absent)}", label_dir)
        predictions = {c: p for c, p in predictions.items() if c in wanted}
        references = {c: p for c, p in references.items() if c in wanted}
    if not references:
        raise DataError("no label images (.nii.gz, .nrrd, .mha, ...)", label_dir)
    if orphans := sorted(set(predictions) - set(references)):
        raise DataError(f"no reference in {label_dir} for predictions {_listing(orphans)}", pred_dir)
    missing = sorted(set(references) - set(predictions))
    if missing and not missing_as_empty:
        raise DataError(f"no prediction for {len(missing)} of {len(references)} labelled cases: {_listing(missing)} "
                        "(pass --missing-as-empty to score them as empty predictions)", pred_dir)
    return [CaseFiles(case, predictions.get(case), references[case]) for case in sorted(references)]


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _run_cases(matched: Sequence[CaseFiles], config: EvaluationConfig, workers: int, progress: bool) -> list:
    from tqdm import tqdm

    # progress only on a terminal, and erased when done or failed: an error stays the one line on stderr
    with tqdm(total=len(matched), desc="evaluate", unit="case", disable=None if progress else True, leave=False) as bar:
        if workers <= 1:
            outcomes = []
            for m in matched:
                outcomes.append(evaluate_case(m.prediction, m.reference, config))
                bar.update()
            return outcomes
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(evaluate_case, m.prediction, m.reference, config) for m in matched]
            for future in futures:
                future.result()
                bar.update()
            return [future.result() for future in futures]


def evaluate_folders(
    pred_dir: Path | str, label_dir: Path | str, config: EvaluationConfig, workers: int = 1, progress: bool = True,
    missing_as_empty: bool = False, cases: Sequence[str] | None = None,
) -> EvaluationResult:
    """Evaluate every reference in ``label_dir`` (or only ``cases``) against the same-named prediction."""
    matched = match_cases(Path(pred_dir), Path(label_dir), missing_as_empty, cases)
    outcomes = _run_cases(matched, config, workers, progress)
    rows, unexpected = [], {}
    for files, (metrics, found) in zip(matched, outcomes):
        rows.append({"case": files.case, "prediction_file": None if files.prediction is None else str(files.prediction),
                     "reference_file": str(files.reference), "prediction_missing": files.prediction is None,
                     "metrics": metrics})
        for value in sorted(set(found) - config.expected_values):
            unexpected.setdefault(value, []).append(files.case)
    result = summarize(rows, config)
    result.missing_predictions = [m.case for m in matched if m.prediction is None]
    result.labels_not_evaluated = unexpected
    return result


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
    """The ``metrics.json`` document (strict JSON: see :data:`NONFINITE_CONVENTION`)."""
    config = result.config
    document = {
        "labels": {str(label): config.name(label) for label in config.labels},
        "nsd_tolerance_mm": {str(label): config.tolerance(label) for label in config.labels},
        "surface": "6-connected erosion; image border "
        + ("is surface (MONAI)" if config.image_border_is_surface else "is not surface (CHAOS evaluator)"),
        "nonfinite": NONFINITE_CONVENTION,
        "n_cases": len(result.cases),
        "missing_predictions": list(result.missing_predictions),
        "labels_not_evaluated": {str(v): cases for v, cases in sorted(result.labels_not_evaluated.items())},
        "metric_per_case": [{**case, "metrics": _by_label(case["metrics"])} for case in result.cases],
        "mean": _by_label(result.mean),
        "std": _by_label(result.std),
        "foreground_mean": result.foreground_mean,
    }
    return nonfinite_to_null(document)


def read_metrics_json(path: Path | str) -> dict[str, Any]:
    """A ``metrics.json`` with its non-finite values restored (``null`` + ``"inf"`` status -> ``inf``)."""
    return null_to_nonfinite(json.loads(Path(path).read_text(encoding="utf-8")))


def findings(result: EvaluationResult) -> list[str]:
    """Warnings a user must see beside the numbers: cases scored as empty, labels found but not evaluated."""
    lines = []
    if result.missing_predictions:
        lines.append(f"{len(result.missing_predictions)} cases had no prediction and were scored as empty: "
                     f"{_listing(result.missing_predictions)}")
    for value, cases in sorted(result.labels_not_evaluated.items()):
        lines.append(f"label {value} is in {len(cases)} cases but not among the evaluated labels: {_listing(cases)}")
    return lines


def _by_label(table: Mapping[int, Any]) -> dict[str, Any]:
    return {str(label): values for label, values in table.items()}


def result_to_csv(result: EvaluationResult) -> str:
    """``metrics.csv``: one row per case and class; non-finite values as ``inf``/``nan``."""
    config = result.config
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", "label_name", *config.metric_names, "n_pred", "n_ref", "prediction_missing"])
    for case in result.cases:
        for label in config.labels:
            values = case["metrics"][label]
            row = [values[m] for m in (*config.metric_names, "n_pred", "n_ref")]  # floats: inf and nan as words
            missing = "yes" if case.get("prediction_missing") else "no"
            writer.writerow([case["case"], label, config.name(label), *row, missing])
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
