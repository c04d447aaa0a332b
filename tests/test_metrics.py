"""Segmentation metrics: MONAI equivalence on real demo labels, CHAOS-evaluator surfaces, properties, evaluate CLI."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from pumit_nnunet.errors import DataError
from pumit_nnunet.evaluation.evaluate import EvaluationConfig, evaluate_folders, read_metrics_json
from pumit_nnunet.evaluation.metrics import (
    chaos_points,
    chaos_score,
    class_metrics,
    dice_coefficient,
    relative_absolute_volume_difference,
)
from pumit_nnunet.evaluation.surface import surface_distances, surface_mask

sitk = pytest.importorskip("SimpleITK")




def _read_labels(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()[::-1], image


def _perturbed(ref: np.ndarray, erode_label: int) -> np.ndarray:
    """A plausible prediction: shifted by (1, -2, 1) voxels and one class eroded."""
    pred = np.roll(ref, (1, -2, 1), axis=(0, 1, 2))
    eroded = ndimage.binary_erosion(pred == erode_label)
    pred[(pred == erode_label) & ~eroded] = 0
    return pred


@pytest.fixture(scope="module")
def real_pairs(real_demo_dir):
    """(name, pred, ref, spacing, labels) from real demo labels: chest CT tissue/bone and an anisotropic brain mask."""
    chest, chest_spacing, _ = _read_labels(real_demo_dir / "Dataset904_RealCTChestTissue/labelsTr/lung1.nii.gz")
    chest = chest[12:36, 150:230, 88:168].copy()  # a crop (spine and back) keeps it fast and makes masks touch the border
    brain, brain_spacing, _ = _read_labels(real_demo_dir / "Dataset901_RealBrainMaskT1/labelsTr/mni152_coronal.nii.gz")
    brain = brain[15:47, 8:88, 8:88].copy()
    return [
        ("chest", _perturbed(chest, 2), chest, chest_spacing, (1, 2)),
        ("mni152_coronal", _perturbed(brain, 1), brain, brain_spacing, (1,)),
    ]


def test_metrics_match_monai_on_real_labels(real_pairs):
    """With MONAI's surface convention (image border is surface) every metric agrees up to MONAI's float32."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
    )

    for name, pred, ref, spacing, labels in real_pairs:
        for label in labels:
            ours = class_metrics(pred == label, ref == label, spacing, 1.0, image_border_is_surface=True)
            p = torch.from_numpy(pred == label)[None, None].float()
            r = torch.from_numpy(ref == label)[None, None].float()
            monai = {
                "dice": compute_dice(p, r).item(),
                "hd": compute_hausdorff_distance(p, r, spacing=spacing).item(),
                "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=spacing).item(),
                "assd": compute_average_surface_distance(p, r, symmetric=True, spacing=spacing).item(),
                "nsd": compute_surface_dice(p, r, [1.0], spacing=spacing).item(),
            }
            assert 0 < ours.dice < 1 and ours.hd > 0, (name, label)
            for metric, expected in monai.items():
                assert getattr(ours, metric) == pytest.approx(expected, rel=2e-6), (name, label, metric)


def _chaos_reference_ssd(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[float, float]:
    """The CHAOS evaluator's ASSD/MSSD recipe: 6-connected erosion with border_value=1, KD-tree in mm."""
    cross = ndimage.generate_binary_structure(3, 1)
    points = []
    for mask in (ref, pred):
        border = mask ^ ndimage.binary_erosion(mask, structure=cross, border_value=1)
        points.append(np.argwhere(border) * np.asarray(spacing))
    ref_points, seg_points = points
    seg_to_ref = cKDTree(ref_points).query(seg_points)[0]
    ref_to_seg = cKDTree(seg_points).query(ref_points)[0]
    pooled = np.concatenate([seg_to_ref, ref_to_seg])
    return pooled.mean(), pooled.max()


def test_default_surfaces_match_chaos_evaluator(real_pairs):
    """By default (CHAOS convention) ASSD and HD (= MSSD) equal the evaluator's KD-tree computation."""
    for name, pred, ref, spacing, labels in real_pairs:
        for label in labels:
            ours = class_metrics(pred == label, ref == label, spacing)
            assd, mssd = _chaos_reference_ssd(pred == label, ref == label, spacing)
            assert ours.assd == pytest.approx(assd, rel=1e-12), (name, label)
            assert ours.hd == pytest.approx(mssd, rel=1e-12), (name, label)


def test_border_conventions_differ_only_on_the_image_border():
    mask = np.zeros((5, 6, 7), dtype=bool)
    mask[:, 1:5, 1:6] = True  # touches the first and last slice
    chaos, monai = surface_mask(mask), surface_mask(mask, image_border_is_surface=True)
    for end in (0, -1):  # MONAI: the whole 4x5 face is surface; CHAOS: only its in-plane rim
        assert monai[end].sum() == 20 and chaos[end].sum() == 20 - 6
    np.testing.assert_array_equal(chaos[1:-1], monai[1:-1])
    inner = np.zeros((7, 8, 9), dtype=bool)
    inner[1:-1, 2:5, 2:6] = True
    np.testing.assert_array_equal(surface_mask(inner), surface_mask(inner, image_border_is_surface=True))


masks = st.integers(0, 2**30).map(lambda seed: np.random.default_rng(seed).random((6, 7, 5)) < 0.35)
spacings = st.tuples(*[st.floats(0.3, 4.0, allow_nan=False)] * 3)


@settings(max_examples=40, deadline=None)
@given(masks, masks, spacings)
def test_distance_transform_equals_brute_force(pred, ref, spacing):
    """EDT distances equal all-pairs nearest distances between surface voxel centres (mm)."""
    got = surface_distances(pred, ref, spacing)
    sp, sr = surface_mask(pred), surface_mask(ref)
    if not sp.any() or not sr.any():
        return
    pairwise = cdist(np.argwhere(sp) * spacing, np.argwhere(sr) * spacing)
    np.testing.assert_allclose(got.pred_to_ref, pairwise.min(axis=1), rtol=1e-12)
    np.testing.assert_allclose(got.ref_to_pred, pairwise.min(axis=0), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(masks, masks, spacings)
def test_metrics_are_symmetric_and_bounded(pred, ref, spacing):
    forward, backward = class_metrics(pred, ref, spacing), class_metrics(ref, pred, spacing)
    for metric in ("dice", "assd", "hd", "hd95", "nsd"):
        a, b = getattr(forward, metric), getattr(backward, metric)
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12), metric
    if pred.any() and ref.any():
        assert 0 <= forward.dice <= 1 and 0 <= forward.nsd <= 1
        assert 0 <= forward.assd <= forward.hd and 0 <= forward.hd95 <= forward.hd


@settings(max_examples=20, deadline=None)
@given(masks, spacings)
def test_identical_masks_are_perfect(mask, spacing):
    if not mask.any():
        return
    m = class_metrics(mask, mask, spacing)
    assert (m.dice, m.assd, m.hd, m.hd95, m.ravd, m.nsd) == (1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_empty_mask_conventions():
    empty, blob = np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool)
    blob[1:3, 1:4, 2:5] = True
    both = class_metrics(empty, empty, (1, 1, 1))
    assert all(math.isnan(getattr(both, m)) for m in ("dice", "assd", "hd", "hd95", "ravd", "nsd"))
    for pred, ref, ravd in ((blob, empty, math.inf), (empty, blob, 100.0)):
        m = class_metrics(pred, ref, (1, 1, 1))
        assert (m.dice, m.nsd, m.ravd) == (0.0, 0.0, ravd)
        assert m.assd == m.hd == m.hd95 == math.inf
    assert math.isnan(dice_coefficient(empty, empty))
    assert relative_absolute_volume_difference(blob, blob) == 0.0


def test_chaos_points_and_score():
    assert chaos_score(1.0, 0.0, 0.0, 0.0) == 100.0
    assert chaos_points(0.9, 2.5, 7.5, 30.0) == pytest.approx({"dice": 50, "ravd": 50, "assd": 50, "mssd": 50})
    assert chaos_points(0.7, 10.0, math.inf, 61.0) == {"dice": 0, "ravd": 0, "assd": 0, "mssd": 0}
    assert math.isnan(chaos_score(math.nan, math.nan, math.nan, math.nan))


def _write_case(folder, name, array, reference_image):
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference_image)
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))


def test_evaluate_command_writes_json_csv_and_table(real_demo_dir, tmp_path, cli_main, capsys):
    _, spacing, full = _read_labels(real_demo_dir / "Dataset904_RealCTChestTissue/labelsTr/lung1.nii.gz")
    ref_full = sitk.GetArrayFromImage(full)
    cases = {"a": ref_full[8:28, 60:150, 50:140], "b": ref_full[24:44, 80:170, 60:150]}
    grid = sitk.GetImageFromArray(cases["a"].astype(np.uint8))
    grid.SetSpacing(full.GetSpacing()), grid.SetDirection(full.GetDirection()), grid.SetOrigin((10.0, -5.0, 3.0))
    for name, ref in cases.items():
        _write_case(tmp_path / "labels", name, ref, grid)
        _write_case(tmp_path / "pred", name, _perturbed(ref, 2), grid)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "tissue": 1, "bone": 2}}))
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--dataset-json", str(dataset_json),
            "--nsd-tolerance", "1.0", "2=2.0", "--out", str(tmp_path / "out"), "--workers", "2", "--chaos-score"]
    assert cli_main(argv) == 0
    assert "bone" in capsys.readouterr().out
    report = json.loads((tmp_path / "out/metrics.json").read_text(encoding="utf-8"))
    assert report["labels"] == {"1": "tissue", "2": "bone"} and report["nsd_tolerance_mm"]["2"] == 2.0
    direct = class_metrics(_perturbed(cases["b"], 2) == 2, cases["b"] == 2, spacing, nsd_tolerance_mm=2.0)
    by_case = {c["case"]: c["metrics"] for c in report["metric_per_case"]}
    for metric, value in direct.as_dict().items():
        assert by_case["b"]["2"][metric] == pytest.approx(value, rel=1e-12)
    assert report["mean"]["2"]["dice"] == pytest.approx(np.mean([by_case[c]["2"]["dice"] for c in "ab"]))
    rows = (tmp_path / "out/metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,label,label_name,dice") and len(rows) == 1 + 2 * 2


def test_evaluate_names_the_file_with_a_geometry_mismatch(tmp_path, cli_main, capsys):
    ref = np.zeros((4, 5, 6), np.uint8)
    ref[1:3, 1:4, 1:5] = 1
    grid = sitk.GetImageFromArray(ref)
    _write_case(tmp_path / "labels", "case", ref, grid)
    moved = sitk.GetImageFromArray(ref)
    moved.SetOrigin((0.0, 0.0, 2.5))
    sitk.WriteImage(moved, str(tmp_path / "pred_case.nii.gz"))
    (tmp_path / "pred").mkdir()
    shutil.move(tmp_path / "pred_case.nii.gz", tmp_path / "pred/case.nii.gz")
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"pumit-nnunet evaluate: error: .*pred/case\.nii\.gz: origin .* differs from the reference .*",
                        error)
    assert not (tmp_path / "pred/metrics.json").exists()


# --- no case dropped or misread ----------------------------------------------------------------------------------
def _blob_cases(tmp_path, n_cases=3):
    """Label maps (two classes) and predictions shifted by one voxel; returns the grid image."""
    rng = np.random.default_rng(0)
    grid = None
    for i in range(n_cases):
        ref = np.zeros((8, 12, 12), np.uint8)
        z, y = rng.integers(1, 3, size=2)
        ref[z:z + 4, y:y + 6, 2:8] = 1
        ref[z:z + 3, y + 1:y + 5, 8:11] = 2
        grid = grid or sitk.GetImageFromArray(ref)
        _write_case(tmp_path / "labels", f"case{i}", ref, grid)
        _write_case(tmp_path / "pred", f"case{i}", np.roll(ref, 1, axis=2), grid)
    return grid


def _strict_json(path):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_missing_prediction_is_an_error_naming_the_case(tmp_path, cli_main, capsys):
    _blob_cases(tmp_path)
    (tmp_path / "pred/case1.nii.gz").unlink()
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no prediction for 1 of 3 labelled cases: case1" in err[0] and "--missing-as-empty" in err[0]
    assert not (tmp_path / "pred/metrics.json").exists()


def test_missing_as_empty_scores_the_case_as_empty_and_lists_it(tmp_path, cli_main, capsys):
    _blob_cases(tmp_path)
    complete = tmp_path / "complete"
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2",
                     "--out", str(complete)]) == 0
    (tmp_path / "pred/case1.nii.gz").unlink()
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2", "--missing-as-empty"]
    assert cli_main(argv) == 0
    assert "case1" in capsys.readouterr().err  # the warning names the case scored as empty
    full, report = _strict_json(complete / "metrics.json"), _strict_json(tmp_path / "pred/metrics.json")
    assert report["missing_predictions"] == ["case1"] and report["n_cases"] == 3
    case1 = next(c for c in report["metric_per_case"] if c["case"] == "case1")
    assert case1["prediction_missing"] and case1["prediction_file"] is None
    assert case1["metrics"]["1"]["dice"] == 0.0 and case1["metrics"]["1"]["hd"] is None
    assert case1["metrics"]["1"]["hd_status"] == "inf"
    dice = {c["case"]: c["metrics"]["1"]["dice"] for c in full["metric_per_case"]}
    assert report["mean"]["1"]["dice"] == pytest.approx((dice["case0"] + 0.0 + dice["case2"]) / 3)  # not dropped
    assert report["mean"]["1"]["hd"] is None and report["mean"]["1"]["hd_status"] == "inf"
    rows = [r.split(",") for r in (tmp_path / "pred/metrics.csv").read_text(encoding="utf-8").splitlines()]
    header, case1_rows = rows[0], [r for r in rows if r[0] == "case1"]
    assert case1_rows[0][header.index("hd")] == "inf" and case1_rows[0][header.index("prediction_missing")] == "yes"


def test_strict_json_round_trips_nonfinite_metrics(tmp_path, cli_main):
    _blob_cases(tmp_path, n_cases=2)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labels/case0.nii.gz")))
    _write_case(tmp_path / "pred", "case0", np.where(ref == 2, 0, ref), sitk.ReadImage(str(tmp_path / "labels/case0.nii.gz")))
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2", "3"]) == 0
    text = (tmp_path / "pred/metrics.json").read_text(encoding="utf-8")
    assert "Infinity" not in text and "NaN" not in text
    _strict_json(tmp_path / "pred/metrics.json")
    restored = read_metrics_json(tmp_path / "pred/metrics.json")
    case0 = next(c for c in restored["metric_per_case"] if c["case"] == "case0")["metrics"]
    assert case0["2"]["hd"] == math.inf and case0["2"]["dice"] == 0.0  # class 2 missed entirely
    assert math.isnan(case0["3"]["dice"]) and "dice_status" not in case0["3"]  # absent from both: undefined
    assert restored["mean"]["2"]["assd"] == math.inf and math.isnan(restored["foreground_mean"]["hd95"]) is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_label_maps_with_exact_integers_are_accepted(tmp_path, cli_main, dtype):
    grid = _blob_cases(tmp_path, n_cases=1)
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2",
                     "--out", str(tmp_path / "as_int")]) == 0
    for folder in ("pred", "labels"):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / "case0.nii.gz"))).astype(dtype)
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(grid)
        sitk.WriteImage(image, str(tmp_path / folder / "case0.nii.gz"))
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2",
                     "--out", str(tmp_path / "as_float")]) == 0
    as_int, as_float = (_strict_json(tmp_path / f / "metrics.json") for f in ("as_int", "as_float"))
    assert as_float["mean"] == as_int["mean"]


@pytest.mark.parametrize("folder", ["pred", "labels"])
def test_non_integer_label_map_is_refused_naming_the_file(tmp_path, cli_main, capsys, folder):
    grid = _blob_cases(tmp_path, n_cases=2)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / folder / "case1.nii.gz"))).astype(np.float32)
    array[array == 1] = 0.75  # a soft prediction saved as a label map
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(grid)
    sitk.WriteImage(image, str(tmp_path / folder / "case1.nii.gz"))
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{folder}/case1.nii.gz: " in err and "non-integer values (e.g. 0.75)" in err


def test_labels_missing_from_dataset_json_are_reported(tmp_path, cli_main, capsys):
    _blob_cases(tmp_path, n_cases=2)
    ref = sitk.ReadImage(str(tmp_path / "labels/case1.nii.gz"))
    array = sitk.GetArrayFromImage(ref)
    array[0, 0, :3] = 5  # a label the dataset does not declare
    _write_case(tmp_path / "labels", "case1", array, ref)
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "tumour": 2}}))
    argv = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--dataset-json", str(dataset_json)]
    assert cli_main(argv) == 0
    assert "label 5 is in 1 cases but not among the evaluated labels: case1" in capsys.readouterr().err
    assert _strict_json(tmp_path / "pred/metrics.json")["labels_not_evaluated"] == {"5": ["case1"]}


def test_two_images_of_one_case_are_refused(tmp_path, cli_main, capsys):
    grid = _blob_cases(tmp_path, n_cases=1)
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "pred/case0.nii.gz")), str(tmp_path / "pred/case0.nrrd"))
    assert grid is not None
    assert cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1"]) == 1
    assert "two images of case 'case0': case0.nii.gz and case0.nrrd" in capsys.readouterr().err


def test_evaluation_errors_keep_their_file_in_worker_processes(tmp_path):
    _blob_cases(tmp_path, n_cases=2)
    (tmp_path / "labels/case1.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DataError) as caught:
        evaluate_folders(tmp_path / "pred", tmp_path / "labels", EvaluationConfig((1,)), workers=2, progress=False)
    assert caught.value.path == tmp_path / "labels/case1.nii.gz"


def test_console_script_evaluate(tmp_path):
    """The installed ``pumit-nnunet`` console script runs ``evaluate`` end to end."""
    ref = np.zeros((6, 7, 8), np.uint8)
    ref[1:5, 2:6, 2:7] = 1
    grid = sitk.GetImageFromArray(ref)
    _write_case(tmp_path / "labels", "c", ref, grid)
    _write_case(tmp_path / "pred", "c", np.roll(ref, 1, axis=2), grid)
    done = subprocess.run(["pumit-nnunet", "evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"),
                           "--labels", "1"], capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "pred/metrics.json").read_text(encoding="utf-8"))["mean"]["1"]["dice"] == pytest.approx(0.8)
