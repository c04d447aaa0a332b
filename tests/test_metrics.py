"""Segmentation metrics: MONAI equivalence on real demo labels, CHAOS-evaluator surfaces, properties, evaluate CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

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
    """(name, pred, ref, spacing, labels) from real demo labels: head CT tissue/bone and an anisotropic brain mask."""
    cranium, cranium_spacing, _ = _read_labels(real_demo_dir / "Dataset904_RealCTHeadTissue/labelsTr/cranium.nii.gz")
    cranium = cranium[44:68, 70:150, 60:140].copy()  # a crop keeps it fast and makes masks touch the border
    brain, brain_spacing, _ = _read_labels(real_demo_dir / "Dataset901_RealBrainMaskT1/labelsTr/itk_head_t1.nii.gz")
    brain = brain[15:47, 24:104, 24:104].copy()
    return [
        ("cranium", _perturbed(cranium, 2), cranium, cranium_spacing, (1, 2)),
        ("itk_head_t1", _perturbed(brain, 1), brain, brain_spacing, (1,)),
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
    _, spacing, full = _read_labels(real_demo_dir / "Dataset904_RealCTHeadTissue/labelsTr/cranium.nii.gz")
    ref_full = sitk.GetArrayFromImage(full)
    cases = {"a": ref_full[40:60, 60:150, 50:140], "b": ref_full[60:80, 80:170, 60:150]}
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


def test_evaluate_names_the_file_with_a_geometry_mismatch(tmp_path, cli_main):
    ref = np.zeros((4, 5, 6), np.uint8)
    ref[1:3, 1:4, 1:5] = 1
    grid = sitk.GetImageFromArray(ref)
    _write_case(tmp_path / "labels", "case", ref, grid)
    moved = sitk.GetImageFromArray(ref)
    moved.SetOrigin((0.0, 0.0, 2.5))
    sitk.WriteImage(moved, str(tmp_path / "pred_case.nii.gz"))
    (tmp_path / "pred").mkdir()
    shutil.move(tmp_path / "pred_case.nii.gz", tmp_path / "pred/case.nii.gz")
    with pytest.raises(ValueError, match=r"pred/case\.nii\.gz: origin"):
        cli_main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "labels"), "--labels", "1"])


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
