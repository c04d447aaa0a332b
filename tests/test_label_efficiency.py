"""Label efficiency: nested split files, the runner's commands and resumption, the report, the CLI, and one real run
of the stock nnU-Net commands with the smoke trainer (marked e2e)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.evaluation.label_efficiency import (
    BACKUP, LabelEfficiencyRun, RunnerSettings, label_efficiency_folds, nested_subsets, plan_steps,
    read_manifest, report_tables, run_dir, run_steps, subset_size, write_label_efficiency_splits, write_report,
)

CASES = [f"case_{i:02d}" for i in range(21)]


def _five_folds(cases: list[str]) -> list[dict[str, list[str]]]:
    return [{"train": [c for j, c in enumerate(cases) if j % 5 != k], "val": cases[k::5]} for k in range(5)]


# --- subsets and split files ---------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1))
def test_nested_subsets_are_nested_exact_and_deterministic(n, seed):
    cases = [f"c{i}" for i in range(n)]
    fractions = [0.2, 0.4, 0.6, 0.8, 1.0]
    subsets = nested_subsets(cases, fractions, seed)
    assert subsets == nested_subsets(list(reversed(cases)), fractions, seed)  # input order does not matter
    sizes = [len(subsets[f]) for f in fractions]
    assert sizes == [min(max(int(np.floor(f * n + 0.5)), 1), n) for f in fractions]
    for small, large in zip(fractions, fractions[1:]):
        assert set(subsets[small]) <= set(subsets[large])
    assert subsets[1.0] == sorted(cases)


def test_subset_sizes_of_the_smit_btcv_split():
    assert [subset_size(21, f) for f in (0.2, 0.4, 0.6, 0.8, 1.0)] == [4, 8, 13, 17, 21]
    with pytest.raises(UsageError, match="fraction"):
        subset_size(21, 0.0)


def test_extra_folds_keep_the_base_folds_and_validation_cases():
    base = _five_folds(CASES)
    folds, runs = label_efficiency_folds(base, 2, (0.5, 1.0), seed=3)
    assert folds[:5] == base and len(folds) == 9
    assert [(r.arm, r.fraction, r.fold) for r in runs] == [
        ("scratch", 0.5, 5), ("scratch", 1.0, 6), ("pretrained", 0.5, 7), ("pretrained", 1.0, 8)]
    assert folds[5] == folds[7] and folds[6]["train"] == sorted(base[2]["train"])
    assert all(f["val"] == base[2]["val"] for f in folds[5:])
    with pytest.raises(UsageError, match="fold 5 does not exist"):
        label_efficiency_folds(base, 5, (0.5,), 0)


def test_split_file_is_extended_once_and_changes_are_refused(tmp_path):
    base = _five_folds(CASES)
    (tmp_path / "splits_final.json").write_text(json.dumps(base))
    done = write_label_efficiency_splits(tmp_path, base_fold=0, fractions=(0.2, 0.6, 1.0), seed=1)
    written = json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))
    assert written[:5] == base and len(written) == 11 and json.loads((tmp_path / BACKUP).read_text(encoding="utf-8")) == base
    assert [r.n_train for r in done["runs"]] == [3, 10, 16] * 2
    assert read_manifest(tmp_path)["runs"] == done["runs"]
    write_label_efficiency_splits(tmp_path, base_fold=0, fractions=(0.2, 0.6, 1.0), seed=1)  # idempotent
    assert json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8")) == written
    with pytest.raises(UsageError, match="other settings"):
        write_label_efficiency_splits(tmp_path, base_fold=0, fractions=(0.2, 0.6, 1.0), seed=2)
    write_label_efficiency_splits(tmp_path, base_fold=1, fractions=(0.5,), seed=2, arms=("scratch",), overwrite=True)
    assert json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))[:5] == base
    assert len(json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))) == 6


# --- runner --------------------------------------------------------------------------------------------------------
def _manifest(arms=("scratch", "pretrained")) -> dict:
    runs = [LabelEfficiencyRun(arm, f, 5 + i, n) for i, (arm, f, n) in
            enumerate((a, f, n) for a in arms for f, n in ((0.5, 1), (1.0, 2)))]
    return {"base_fold": 0, "runs": runs}


def test_commands_are_the_stock_nnunet_ones(tmp_path):
    s = RunnerSettings("950", tmp_path, "3d_fullres", "PumitTrainer_T_smoke", "nnUNetPlans", "/w/pumit-b.ckpt",
                       "cpu", step_size=0.25)
    steps = plan_steps(s, _manifest(), tmp_path / "results", tmp_path / "test_images")
    assert steps[0].train == ["nnUNetv2_train", "950", "3d_fullres", "5", "-tr", "PumitTrainer_T_smoke", "-p",
                              "nnUNetPlans", "-device", "cpu"]
    assert steps[2].train[-2:] == ["-pretrained_weights", "/w/pumit-b.ckpt"]
    assert steps[3].predict == [
        "nnUNetv2_predict", "-i", str(tmp_path / "test_images"), "-o", str(tmp_path / "pretrained/100pct/predictions"),
        "-d", "950", "-c", "3d_fullres", "-f", "8", "-tr", "PumitTrainer_T_smoke", "-p", "nnUNetPlans",
        "-chk", "checkpoint_final.pth", "-device", "cpu", "-step_size", "0.25"]
    assert steps[1].fold_dir == tmp_path / "results/PumitTrainer_T_smoke__nnUNetPlans__3d_fullres/fold_6"
    with pytest.raises(UsageError, match="pretrained weights"):
        plan_steps(RunnerSettings("950", tmp_path), _manifest(), tmp_path, tmp_path)


@pytest.fixture(scope="module")
def raw_ct(real_demo_dir, tmp_path_factory) -> Path:
    """A small real raw dataset: three lung CT crops (two scans, one cropped twice) with their nodule labels."""
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    src = real_demo_dir / "Dataset902_RealCTLungNodule"
    cases = [SourceCase(n, src / f"imagesTr/{n}_0000.nii.gz", src / f"labelsTr/{n}.nii.gz") for n in ("lung1", "lung2")]
    cases.append(SourceCase("lung1b", cases[0].image, cases[0].label, (2, 10, -12)))
    return write_raw_dataset(cases, tmp_path_factory.mktemp("raw"), 960, "LE", "CT", {"background": 0, "nodule": 1},
                             (8, 48, 48))


def _fake_nnunet(raw: Path, calls: list[list[str]]):
    """Stands in for nnUNetv2_train (writes the checkpoint) and nnUNetv2_predict (the reference, shifted one voxel
    for the scratch arm so that the arms differ)."""
    import SimpleITK as sitk

    def runner(cmd: list[str]) -> None:
        calls.append(cmd)
        if cmd[0] == "nnUNetv2_train":
            return
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        for image in Path(cmd[cmd.index("-i") + 1]).iterdir():
            case = image.name[: -len("_0000.nii.gz")]
            label = sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz"))
            if "scratch" in str(out):
                shifted = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(label), 1, axis=2))
                shifted.CopyInformation(label)
                label = shifted
            sitk.WriteImage(label, str(out / f"{case}.nii.gz"))

    return runner


def test_run_steps_resume_and_report(raw_ct, tmp_path):
    from pumit_nnunet.evaluation.label_efficiency import link_validation_images

    s = RunnerSettings("960", tmp_path / "out", device="cpu", pretrained_weights="w.ckpt")
    images = link_validation_images(raw_ct, ["lung1", "lung2"], tmp_path / "out/test_images")
    steps = plan_steps(s, _manifest(), tmp_path / "results", images)
    calls: list[list[str]] = []
    steps[0].fold_dir.mkdir(parents=True)
    (steps[0].fold_dir / "checkpoint_latest.pth").touch()  # an interrupted training continues with --c
    with pytest.raises(DataError, match="no prediction for 1 of 3 labelled cases: lung1b"):  # labelsTr has 3 cases
        run_steps(steps, raw_ct / "labelsTr", raw_ct / "dataset.json", runner=_fake_nnunet(raw_ct, []), log=lambda m: None)
    (steps[0].fold_dir / "checkpoint_latest.pth").touch()
    run_steps(steps, raw_ct / "labelsTr", raw_ct / "dataset.json", runner=_fake_nnunet(raw_ct, calls), log=lambda m: None,
              cases=["lung1", "lung2"])
    assert [c[0] for c in calls] == ["nnUNetv2_train", "nnUNetv2_predict"] * 4 and calls[0][-1] == "--c"
    calls.clear()
    run_steps(steps, raw_ct / "labelsTr", raw_ct / "dataset.json", runner=_fake_nnunet(raw_ct, calls), log=lambda m: None,
              cases=["lung1", "lung2"])
    assert calls == []  # everything done
    csv_path, md_path, png_path = write_report(tmp_path / "out", _manifest()["runs"])
    rows = [line.split(",") for line in csv_path.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["arm", "fraction", "n_train", "dice", "assd", "hd"] and len(rows) == 5
    pretrained = [r for r in rows[1:] if r[0] == "pretrained"]
    assert all(float(r[3]) == 1.0 and float(r[4]) == 0.0 for r in pretrained)
    assert all(float(r[3]) < 1.0 for r in rows[1:] if r[0] == "scratch")
    assert "| 50% | 1 |" in md_path.read_text(encoding="utf-8") and png_path.stat().st_size > 0


def test_report_tables_from_given_metrics(tmp_path):
    runs = _manifest(("scratch", "pretrained"))["runs"]
    values = {("scratch", 0.5): (0.61, 3.5, 20.0), ("scratch", 1.0): (0.7, 2.0, 12.0),
              ("pretrained", 0.5): (0.72, 2.25, 10.0)}
    for (arm, fraction), (dice, assd, hd) in values.items():
        path = run_dir(tmp_path, arm, fraction) / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"foreground_mean": {"dice": dice, "assd": assd, "hd": hd, "hd95": 0.0}}))
    csv_path, md_path, _ = write_report(tmp_path, runs)
    assert csv_path.read_text(encoding="utf-8").splitlines()[1] == "scratch,0.5,1,0.61,3.5,20.0"
    md = md_path.read_text(encoding="utf-8").splitlines()
    assert md[0] == "| fraction | training cases | Dice scratch | Dice pretrained | ASSD scratch | ASSD pretrained | HD scratch | HD pretrained |"
    assert md[2] == "| 50% | 1 | 0.6100 | 0.7200 | 3.5000 | 2.2500 | 20.0000 | 10.0000 |"
    assert md[3] == "| 100% | 2 | 0.7000 | – | 2.0000 | – | 12.0000 | – |"
    with pytest.raises(DataError, match="metrics.json"):
        write_report(tmp_path / "empty", runs)
    assert report_tables([])[0] == "arm,fraction,n_train,dice,assd,hd\n"


# --- command line --------------------------------------------------------------------------------------------------
def _main(argv: list[str]) -> int:
    from pumit_nnunet.cli import main

    return main(argv)


def _nnunet_tree(raw_ct: Path, root: Path) -> dict[str, str]:
    (root / "raw").mkdir(parents=True)
    shutil.copytree(raw_ct, root / "raw" / raw_ct.name)
    pre = root / "preprocessed" / raw_ct.name
    pre.mkdir(parents=True)
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["lung1", "lung2"], "val": ["lung1b"]}]))
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results")}


def test_cli_splits_dry_run_and_report(raw_ct, tmp_path, monkeypatch, capsys):
    for key, value in _nnunet_tree(raw_ct, tmp_path).items():
        monkeypatch.setenv(key, value)
    assert _main(["label-efficiency", "splits", "960", "--fractions", "0.5", "1.0", "--arms", "scratch"]) == 0
    assert len(json.loads((tmp_path / "preprocessed" / raw_ct.name / "splits_final.json").read_text(encoding="utf-8"))) == 3
    assert _main(["label-efficiency", "run", "960", "--out", str(tmp_path / "le"), "--device", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_train 960 3d_fullres 1 -tr PumitTrainer -p nnUNetPlans -device cpu" in out
    assert sorted(p.name for p in (tmp_path / "le/test_images").iterdir()) == ["lung1b_0000.nii.gz"]
    assert _main(["label-efficiency", "report", "960", "--out", str(tmp_path / "le")]) == 1
    assert "metrics.json" in capsys.readouterr().err


def test_console_script_runs_label_efficiency(raw_ct, tmp_path):
    env = {**os.environ, **_nnunet_tree(raw_ct, tmp_path)}
    result = subprocess.run(["pumit-nnunet", "label-efficiency", "splits", raw_ct.name, "--fractions", "0.5", "1"],
                            env=env, capture_output=True, encoding="utf-8", errors="replace")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fold 4: pretrained" in result.stdout


# --- one real run of the stock commands ----------------------------------------------------------------------------
@pytest.mark.e2e
def test_real_label_efficiency_run_with_the_smoke_trainer(nnunet_root, tmp_path, monkeypatch):
    from conftest import CT_ID, nnunet_environment

    root = tmp_path / "nnunet"
    for part in ("raw", "preprocessed"):
        shutil.copytree(nnunet_root / part, root / part, symlinks=True)
    for key, value in nnunet_environment(root).items():
        monkeypatch.setenv(key, value)
    assert _main(["label-efficiency", "splits", str(CT_ID), "--fractions", "0.5", "1.0", "--arms", "scratch"]) == 0
    out = tmp_path / "le"
    argv = ["label-efficiency", "run", str(CT_ID), "--out", str(out), "-tr", "PumitTrainer_T_smoke", "--device", "cpu",
            "--disable-tta"]
    assert _main(argv) == 0
    rows = (out / "label_efficiency.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "arm,fraction,n_train,dice,assd,hd" and [r.split(",")[:3] for r in rows[1:]] == [
        ["scratch", "0.5", "1"], ["scratch", "1.0", "2"]]
    assert (out / "label_efficiency.png").is_file()
