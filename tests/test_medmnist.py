"""MedMNIST-3D: official .npz reading, official AUC/ACC, the classifier, fine-tuning (resume, sweep) and the CLI.

The ``.npz`` is written in the official layout from real demo data: 28^3 crops of the real head CT
(Dataset904) centred on air, soft tissue or bone voxels, labelled by the centre voxel's tissue (3 classes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from pumit_nnunet.evaluation.medmnist import (
    MEDMNIST_3D, MedMNISTSplit, load_medmnist, medmnist_info, model_input, npz_path, save_medmnist_npz,
)
from pumit_nnunet.evaluation.medmnist_metrics import TASK_TYPES, average_ranks, medmnist_acc, medmnist_auc, roc_auc
from pumit_nnunet.evaluation.medmnist_train import (
    BEST, LATEST, RESULTS, FinetuneConfig, FinetuneResult, finetune, load_classifier, run_sweep, select_lr,
)
from pumit_nnunet.models.classifier import PumitClassifier, classifier_vit_config

PER_CLASS = {"train": 8, "val": 3, "test": 3}


def _crops_by_tissue(real_demo_dir: Path) -> dict[str, MedMNISTSplit]:
    import SimpleITK as sitk

    case = real_demo_dir / "Dataset904_RealCTChestTissue"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "imagesTr/lung1_0000.nii.gz")))[:, ::2, ::2]
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "labelsTr/lung1.nii.gz")))[:, ::2, ::2]
    grey = (np.clip((image.astype(np.float32) + 1000) / 2000, 0, 1) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    inner = np.zeros(label.shape, bool)
    inner[14:-14, 14:-14, 14:-14] = True
    out = {}
    for split, count in PER_CLASS.items():
        images, labels = [], []
        for cls in range(3):
            centres = np.argwhere((label == cls) & inner)
            for z, y, x in centres[rng.choice(len(centres), count, replace=False)]:
                images.append(grey[z - 14:z + 14, y - 14:y + 14, x - 14:x + 14])
                labels.append([cls])
        out[split] = MedMNISTSplit(np.stack(images), np.array(labels, dtype=np.uint8))
    return out


@pytest.fixture(scope="module")
def tissue_npz(real_demo_dir, tmp_path_factory) -> Path:
    """An official-format file under the name of the 3-class FractureMNIST3D (so the task table applies)."""
    path = npz_path(tmp_path_factory.mktemp("medmnist"), "fracture")
    save_medmnist_npz(path, _crops_by_tissue(real_demo_dir))
    return path


def _tiny_config(npz: Path, out: Path, **overrides) -> FinetuneConfig:
    settings = dict(npz=str(npz), dataset="fracture", out_dir=str(out), vit_size="T", input_size=32, epochs=2,
                    milestones=(1,), batch_size=8, eval_batch_size=16, max_steps_per_epoch=2, lr=1e-4, device="cpu", curves=False)
    return FinetuneConfig(**{**settings, **overrides})


# --- metrics -------------------------------------------------------------------------------------------------------
def _random_task(task: str, rng: np.random.Generator, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    if task == "multi-label, binary-class":
        y = rng.integers(0, 2, (n, 4))
        return y, np.clip(y * 0.3 + rng.random((n, 4)) * 0.7, 0, 1)
    k = 2 if task == "binary-class" else 5
    y = rng.integers(0, k, (n, 1))
    scores = rng.random((n, k)) + np.eye(k)[y[:, 0]] * 0.5
    scores[:5, -1] = 0.5  # exact threshold ties: the official ACC uses "> 0.5"
    return y, scores / (scores.sum(1, keepdims=True) if k > 2 else 1)


@pytest.mark.parametrize("task", TASK_TYPES)
def test_metrics_equal_the_official_evaluator(task):
    evaluator = pytest.importorskip("medmnist.evaluator")
    y, scores = _random_task(task, np.random.default_rng(1))
    assert medmnist_auc(y, scores, task) == pytest.approx(evaluator.getAUC(y, scores, task), abs=1e-12)
    assert medmnist_acc(y, scores, task) == pytest.approx(evaluator.getACC(y, scores, task), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40))
def test_roc_auc_equals_sklearn_with_ties(pairs):
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=float) / 6
    np.testing.assert_allclose(average_ranks(scores), rankdata(scores))
    if labels.all() or not labels.any():
        with pytest.raises(ValueError, match="one class"):
            roc_auc(labels, scores)
    else:
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_metrics_against_hand_computed_references():
    from sklearn.metrics import roc_auc_score

    y = np.array([[0], [1], [1], [0]])
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])
    assert medmnist_auc(y, scores, "binary-class") == roc_auc_score(y[:, 0], scores[:, 1])
    assert medmnist_acc(y, scores, "binary-class") == 0.5  # 0.5 is not > 0.5; 0.7 is a false positive
    y3 = np.array([[0], [1], [2], [2]])
    s3 = np.array([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    expected = np.mean([roc_auc_score(y3[:, 0] == c, s3[:, c]) for c in range(3)])
    assert medmnist_auc(y3, s3, "multi-class") == pytest.approx(expected)
    assert medmnist_acc(y3, s3, "multi-class") == 0.5
    ym = np.array([[1, 0], [1, 1], [0, 0]])
    sm = np.array([[0.9, 0.6], [0.4, 0.7], [0.2, 0.1]])
    assert medmnist_acc(ym, sm, "multi-label, binary-class") == pytest.approx(np.mean([2 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="unknown MedMNIST task"):
        medmnist_auc(y, scores, "regression")


# --- data ----------------------------------------------------------------------------------------------------------
def test_npz_is_in_the_official_layout_and_round_trips(tissue_npz):
    with np.load(tissue_npz) as raw:
        assert sorted(raw.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))
        assert raw["train_images"].dtype == np.uint8 and raw["train_images"].shape == (24, 28, 28, 28)
        assert raw["train_labels"].shape == (24, 1)
        data = load_medmnist(tissue_npz)
        for split in ("train", "val", "test"):
            np.testing.assert_array_equal(data[split].images, raw[f"{split}_images"])
            np.testing.assert_array_equal(data[split].labels, raw[f"{split}_labels"])
    assert set(np.unique(data["test"].labels)) == {0, 1, 2}


def test_official_medmnist_class_reads_our_file(tissue_npz):
    medmnist = pytest.importorskip("medmnist")
    dataset = medmnist.FractureMNIST3D(split="val", root=str(tissue_npz.parent), as_rgb=True)
    image, target = dataset.imgs[0], dataset.labels[0]
    ours = model_input(load_medmnist(tissue_npz)["val"].images[:1], None)[0]
    np.testing.assert_allclose(ours.numpy(), np.stack([image / 255.0] * 3), atol=1e-6)
    assert target[0] == load_medmnist(tissue_npz)["val"].labels[0, 0]


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="organmnist3d.npz"):
        load_medmnist(npz_path(tmp_path, "organ"))
    broken = tmp_path / "nodulemnist3d.npz"
    np.savez(broken, train_images=np.zeros((2, 28, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="lacks.*val_images"):
        load_medmnist(broken)
    assert npz_path(tmp_path, "vesselmnist3d", 64).name == "vesselmnist3d_64.npz"
    assert medmnist_info("synapse").task == "binary-class" and len(MEDMNIST_3D) == 6
    with pytest.raises(ValueError, match="unknown MedMNIST-3D"):
        medmnist_info("pathmnist")


def test_model_input_is_trilinear_rgb_in_unit_range():
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 28), dtype=np.uint8)
    x = model_input(images, 48)
    reference = F.interpolate(torch.from_numpy(images).float()[:, None] / 255, size=(48,) * 3, mode="trilinear")
    assert x.shape == (2, 3, 48, 48, 48)
    torch.testing.assert_close(x[:, 1:2], reference)
    torch.testing.assert_close(x[:, 0], x[:, 2])


# --- model ---------------------------------------------------------------------------------------------------------
def test_classifier_is_a_linear_head_on_the_normed_cls_token():
    torch.manual_seed(0)
    model = PumitClassifier(classifier_vit_config("T"), 3).eval()
    x = torch.rand(2, 3, 32, 32, 32)
    tokens = model.vit.norm(model.vit.forward_features(x, 0)[-1])
    torch.testing.assert_close(model(x), model.head(tokens[:, 0]))
    assert model.vit.config.patch_depth == 16 and model.vit.config.pos_embed_shape == (10, 10, 10)
    assert "vit.pos_embed" in model.no_weight_decay()


# --- fine-tuning ---------------------------------------------------------------------------------------------------
class _Interrupt(Exception):
    pass


def _interrupt_after_first_epoch(message: str) -> None:
    if message.startswith("epoch 1:"):
        raise _Interrupt


def test_finetune_resume_equals_uninterrupted_run(tissue_npz, tmp_path):
    straight = finetune(_tiny_config(tissue_npz, tmp_path / "a", curves=True), log=lambda m: None)
    with pytest.raises(_Interrupt):
        finetune(_tiny_config(tissue_npz, tmp_path / "b"), log=_interrupt_after_first_epoch)
    assert json.loads(json.dumps(torch.load(tmp_path / "b" / LATEST, weights_only=True)["epoch"])) == 1
    resumed = finetune(_tiny_config(tissue_npz, tmp_path / "b"), log=lambda m: None)
    assert resumed == straight
    a = torch.load(tmp_path / "a" / LATEST, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / LATEST, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert (tmp_path / "a" / "progress.png").is_file() and (tmp_path / "a" / RESULTS).is_file()
    with pytest.raises(ValueError, match="finished run with another configuration"):
        finetune(_tiny_config(tissue_npz, tmp_path / "a", lr=1e-3), log=lambda m: None)
    # the kept checkpoint is the best validation AUC, and re-evaluating it reproduces the recorded metrics
    recorded = json.loads((tmp_path / "a" / RESULTS).read_text(encoding="utf-8"))
    model, extra = load_classifier(tmp_path / "a" / BEST)
    assert extra["epoch"] == recorded["best_epoch"] and extra["val_auc"] == pytest.approx(recorded["val_auc"])
    with pytest.raises(ValueError, match="another configuration"):
        shutil.copy(tmp_path / "b" / LATEST, tmp_path / "c.pt")
        (tmp_path / "c").mkdir()
        shutil.copy(tmp_path / "c.pt", tmp_path / "c" / LATEST)
        finetune(_tiny_config(tissue_npz, tmp_path / "c", lr=3e-4), log=lambda m: None)


def test_backbone_of_a_fine_tuned_classifier_loads_into_a_vit(tissue_npz, tmp_path):
    from pumit_nnunet.checkpoints import load_vit_weights

    finetune(_tiny_config(tissue_npz, tmp_path / "run", epochs=1, milestones=()), log=lambda m: None)
    model, _ = load_classifier(tmp_path / "run" / BEST)
    config = _tiny_config(tissue_npz, tmp_path / "again", epochs=1, milestones=(), pretrained=str(tmp_path / "run" / BEST))
    from pumit_nnunet.evaluation.medmnist_train import build_classifier

    rebuilt = build_classifier(config, medmnist_info("fracture"), log=lambda m: None)
    for key, value in model.vit.state_dict().items():
        torch.testing.assert_close(rebuilt.vit.state_dict()[key], value)
    assert load_vit_weights  # imported lazily through the package's PEP 562 names


def test_select_lr_uses_validation_only():
    from pumit_nnunet.evaluation.medmnist_metrics import ClassificationMetrics as M

    runs = [FinetuneResult(1e-5, 3, M(0.8, 0.6), M(0.99, 0.9)), FinetuneResult(1e-4, 5, M(0.9, 0.5), M(0.5, 0.4)),
            FinetuneResult(5e-4, 5, M(0.9, 0.5), M(0.7, 0.7))]
    assert select_lr(runs).lr == 1e-4  # highest val AUC; tie with 5e-4 broken towards the smaller lr


def test_sweep_writes_table_with_selection_rule(tissue_npz, tmp_path):
    chosen, csv_path, md_path = run_sweep(_tiny_config(tissue_npz, tmp_path, epochs=1, milestones=()), [1e-4, 1e-3],
                                          tmp_path, log=lambda m: None)
    rows = [line.split(",") for line in csv_path.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["lr", "best_epoch", "val_auc", "val_acc", "test_auc", "test_acc", "selected"]
    selected = [row for row in rows[1:] if row[-1] == "yes"]
    assert len(selected) == 1 and float(selected[0][0]) == chosen.lr
    assert max(float(row[2]) for row in rows[1:]) == float(selected[0][2])
    assert "Selection rule" in md_path.read_text(encoding="utf-8") and (tmp_path / "lr_0.001" / RESULTS).is_file()


# --- command line --------------------------------------------------------------------------------------------------
def _train_argv(npz: Path, out: Path) -> list[str]:
    return ["medmnist", "train", "--npz", str(npz), "--dataset", "fracture", "--out", str(out), "--vit-size", "T",
            "--input-size", "32", "--epochs", "1", "--milestones", "--batch-size", "8", "--max-steps-per-epoch", "1",
            "--device", "cpu", "--lr", "1e-4"]


def _main_with_medmnist(argv: list[str]) -> int:
    """Through ``pumit_nnunet.cli.main`` once the lead wired it, else through our registration function alone."""
    from pumit_nnunet import cli
    from pumit_nnunet.evaluation.medmnist_cli import register_medmnist

    if "medmnist" in cli.build_parser()._subparsers._group_actions[0].choices:
        return cli.main(argv)
    parser = argparse.ArgumentParser()
    register_medmnist(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_and_evaluate(tissue_npz, tmp_path, capsys):
    assert _main_with_medmnist(_train_argv(tissue_npz, tmp_path / "run")) == 0
    scores = tmp_path / "scores.csv"
    argv = ["medmnist", "evaluate", str(tmp_path / "run" / BEST), "--npz", str(tissue_npz), "--scores-csv", str(scores)]
    assert _main_with_medmnist(argv) == 0
    recorded = json.loads((tmp_path / "run" / RESULTS).read_text(encoding="utf-8"))
    assert f"AUC {recorded['test_auc']:.4f}" in capsys.readouterr().out
    assert len(scores.read_text(encoding="utf-8").splitlines()) == 9


def test_console_script_runs_medmnist(tissue_npz, tmp_path):
    executable = shutil.which("pumit-nnunet")
    assert executable, "the pumit-nnunet console script is not installed"
    result = subprocess.run([executable, *_train_argv(tissue_npz, tmp_path / "run")], capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test AUC" in result.stdout
