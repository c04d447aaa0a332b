"""CHAOS MR: a real demo CT written as DICOM series + PNG ground truth in the release layout, converted, exported."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from pumit_nnunet.errors import DataError

from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from pumit_nnunet.evaluation.chaos import LABEL_TO_PNG, convert_chaos, png_to_labels, read_png_stack
from pumit_nnunet.evaluation.chaos_export import export_chaos, read_submission_case

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")




@pytest.fixture(scope="module")
def volumes(real_demo_dir):
    """Real CT crops (int16) with 4-class labels, non-square pixels and a flipped row direction."""
    made = []
    for case in ("lung1", "lung2"):
        image = sitk.ReadImage(str(real_demo_dir / f"Dataset902_RealCTLungNodule/imagesTr/{case}_0000.nii.gz"))
        nodule = sitk.ReadImage(str(real_demo_dir / f"Dataset902_RealCTLungNodule/labelsTr/{case}.nii.gz"))
        z, y, x = np.argwhere(sitk.GetArrayViewFromImage(nodule)).mean(axis=0).astype(int)
        index, size = [int(x) - 24, int(y) - 18, int(z) - 3], [48, 36, 6]  # cols 48 != rows 36
        hu = sitk.GetArrayFromImage(sitk.RegionOfInterest(image, size, index)).astype(np.int16)
        labels = np.select([hu > 200, hu > -200, hu > -700], [4, 1, 3], 0).astype(np.uint8)
        labels[sitk.GetArrayViewFromImage(sitk.RegionOfInterest(nodule, size, index)) > 0] = 2
        grid = sitk.GetImageFromArray(hu)
        grid.SetSpacing((0.6, 0.9, 5.0))
        grid.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
        grid.SetOrigin((-12.5, 40.0, 100.0))
        made.append((grid, labels))
    return made


def _write_dicom_series(image, folder, names):
    folder.mkdir(parents=True)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, name in enumerate(names):
        slice_k = image[:, :, k]
        tags = {
            "0008|0060": "MR",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(folder))) % 10**8),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(str(float(v)) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",  # row spacing \ column spacing
            "0018|0050": str(image.GetSpacing()[2]),
            "0020|0013": str(k + 1),
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{name}.dcm"))
        writer.Execute(slice_k)


def _write_ground(labels, folder, names):
    folder.mkdir(parents=True)
    for label_slice, name in zip(labels, names):
        Image.fromarray(np.asarray(LABEL_TO_PNG, np.uint8)[label_slice], mode="L").save(folder / f"{name}.png")


def _names(n, reverse=False):
    names = [f"IMG-0004-{k + 1:05d}" for k in range(n)]
    return names[::-1] if reverse else names  # reversed: file-name order runs against the slice position


def _write_release(root, volumes):
    """Train patient 1 (T1DUAL in file order, T2SPIR named in reverse slice order) and test patient 2."""
    (grid1, labels1), (grid2, labels2) = volumes
    out_phase = sitk.Cast(grid1 + 7, sitk.sitkInt16)
    for patient, split, (grid, labels), second in (("1", "Train_Sets", volumes[0], out_phase),
                                                   ("2", "Test_Sets", volumes[1], grid2)):
        base = root / split / "MR" / patient
        n = grid.GetSize()[2]
        _write_dicom_series(grid, base / "T1DUAL/DICOM_anon/InPhase", _names(n))
        _write_dicom_series(second, base / "T1DUAL/DICOM_anon/OutPhase", _names(n))
        _write_dicom_series(grid, base / "T2SPIR/DICOM_anon", _names(n, reverse=True))
        if split == "Train_Sets":
            _write_ground(labels, base / "T1DUAL/Ground", _names(n))
            reversed_order = np.argsort(_names(n, reverse=True))  # slice index of each PNG in sorted order
            _write_ground(labels[reversed_order], base / "T2SPIR/Ground", sorted(_names(n, reverse=True)))


def _assert_same_image(converted, array, grid):
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), array)
    assert converted.GetSize() == grid.GetSize()
    for field in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(converted, field)(), getattr(grid, field)(), atol=1e-5, err_msg=field)


def test_convert_is_exact_including_orientation(tmp_path, volumes, cli_main):
    _write_release(tmp_path / "CHAOS", volumes)
    out = tmp_path / "Dataset667_CHAOS_MR"
    assert cli_main(["convert", "chaos", str(tmp_path / "CHAOS"), "--out", str(out)]) == 0
    (grid1, labels1), (grid2, _) = volumes
    hu1 = sitk.GetArrayFromImage(grid1)

    def read(relative):
        return sitk.ReadImage(str(out / relative))

    _assert_same_image(read("imagesTr/CHAOS_1_T1DUAL_0000.nii.gz"), hu1, grid1)
    _assert_same_image(read("imagesTr/CHAOS_1_T1DUAL_0001.nii.gz"), hu1 + 7, grid1)
    _assert_same_image(read("labelsTr/CHAOS_1_T1DUAL.nii.gz"), labels1, grid1)
    # T2SPIR files were named against the slice order: the stack follows the names, the geometry follows along
    flipped = sitk.Flip(grid1, [False, False, True])
    _assert_same_image(read("imagesTr/CHAOS_1_T2SPIR_0000.nii.gz"), hu1[::-1], flipped)
    _assert_same_image(read("imagesTr/CHAOS_1_T2SPIR_0001.nii.gz"), hu1[::-1], flipped)
    _assert_same_image(read("labelsTr/CHAOS_1_T2SPIR.nii.gz"), labels1[::-1], flipped)
    _assert_same_image(read("imagesTs/CHAOS_2_T1DUAL_0000.nii.gz"), sitk.GetArrayFromImage(grid2), grid2)
    assert not (out / "labelsTr/CHAOS_2_T1DUAL.nii.gz").exists()
    order = json.loads((out / "chaos_dicom_order.json").read_text(encoding="utf-8"))
    assert order["CHAOS_1_T2SPIR"]["dicom_files"] == [f"{n}.dcm" for n in sorted(_names(6))]
    test_entry = order["CHAOS_2_T1DUAL"]
    assert (test_entry["split"], test_entry["rows"], test_entry["cols"]) == ("test", 36, 48)
    dataset = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["numTraining"] == 2 and dataset["labels"]["spleen"] == 4 and len(dataset["channel_names"]) == 2
    verify_dataset_integrity(str(out), 1)  # nnU-Net accepts the dataset
    assert convert_chaos(tmp_path / "CHAOS", out).train_cases == ["CHAOS_1_T1DUAL", "CHAOS_1_T2SPIR"]  # resumes


def test_export_round_trip(tmp_path, volumes, cli_main):
    release, out = tmp_path / "CHAOS", tmp_path / "Dataset667_CHAOS_MR"
    _write_release(release, volumes)
    convert_chaos(release, out)
    pred = tmp_path / "pred"
    pred.mkdir()
    for name in ("CHAOS_1_T1DUAL", "CHAOS_1_T2SPIR"):  # prediction = the converted label
        (pred / f"{name}.nii.gz").write_bytes((out / f"labelsTr/{name}.nii.gz").read_bytes())
    for sequence, array in (("T1DUAL", volumes[1][1]), ("T2SPIR", volumes[1][1][::-1])):
        label = sitk.GetImageFromArray(np.ascontiguousarray(array))
        label.CopyInformation(sitk.ReadImage(str(out / f"imagesTs/CHAOS_2_{sequence}_0000.nii.gz")))
        sitk.WriteImage(label, str(pred / f"CHAOS_2_{sequence}.nii.gz"))
    submission = tmp_path / "submission.zip"
    assert cli_main(["export", "chaos", str(pred), str(out), str(submission), "--cases", "all"]) == 0
    with zipfile.ZipFile(submission) as archive:
        archive.extractall(tmp_path / "unzipped")
    order = json.loads((out / "chaos_dicom_order.json").read_text(encoding="utf-8"))
    for name, entry in order.items():
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{name}.nii.gz")))
        np.testing.assert_array_equal(read_submission_case(tmp_path / "unzipped", 5, entry), expected)
        liver_only = read_submission_case(tmp_path / "unzipped", 3, entry)
        np.testing.assert_array_equal(liver_only, np.where(expected == 1, 1, 0))
        results = tmp_path / f"unzipped/Task5/MR/{entry['patient_id']}/{entry['sequence']}/Results"
        assert sorted(p.name for p in results.iterdir()) == [n.replace(".dcm", ".png") for n in entry["dicom_files"]]
        first_dicom = pydicom.dcmread(f"{entry['dicom_dir']}/{entry['dicom_files'][0]}")
        with Image.open(results / entry["dicom_files"][0].replace(".dcm", ".png")) as png:
            assert png.mode == "L" and np.asarray(png).shape == first_dicom.pixel_array.shape
    ground, _ = read_png_stack(release / "Train_Sets/MR/1/T2SPIR/Ground")
    exported, _ = read_png_stack(tmp_path / "unzipped/Task5/MR/1/T2SPIR/Results")
    np.testing.assert_array_equal(exported, ground)  # the submission reproduces the release's own PNGs


def test_export_only_test_cases_and_requires_all(tmp_path, volumes):
    release, out = tmp_path / "CHAOS", tmp_path / "ds"
    _write_release(release, volumes)
    convert_chaos(release, out)
    (tmp_path / "pred").mkdir()
    label = sitk.GetImageFromArray(volumes[1][1])
    label.CopyInformation(sitk.ReadImage(str(out / "imagesTs/CHAOS_2_T1DUAL_0000.nii.gz")))
    sitk.WriteImage(label, str(tmp_path / "pred/CHAOS_2_T1DUAL.nii.gz"))
    with pytest.raises(DataError, match="CHAOS_2_T2SPIR"):
        export_chaos(tmp_path / "pred", out, tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()


def test_png_grey_ranges():
    grey = np.array([[0, 55, 63, 70], [110, 135, 175, 200], [240, 252, 255, 0]], np.uint8)
    np.testing.assert_array_equal(png_to_labels(grey), [[0, 1, 1, 1], [2, 2, 3, 3], [4, 4, 4, 0]])
    with pytest.raises(DataError, match=r"\[100\]"):
        png_to_labels(np.array([[0, 100]], np.uint8), "slice.png")
