"""AUC and ACC exactly as the official ``medmnist.evaluator`` (``getAUC``/``getACC``, MedMNIST v3.0) defines them.

Facts of the official definitions (re-implemented, not copied):

* multi-class (also ordinal regression): AUC = mean over score columns of the one-vs-rest ROC AUC;
  ACC = accuracy of the argmax.
* binary-class: the positive score is the *last* column of a 2-D score matrix (or the 1-D scores);
  AUC = ROC AUC of it; ACC = accuracy of ``score > 0.5`` (strictly greater).
* multi-label, binary-class: AUC = mean over labels of the per-label ROC AUC; ACC = mean over labels of the
  per-label accuracy of ``score > 0.5`` (not the exact-match ratio).

Labels come as the ``.npz`` stores them, ``(N, 1)`` for single-label tasks and ``(N, L)`` for multi-label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TASK_TYPES", "ClassificationMetrics", "average_ranks", "roc_auc", "medmnist_auc", "medmnist_acc",
           "medmnist_metrics"]

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = "multi-class", "binary-class", "multi-label, binary-class", "ordinal-regression"
TASK_TYPES = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
THRESHOLD = 0.5


@dataclass(frozen=True)
class ClassificationMetrics:
    """The two numbers MedMNIST reports per split."""

    auc: float
    acc: float


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of binary labels, as the Mann-Whitney U statistic (equals sklearn's
    ``roc_auc_score``, ties counting one half); undefined, like sklearn, when only one class is present."""
    positive = np.asarray(y_true).astype(bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("only one class present in y_true; ROC AUC is not defined")
    ranks = average_ranks(np.asarray(y_score, dtype=np.float64).ravel())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _check_task(task: str) -> None:
    if task not in TASK_TYPES:
        raise ValueError(f"unknown MedMNIST task {task!r}; one of {TASK_TYPES}")


def _positive_scores(y_score: np.ndarray) -> np.ndarray:
    return y_score[:, -1] if y_score.ndim == 2 else y_score


def _squeezed(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_score = np.asarray(y_true).squeeze(), np.asarray(y_score, dtype=np.float64).squeeze()
    if y_true.shape[0] != y_score.shape[0]:
        raise ValueError(f"{y_true.shape[0]} labels but {y_score.shape[0]} score rows")
    return y_true, y_score


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, task: str) -> float:
    """The official MedMNIST AUC (see the module docstring for the per-task rule)."""
    _check_task(task)
    y_true, y_score = _squeezed(y_true, y_score)
    if task == BINARY:
        return float(roc_auc(y_true, _positive_scores(y_score)))
    if task == MULTI_LABEL:
        columns = [roc_auc(y_true[:, i], y_score[:, i]) for i in range(y_score.shape[1])]
    else:
        columns = [roc_auc((y_true == i).astype(float), y_score[:, i]) for i in range(y_score.shape[1])]
    return float(np.mean(columns))


def medmnist_acc(y_true: np.ndarray, y_score: np.ndarray, task: str, threshold: float = THRESHOLD) -> float:
    """The official MedMNIST ACC (see the module docstring for the per-task rule)."""
    _check_task(task)
    y_true, y_score = _squeezed(y_true, y_score)
    if task == BINARY:
        return float(np.mean(y_true == (_positive_scores(y_score) > threshold)))
    if task == MULTI_LABEL:
        return float(np.mean([np.mean(y_true[:, i] == (y_score[:, i] > threshold)) for i in range(y_true.shape[1])]))
    return float(np.mean(y_true == np.argmax(y_score, axis=-1)))


def medmnist_metrics(y_true: np.ndarray, y_score: np.ndarray, task: str) -> ClassificationMetrics:
    """AUC and ACC of one split."""
    return ClassificationMetrics(medmnist_auc(y_true, y_score, task), medmnist_acc(y_true, y_score, task))
