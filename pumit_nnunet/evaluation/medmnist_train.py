"""Fine-tuning the PUMIT classifier on a MedMNIST-3D dataset, as the authors' ``eval-medmnist.py`` does.

Recipe (the authors' script, in the github repository function2-llx/PUMIT): inputs in [0, 1], grey replicated
to 3 channels, trilinearly resized to the pre-training scale (160^3); the whole model trained with AdamW (torch's
default weight decay 0.01 on weights, none on biases, norms and tokens), batch 32, 100 epochs with the lr x0.1 at
epochs 50 and 75; cross-entropy (BCE for multi-label tasks); the checkpoint with the best validation AUC is kept
and evaluated on the test split.

Resumable at epoch granularity: ``checkpoint_latest.pt`` (model, optimiser, schedule, history, RNG) is written
atomically after every epoch and picked up by a rerun with the same configuration; ``results.json`` marks a
finished run. The batch order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pumit_nnunet.checkpoints.classifier import CLASSIFIER_ADAPTATION, load_classifier, save_classifier
from pumit_nnunet.checkpoints.format import PretrainPlan
from pumit_nnunet.checkpoints.load import load_vit_weights
from pumit_nnunet.io import nonfinite_to_null, null_to_nonfinite, write_json_atomic, write_text_atomic
from pumit_nnunet.evaluation.medmnist import MedMNISTInfo, MedMNISTSplit, load_medmnist, medmnist_info, model_input
from pumit_nnunet.evaluation.medmnist_metrics import MULTI_LABEL, ClassificationMetrics, medmnist_metrics
from pumit_nnunet.models.classifier import PumitClassifier, classifier_vit_config
from pumit_nnunet.optim import build_adamw
from pumit_nnunet.plain import to_plain
from pumit_nnunet.pretrain.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint_atomic
from pumit_nnunet.pretrain.plots import plot_curves
from pumit_nnunet.pretrain.precision import autocast_context, default_precision

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "build_classifier", "predict_scores",
           "evaluate_split", "eval_intensity_scale", "load_classifier", "CLASSIFIER_ADAPTATION"]

LATEST, BEST, RESULTS, CURVES = "checkpoint_latest.pt", "checkpoint_best.pt", "results.json", "progress.png"


@dataclass
class FinetuneConfig:
    """One fine-tuning run. Defaults are the authors' (ViT-B, 160^3, lr 1e-5, 100 epochs, steps at 50/75)."""

    npz: str
    dataset: str
    out_dir: str
    pretrained: str | None = None
    allow_partial: bool = False
    vit_size: str = "B"
    vit_overrides: dict[str, Any] = field(default_factory=dict)
    input_size: int = 160
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int = 100
    milestones: tuple[int, ...] = (50, 75)
    gamma: float = 0.1
    batch_size: int = 32
    eval_batch_size: int = 32
    shape_transform: bool = False
    seed: int = 3407
    device: str = "auto"
    max_steps_per_epoch: int | None = None
    curves: bool = True
    grad_checkpointing: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The plain record written into checkpoints and ``results.json`` (:func:`pumit_nnunet.plain.to_plain`)."""
        return to_plain(self)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class FinetuneResult:
    """Validation and test metrics of the checkpoint selected on validation AUC."""

    lr: float
    best_epoch: int
    val: ClassificationMetrics
    test: ClassificationMetrics

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best_epoch": self.best_epoch, "val_auc": self.val.auc, "val_acc": self.val.acc,
                "test_auc": self.test.auc, "test_acc": self.test.acc}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneResult":
        return cls(data["lr"], data["best_epoch"], ClassificationMetrics(data["val_auc"], data["val_acc"]),
                   ClassificationMetrics(data["test_auc"], data["test_acc"]))


def build_classifier(config: FinetuneConfig, info: MedMNISTInfo, log: Callable[[str], None] = print) -> PumitClassifier:
    """The classifier for ``info``'s task, with pre-trained backbone weights when ``config.pretrained`` is set."""
    model = PumitClassifier(classifier_vit_config(config.vit_size, **config.vit_overrides), info.n_outputs)
    model.vit.set_grad_checkpointing(config.grad_checkpointing)
    if config.pretrained:
        load_vit_weights(model.vit, config.pretrained, allow_partial=config.allow_partial, log=log)
    return model


def _autocast(device: torch.device):
    return autocast_context(device, default_precision(device))


def classification_loss(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """BCE with logits for multi-label tasks, cross-entropy on ``labels[:, 0]`` otherwise."""
    if task == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels[:, 0])


def scores_from_logits(logits: Tensor, task: str) -> Tensor:
    """Sigmoid per label for multi-label tasks, softmax over classes otherwise (what the evaluator receives)."""
    return torch.sigmoid(logits.float()) if task == MULTI_LABEL else torch.softmax(logits.float(), dim=-1)


@torch.no_grad()
def predict_scores(model: PumitClassifier, split: MedMNISTSplit, task: str, input_size: int | None,
                   batch_size: int = 32, intensity_scale: float = 1.0) -> np.ndarray:
    """Class scores ``(N, n_outputs)`` for a split, in order."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = model_input(split.images[start:start + batch_size], input_size, device=device) * intensity_scale
        with _autocast(device):
            out.append(scores_from_logits(model(x), task).cpu())
    return torch.cat(out).numpy()


def eval_intensity_scale(shape_transform: bool) -> float:
    """With the authors' shape transform, evaluation intensities are halved (the mean of the training U(0, 1) factor)."""
    return 0.5 if shape_transform else 1.0


def evaluate_split(model: PumitClassifier, split: MedMNISTSplit, task: str, config: FinetuneConfig) -> ClassificationMetrics:
    scale = eval_intensity_scale(config.shape_transform)
    scores = predict_scores(model, split, task, config.input_size, config.eval_batch_size, scale)
    return medmnist_metrics(split.labels, scores, task)


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def train_one_epoch(model: PumitClassifier, optimizer: torch.optim.Optimizer, split: MedMNISTSplit, task: str,
                    config: FinetuneConfig, epoch: int) -> float:
    """Mean training loss of one epoch (``max_steps_per_epoch`` caps it for smoke runs)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    model.train()
    batches = _epoch_order(len(split), config.seed, epoch).split(config.batch_size)
    batches = batches[: config.max_steps_per_epoch] if config.max_steps_per_epoch else batches
    labels = torch.as_tensor(split.labels)
    losses = []
    for index in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None):
        x = model_input(split.images[index.numpy()], config.input_size, device=device)
        if config.shape_transform:  # the authors' intensity augmentation for shape-defined tasks (adrenal, vessel)
            x = x * torch.rand(x.shape[0], 1, 1, 1, 1, device=device)
        with _autocast(device):
            loss = classification_loss(model(x), labels[index].to(device), task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def _save_best(model: PumitClassifier, config: FinetuneConfig, info: MedMNISTInfo, epoch: int, val: ClassificationMetrics) -> None:
    plan = PretrainPlan(in_channels=3, intensity="unit-range", patch_size=[config.input_size] * 3,
                        notes=f"MedMNIST-3D {info.flag} classifier")
    save_classifier(Path(config.out_dir) / BEST, model, plan, extra={
        "dataset": info.flag, "task": info.task, "epoch": epoch, "val_auc": val.auc, "val_acc": val.acc,
        "input_size": config.input_size, "shape_transform": config.shape_transform})


def _initial_state(config: FinetuneConfig, model: PumitClassifier, optimizer, schedule) -> dict[str, Any]:
    """Resume from ``checkpoint_latest.pt`` when present (same configuration required), else a fresh state."""
    path = Path(config.out_dir) / LATEST
    if not path.is_file():
        torch.manual_seed(config.seed)
        return {"epoch": 0, "best_auc": -1.0, "best_epoch": -1, "history": {"train_loss": [], "val_auc": [], "val_acc": [], "lr": []}}
    state = load_checkpoint(path)
    if state["config"] != config.to_dict():
        raise ValueError(f"{path} was written with another configuration; use a new --out folder or delete it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    restore_rng_state(state["rng"])
    history = {k: [tuple(p) for p in v] for k, v in state["history"].items()}
    return {"epoch": state["epoch"], "best_auc": state["best_auc"], "best_epoch": state["best_epoch"], "history": history}


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Run (or resume, or just read back) one fine-tuning run; returns the validation-selected metrics."""
    out = Path(config.out_dir)
    if (out / RESULTS).is_file():
        recorded = null_to_nonfinite(json.loads((out / RESULTS).read_text(encoding="utf-8")))
        if recorded.get("config") != json.loads(json.dumps(config.to_dict())):
            raise ValueError(f"{out / RESULTS} holds a finished run with another configuration; use a new folder")
        return FinetuneResult.from_dict(recorded)
    info = medmnist_info(config.dataset)
    data = load_medmnist(config.npz)
    device = config.resolved_device()
    torch.manual_seed(config.seed)
    model = build_classifier(config, info, log).to(device)
    optimizer = build_adamw(model, config.lr, config.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    state = _initial_state(config, model, optimizer, schedule)
    history = state["history"]
    for epoch in range(state["epoch"], config.epochs):
        history["lr"].append((epoch, optimizer.param_groups[0]["lr"]))
        history["train_loss"].append((epoch, train_one_epoch(model, optimizer, data["train"], info.task, config, epoch)))
        schedule.step()
        val = evaluate_split(model, data["val"], info.task, config)
        history["val_auc"].append((epoch, val.auc))
        history["val_acc"].append((epoch, val.acc))
        if val.auc > state["best_auc"]:
            state.update(best_auc=val.auc, best_epoch=epoch)
            _save_best(model, config, info, epoch, val)
        log(f"epoch {epoch}: loss {history['train_loss'][-1][1]:.4f} val AUC {val.auc:.4f} ACC {val.acc:.4f}")
        save_checkpoint_atomic(out / LATEST, {
            "config": config.to_dict(), "epoch": epoch + 1, "best_auc": state["best_auc"], "best_epoch": state["best_epoch"],
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "history": {k: [list(p) for p in v] for k, v in history.items()}, "rng": capture_rng_state(),
        })
        if config.curves:
            plot_curves(history, out / CURVES, title=f"{info.flag} lr {config.lr:g}")
    return _final_result(config, info, data, device, state["best_epoch"])


def _final_result(config: FinetuneConfig, info: MedMNISTInfo, data: dict[str, MedMNISTSplit], device: torch.device,
                  best_epoch: int) -> FinetuneResult:
    model, _ = load_classifier(Path(config.out_dir) / BEST, device)
    result = FinetuneResult(config.lr, best_epoch, evaluate_split(model, data["val"], info.task, config),
                            evaluate_split(model, data["test"], info.task, config))
    record = {**result.to_dict(), "config": config.to_dict()}
    write_json_atomic(Path(config.out_dir) / RESULTS, nonfinite_to_null(record))
    return result


# --- learning-rate sweep -------------------------------------------------------------------------------------------
#: the authors' batch script sweeps these learning rates
PAPER_LRS = (5e-7, 1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4)
SELECTION_RULE = (
    "Selection rule: for each learning rate the checkpoint with the best validation AUC is kept; the learning "
    "rate whose kept checkpoint has the highest validation AUC is selected (ties: higher validation ACC, then the "
    "smaller learning rate). Test AUC/ACC are those of the selected run; the test split played no part in selection."
)


def lr_run_dir(out_root: str | os.PathLike, lr: float) -> Path:
    return Path(out_root) / f"lr_{lr:g}"


def select_lr(results: list[FinetuneResult]) -> FinetuneResult:
    """The run with the highest validation AUC (then validation ACC, then the smaller lr)."""
    if not results:
        raise ValueError("no sweep results to select from")
    return max(results, key=lambda r: (r.val.auc, r.val.acc, -r.lr))


def sweep_table(results: list[FinetuneResult], dataset: str) -> tuple[str, str]:
    """(CSV, markdown) of a sweep, one row per lr, the selected one marked."""
    chosen = select_lr(results)
    header = ["lr", "best_epoch", "val_auc", "val_acc", "test_auc", "test_acc", "selected"]
    rows = [[f"{r.lr:g}", str(r.best_epoch), *(f"{v:.4f}" for v in (r.val.auc, r.val.acc, r.test.auc, r.test.acc)),
             "yes" if r is chosen else ""] for r in sorted(results, key=lambda r: r.lr)]
    csv_text = "\n".join(",".join(row) for row in [header, *rows]) + "\n"
    md = [f"## {dataset}: learning-rate sweep", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", f"Selected lr {chosen.lr:g}: test AUC {chosen.test.auc:.4f}, test ACC {chosen.test.acc:.4f}.", "",
           SELECTION_RULE, ""]
    return csv_text, "\n".join(md)


def run_sweep(base: FinetuneConfig, lrs: list[float], out_root: str | os.PathLike,
              log: Callable[[str], None] = print) -> tuple[FinetuneResult, Path, Path]:
    """Fine-tune once per lr (each resumable in ``out_root/lr_<lr>``), write ``sweep.csv`` and ``sweep.md``."""
    results = []
    for lr in lrs:
        log(f"== lr {lr:g}")
        results.append(finetune(replace(base, lr=lr, out_dir=str(lr_run_dir(out_root, lr))), log))
    csv_text, md_text = sweep_table(results, medmnist_info(base.dataset).flag)
    csv_path, md_path = Path(out_root) / "sweep.csv", Path(out_root) / "sweep.md"
    write_text_atomic(csv_path, csv_text)
    write_text_atomic(md_path, md_text)
    return select_lr(results), csv_path, md_path
