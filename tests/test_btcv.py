"""BTCV: conversion of a format-exact RawData layout made from real demo CT, the three split protocols, export."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from pumit_nnunet.evaluation.btcv import MONAI_TRAIN, MONAI_VAL, SMIT_TRAIN, SMIT_VAL, convert_btcv, export_btcv
from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.evaluation.files import GeometryMismatchError

sitk = pytest.importorskip("SimpleITK")




@pytest.fixture(scope="module")
def real_ct(real_demo_dir):
    """Small crops of the real lung CTs and their nodule labels (+ two threshold classes), as SimpleITK images."""
    crops = []
    for case in ("lung1", "lung2"):
        image = sitk.ReadImage(str(real_demo_dir / f"Dataset902_RealCTLungNodule/imagesTr/{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(real_demo_dir / f"Dataset902_RealCTLungNodule/labelsTr/{case}.nii.gz"))
        nodule = np.argwhere(sitk.GetArrayViewFromImage(label))
        z, y, x = nodule.mean(axis=0).astype(int)
        index = [max(int(x) - 24, 0), max(int(y) - 20, 0), max(int(z) - 4, 0)]  # SimpleITK (x, y, z)
        size = [48, 40, 8]
        image, label = sitk.RegionOfInterest(image, size, index), sitk.RegionOfInterest(label, size, index)
        hu = sitk.GetArrayFromImage(image)
        organs = np.where(hu > 150, 8, np.where(hu > -300, 6, 0)).astype(np.uint8)
        organs[sitk.GetArrayViewFromImage(label) > 0] = 11
        organ_image = sitk.GetImageFromArray(organs)
        organ_image.CopyInformation(image)
        crops.append((image, organ_image))
    return crops


def _write_rawdata(root, real_ct, train_ids, test_ids):
    for folder in ("RawData/Training/img", "RawData/Training/label", "RawData/Testing/img"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, case_id in enumerate(train_ids):
        image, label = real_ct[i % len(real_ct)]
        sitk.WriteImage(image, str(root / f"RawData/Training/img/img{case_id}.nii.gz"))
        sitk.WriteImage(label, str(root / f"RawData/Training/label/label{case_id}.nii.gz"))
    for i, case_id in enumerate(test_ids):
        sitk.WriteImage(real_ct[i % len(real_ct)][0], str(root / f"RawData/Testing/img/img{case_id}.nii.gz"))


def test_convert_places_files_and_is_resumable(tmp_path, real_ct, cli_main):
    _write_rawdata(tmp_path / "src", real_ct, ["0001", "0002", "0021"], ["0061", "0062"])
    out = tmp_path / "Dataset666_BTCV"
    argv = ["convert", "btcv", str(tmp_path / "src"), "--out", str(out), "--split", "none"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0  # re-running keeps what is there
    link = out / "imagesTr/BTCV_0021_0000.nii.gz"
    assert link.is_symlink() and link.resolve() == (tmp_path / "src/RawData/Training/img/img0021.nii.gz").resolve()
    labels = sorted(p.name for p in (out / "labelsTr").iterdir())
    assert labels == ["BTCV_0001.nii.gz", "BTCV_0002.nii.gz", "BTCV_0021.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["BTCV_0061_0000.nii.gz", "BTCV_0062_0000.nii.gz"]
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["numTraining"] == 3 and dataset["channel_names"] == {"0": "CT"}
    assert len(dataset["labels"]) == 14 and dataset["labels"]["left adrenal gland"] == 13
    assert not (out / "splits_final.json").exists()
    verify_dataset_integrity(str(out), 1)  # nnU-Net accepts the dataset
    with pytest.raises(UsageError, match="smit"):
        convert_btcv(tmp_path / "src", out, split="smit")  # the paper's split needs all 30 cases


def test_convert_copy_mode_and_flat_layout(tmp_path, real_ct):
    flat = tmp_path / "flat"
    for folder in ("img", "label"):
        (flat / folder).mkdir(parents=True)
    image, label = real_ct[0]
    sitk.WriteImage(image, str(flat / "img/img0005.nii.gz"))
    sitk.WriteImage(label, str(flat / "label/label0005.nii.gz"))
    sitk.WriteImage(real_ct[1][0], str(flat / "img/img0070.nii.gz"))  # no label: a test case
    done = convert_btcv(flat, tmp_path / "out", mode="copy", split=None)
    assert done.train_cases == ["BTCV_0005"] and done.test_cases == ["BTCV_0070"]
    copied = tmp_path / "out/labelsTr/BTCV_0005.nii.gz"
    assert not copied.is_symlink() and copied.read_bytes() == (flat / "label/label0005.nii.gz").read_bytes()


def test_split_protocols_have_exact_membership(tmp_path, real_ct, cli_main):
    """30 training cases (one small volume linked 30 times): SMIT 21/9, MONAI 24/6, nnU-Net's 5 folds."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ids = [f"{i:04d}" for i in list(range(1, 11)) + list(range(21, 41))]
    source = tmp_path / "one"
    _write_rawdata(source, real_ct[:1], ["0001"], [])
    src = tmp_path / "src"
    _write_rawdata(src, real_ct[:1], [], [])
    for case_id in ids:
        for kind in ("img", "label"):
            target = src / f"RawData/Training/{kind}/{kind}{case_id}.nii.gz"
            os.symlink(source / f"RawData/Training/{kind}/{kind}0001.nii.gz", target)
    out = tmp_path / "Dataset666_BTCV"
    assert cli_main(["convert", "btcv", str(src), "--out", str(out)]) == 0
    names = sorted(f"BTCV_{i}" for i in ids)
    smit = json.loads((out / "splits_final.json").read_text(encoding="utf-8"))
    assert smit == json.loads((out / "splits/smit.json").read_text(encoding="utf-8"))
    assert len(smit) == 1 and len(smit[0]["train"]) == 21 and len(smit[0]["val"]) == 9
    smit_val = ("0029", "0030", "0031", "0032", "0034", "0036", "0037", "0039", "0040")
    assert smit[0]["val"] == [f"BTCV_{i}" for i in smit_val]
    assert sorted(smit[0]["train"] + smit[0]["val"]) == names
    monai = json.loads((out / "splits/monai.json").read_text(encoding="utf-8"))
    assert monai[0]["val"] == [f"BTCV_00{i}" for i in range(35, 41)] and len(monai[0]["train"]) == 24
    assert sorted(monai[0]["train"] + monai[0]["val"]) == names
    five = json.loads((out / "splits/nnunet5fold.json").read_text(encoding="utf-8"))
    expected = generate_crossval_split(names, seed=12345, n_splits=5)
    assert five == [{"train": list(f["train"]), "val": list(f["val"])} for f in expected]
    assert sorted(sum((f["val"] for f in five), [])) == names and all(len(f["val"]) == 6 for f in five)
    assert len(SMIT_TRAIN) == 21 and len(SMIT_VAL) == 9 and len(MONAI_TRAIN) == 24 and len(MONAI_VAL) == 6


def _predictions_for_tests(real_ct, pred_dir):
    pred_dir.mkdir()
    expected = {}
    for i, case_id in enumerate(["0061", "0062"]):
        label = real_ct[i][1]
        sitk.WriteImage(label, str(pred_dir / f"BTCV_{case_id}.nii.gz"))
        expected[case_id] = label
    return expected


def test_export_round_trip(tmp_path, real_ct, cli_main):
    _write_rawdata(tmp_path / "src", real_ct, ["0001"], ["0061", "0062"])
    out = tmp_path / "Dataset666_BTCV"
    convert_btcv(tmp_path / "src", out, split=None)
    expected = _predictions_for_tests(real_ct, tmp_path / "pred")
    submission = tmp_path / "submission.zip"
    assert cli_main(["export", "btcv", str(tmp_path / "pred"), str(out), str(submission)]) == 0
    with zipfile.ZipFile(submission) as archive:
        assert sorted(archive.namelist()) == ["img0061.nii.gz", "img0062.nii.gz"]
        archive.extractall(tmp_path / "unzipped")
    for case_id, label in expected.items():
        back = sitk.ReadImage(str(tmp_path / f"unzipped/img{case_id}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
        assert back.GetSize() == label.GetSize() and np.allclose(back.GetOrigin(), label.GetOrigin())
        assert np.allclose(back.GetSpacing(), label.GetSpacing()) and back.GetPixelID() == sitk.sitkUInt8
    assert cli_main(["export", "btcv", str(tmp_path / "pred"), str(out), str(submission)]) == 2  # no --overwrite
    names = export_btcv(tmp_path / "pred", out, tmp_path / "other.zip", name_pattern="label{case_id}.nii.gz")
    assert names == ["label0061.nii.gz", "label0062.nii.gz"]


def test_export_checks_presence_and_geometry(tmp_path, real_ct):
    _write_rawdata(tmp_path / "src", real_ct, ["0001"], ["0061", "0062"])
    out = tmp_path / "Dataset666_BTCV"
    convert_btcv(tmp_path / "src", out, split=None)
    _predictions_for_tests(real_ct, tmp_path / "pred")
    swapped = tmp_path / "pred/BTCV_0061.nii.gz"
    sitk.WriteImage(real_ct[1][1], str(swapped))  # the other case's grid
    with pytest.raises(GeometryMismatchError, match="BTCV_0061"):
        export_btcv(tmp_path / "pred", out, tmp_path / "s.zip")
    swapped.unlink()
    with pytest.raises(DataError, match="BTCV_0061"):
        export_btcv(tmp_path / "pred", out, tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()
