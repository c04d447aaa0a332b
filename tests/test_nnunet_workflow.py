"""What nnU-Net users do after training, with a PUMIT model and the stock commands, on real CT scans:
``nnUNetv2_find_best_configuration`` (2d vs 3d_fullres vs their ensemble), ``nnUNetv2_ensemble``,
``nnUNetv2_export_model_to_zip`` -> ``nnUNetv2_install_pretrained_model_from_zip`` -> ``nnUNetv2_predict`` in a
fresh results folder, ``nnUNetv2_predict_from_modelfolder``, ``nnUNetv2_evaluate_folder``; and what a machine
without pumit-nnunet says when it is given a PUMIT model folder.

One session-scoped set-up trains ``PumitTrainer_T_smoke`` (2 iterations) in 2d and 3d_fullres, fold 0 only (the
fewest folds ``find_best_configuration -f`` accepts), on the demo's lung-field dataset (``lung1`` to train,
``lung2`` held out), built from the data fetched by :mod:`pumit_nnunet.data`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_environment, run_command

pytestmark = pytest.mark.e2e

DATASET_ID = 971
TRAINER = "PumitTrainer_T_smoke"
CONFIGURATIONS = ("2d", "3d_fullres")


def _model_folder(root: Path, dataset: str, configuration: str) -> Path:
    return root / "results" / dataset / f"{TRAINER}__nnUNetPlans__{configuration}"


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="session")
def workflow(tmp_path_factory) -> tuple[Path, Path]:
    """``(root, raw dataset folder)`` with a PUMIT model trained in 2d and 3d_fullres (fold 0, ``--npz``)."""
    from pumit_nnunet.data import fetch
    from pumit_nnunet.nnunet.demo_data import build_lung_demo

    root = tmp_path_factory.mktemp("workflow")
    data = fetch("pyradiomics-data")
    raw = build_lung_demo({n: data / f"{n}_image.nrrd" for n in ("lung1", "lung2")}, root / "raw", DATASET_ID)
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", *CONFIGURATIONS, "-np", "2",
                 "-npfp", "2"], nnunet_environment(root, training=False))
    for configuration in CONFIGURATIONS:
        run_command(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu", "--npz"],
                    nnunet_environment(root))
    return root, raw


def _predict(root: Path, raw: Path, configuration: str, out: Path, results: Path | None = None) -> Path:
    env = nnunet_environment(root, training=False)
    if results is not None:
        env["nnUNet_results"] = str(results)
    run_command(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID), "-c",
                 configuration, "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
                 "--save_probabilities"], env)
    return out


@pytest.fixture(scope="session")
def predictions(workflow, tmp_path_factory) -> dict[str, Path]:
    """The held-out scan predicted by each configuration with stock ``nnUNetv2_predict`` (probabilities saved)."""
    root, raw = workflow
    folder = tmp_path_factory.mktemp("predictions")
    return {c: _predict(root, raw, c, folder / c) for c in CONFIGURATIONS}


def test_find_best_configuration_over_pumit_2d_and_3d_runs(workflow):
    root, raw = workflow
    run_command(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", *CONFIGURATIONS, "-tr", TRAINER,
                 "-f", "0", "-np", "2"], nnunet_environment(root, training=False))
    results = root / "results" / raw.name
    information = json.loads((results / "inference_information.json").read_text(encoding="utf-8"))
    # every single configuration and the 2d + 3d_fullres ensemble were scored on the fold-0 validation
    scored = set(information["all_results"])
    assert len(scored) == 3, scored
    assert all(TRAINER in key for key in scored) and any(key.startswith("ensemble") for key in scored)
    best = information["best_model_or_ensemble"]
    assert best["selected_model_or_models"] and all(m["trainer"] == TRAINER for m in best["selected_model_or_models"])
    instructions = (results / "inference_instructions.txt").read_text(encoding="utf-8")
    assert f"-tr {TRAINER}" in instructions and "nnUNetv2_predict" in instructions


def test_ensemble_of_pumit_2d_and_3d_predictions(workflow, predictions, tmp_path):
    root, raw = workflow
    out = tmp_path / "ensemble"
    run_command(["nnUNetv2_ensemble", "-i", str(predictions["2d"]), str(predictions["3d_fullres"]), "-o", str(out),
                 "-np", "1"], nnunet_environment(root, training=False))
    ensemble = sitk.ReadImage(str(out / "lung2.nii.gz"))
    reference = sitk.ReadImage(str(raw / "imagesTs" / "lung2_0000.nii.gz"))
    assert ensemble.GetSize() == reference.GetSize()
    np.testing.assert_allclose(ensemble.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    # the ensemble is the argmax of the averaged probabilities of both members
    probabilities = [np.load(predictions[c] / "lung2.npz")["probabilities"] for c in CONFIGURATIONS]
    expected = np.argmax(np.mean(probabilities, axis=0), axis=0)
    assert (_labels(out / "lung2.nii.gz") == expected).mean() > 0.999


def test_export_install_into_fresh_results_and_predict(workflow, predictions, tmp_path):
    root, raw = workflow
    archive = tmp_path / "pumit_model.zip"
    run_command(["nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-o", str(archive), "-c", "3d_fullres", "-tr",
                 TRAINER, "-f", "0"], nnunet_environment(root, training=False))
    fresh = tmp_path / "fresh_results"
    env = {**nnunet_environment(root, training=False), "nnUNet_results": str(fresh)}
    run_command(["nnUNetv2_install_pretrained_model_from_zip", str(archive)], env)
    installed = fresh / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres"
    assert (installed / "fold_0" / "checkpoint_final.pth").is_file() and (installed / "plans.json").is_file()
    out = _predict(root, raw, "3d_fullres", tmp_path / "from_installed", results=fresh)
    np.testing.assert_array_equal(_labels(out / "lung2.nii.gz"), _labels(predictions["3d_fullres"] / "lung2.nii.gz"))


def test_predict_from_modelfolder(workflow, predictions, tmp_path):
    root, raw = workflow
    out = tmp_path / "from_modelfolder"
    run_command(["nnUNetv2_predict_from_modelfolder", "-i", str(raw / "imagesTs"), "-o", str(out), "-m",
                 str(_model_folder(root, raw.name, "3d_fullres")), "-f", "0", "-device", "cpu", "-npp", "1", "-nps",
                 "1"], nnunet_environment(root, training=False))
    np.testing.assert_array_equal(_labels(out / "lung2.nii.gz"), _labels(predictions["3d_fullres"] / "lung2.nii.gz"))


def test_evaluate_folder_on_pumit_predictions_agrees_with_our_metrics(workflow, predictions):
    from pumit_nnunet.evaluation.metrics import dice_coefficient

    root, raw = workflow
    prediction = predictions["3d_fullres"]
    model = _model_folder(root, raw.name, "3d_fullres")
    run_command(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(prediction), "-djfile",
                 str(model / "dataset.json"), "-pfile", str(model / "plans.json"), "-np", "1"],
                nnunet_environment(root, training=False))
    summary = json.loads((prediction / "summary.json").read_text(encoding="utf-8"))
    theirs = summary["mean"]["1"]["Dice"]
    ours = dice_coefficient(_labels(prediction / "lung2.nii.gz") == 1, _labels(raw / "labelsTs" / "lung2.nii.gz") == 1)
    assert 0.0 <= theirs <= 1.0 and theirs == pytest.approx(ours, abs=1e-9)


# Without pumit-nnunet: nnU-Net reads the checkpoint (plain values: it loads), takes its ``trainer_name`` and
# looks the class up in its own package and the ``nnUNet_extTrainer`` folders only, then raises its own
# RuntimeError. No code of ours runs on that path, so the message cannot say "pip install pumit-nnunet"
# without a fork of nnU-Net; what it can say is the trainer's name (``PumitTrainer...``), and the model folder's
# plans.json names the network class ``pumit_nnunet.models.segmentation.PumitSegNet``.
_WITHOUT_PUMIT = """
import sys
for name in [m for m in sys.modules if m.startswith("pumit_nnunet")]:
    del sys.modules[name]

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pumit_nnunet", "pumit_nnunet_hook", "pumit_nnunet_trainers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, _NotInstalled())
from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder
sys.argv = ["nnUNetv2_predict_from_modelfolder", *sys.argv[1:]]
predict_entry_point_modelfolder()
"""


def test_a_pumit_model_folder_where_pumit_nnunet_is_not_installed(workflow, tmp_path):
    root, raw = workflow
    model = _model_folder(root, raw.name, "3d_fullres")
    env = {**nnunet_environment(root, training=False), "PUMIT_NNUNET_NO_HOOK": "1"}
    env.pop("nnUNet_extTrainer", None)
    import subprocess

    done = subprocess.run([sys.executable, "-c", _WITHOUT_PUMIT, "-i", str(raw / "imagesTs"), "-o", str(tmp_path / "o"),
                           "-m", str(model), "-f", "0", "-device", "cpu"], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    # nnU-Net's own error, naming the PUMIT trainer and where it looked; not an import error from our package
    assert last.startswith(f"RuntimeError: Could not find requested nnunet trainer {TRAINER} in "), done.stderr[-3000:]
    assert "nnUNet_extTrainer" in last and "ModuleNotFoundError" not in done.stderr
    assert "/pumit_nnunet/" not in done.stderr  # no frame of ours: nothing of ours ran
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    network = plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    assert network == "pumit_nnunet.models.segmentation.PumitSegNet"  # what tells a reader to install pumit-nnunet
