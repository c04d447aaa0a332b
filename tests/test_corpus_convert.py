"""End-to-end conversion of real demo images laid out in public raw layouts, failures, resume, CLI."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from pumit_nnunet.corpus.api import ensure_store
from pumit_nnunet.errors import UsageError
from pumit_nnunet.corpus.convert import convert
from pumit_nnunet.corpus.preprocess import crop_foreground, percentiles_above_min
from pumit_nnunet.corpus.report import corpus_counts, validate_store
from pumit_nnunet.corpus.store import member_path, open_array, read_manifest

sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _shrink(path, factors):
    return sitk.Shrink(sitk.ReadImage(str(path)), factors)


def _write_dicom_series(image: sitk.Image, folder):
    """A CT DICOM series (one file per axial slice) with the geometry tags GDCM needs to stack it."""
    folder.mkdir(parents=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    direction = image.GetDirection()
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        tags = {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".1",
                "0008|0018": f"{series_uid}.2.{z}", "0020|0013": str(z),
                "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))),
                "0020|0037": "\\".join(map(str, direction[0:3] + direction[3:6])),
                "0018|0050": str(image.GetSpacing()[2]), "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}"}
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


def _nifti_without_spacing(path):
    image = sitk.GetImageFromArray(np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8))
    sitk.WriteImage(image, str(path))
    header = bytearray(path.read_bytes())
    header[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]
    header[252:256] = struct.pack("<2h", 0, 0)  # qform_code, sform_code
    path.write_bytes(bytes(header))


@pytest.fixture(scope="module")
def layouts(real_demo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    # MSD / nnU-Net v2 style: imagesTr + dataset.json; the coronal MRI and a 6.5 mm MRI
    msd = root / "Dataset990_DemoMR"
    (msd / "imagesTr").mkdir(parents=True)
    brain = real_demo_dir / "Dataset901_RealBrainMaskT1" / "imagesTr" / "mni152_coronal_0000.nii.gz"
    shutil.copy(brain, msd / "imagesTr" / "head_0000.nii.gz")
    lesion = real_demo_dir / "Dataset903_RealMRBrainLesion" / "imagesTr" / "brain1_0000.nii.gz"
    sitk.WriteImage(_shrink(lesion, (4, 4, 1)), str(msd / "imagesTr" / "lesion_0000.nii.gz"))
    (msd / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0},
                                                  "numTraining": 2, "file_ending": ".nii.gz"}))
    # MSD v1 style: one 4D file holding two modalities
    msd4d = root / "Task05_Demo4D"
    (msd4d / "imagesTr").mkdir(parents=True)
    small = _shrink(lesion, (8, 8, 1))
    sitk.WriteImage(sitk.JoinSeries([small, 1000 - small]), str(msd4d / "imagesTr" / "case_001.nii.gz"))
    (msd4d / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "bg"}}))
    # TotalSegmentator style: sXXXX/ct.nii.gz, stored with the axes permuted (z is not the file's slice axis)
    total = root / "TotalSegmentator"
    for case, name in (("s0001", "lung1"), ("s0002", "lung2"), ("s0864", "lung1")):
        (total / case / "segmentations").mkdir(parents=True)
        ct = _shrink(real_demo_dir / "Dataset902_RealCTLungNodule" / "imagesTr" / f"{name}_0000.nii.gz", (4, 4, 1))
        sitk.WriteImage(sitk.PermuteAxes(ct, [2, 0, 1]), str(total / case / "ct.nii.gz"))
        sitk.WriteImage(ct > 0, str(total / case / "segmentations" / "lung.nii.gz"))
    # a DICOM series folder written from a demo CT
    chest = real_demo_dir / "Dataset904_RealCTChestTissue" / "imagesTr" / "lung1_0000.nii.gz"
    _write_dicom_series(_shrink(chest, (4, 4, 1)), root / "dicom" / "patient1" / "series1")
    # a folder of 2D images, plus broken and non-image files
    flat = root / "images2d"
    shutil.copytree(real_demo_dir / "extras_2d_demo", flat)
    (flat / "notes.txt").write_text("not an image")
    (flat / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    _nifti_without_spacing(flat / "nospacing.nii")
    return root


@pytest.fixture(scope="module")
def store(layouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "corpus"
    report = convert([layouts / "Dataset990_DemoMR", layouts / "Task05_Demo4D", layouts / "dicom", layouts / "images2d"],
                     out, num_workers=0, progress=False)
    report_total = convert([layouts / "TotalSegmentator"], out, dataset="TotalSegmentator", num_workers=2, progress=False)
    assert report_total.converted == 2 and not report_total.failures
    assert report.failed == 3
    return out


def _row(frame, key):
    rows = frame[frame["key"] == key]
    assert len(rows) == 1, (key, frame["key"].tolist())
    return rows.iloc[0]


def test_every_layout_converts_with_the_right_modalities(store):
    frame = read_manifest(store)
    ok = frame[frame["status"] == "ok"]
    assert set(ok["dataset"]) == {"Dataset990_DemoMR", "Task05_Demo4D", "dicom", "images2d", "TotalSegmentator"}
    assert _row(frame, "Dataset990_DemoMR/imagesTr/head_0000").modality == "MRI/T1"
    assert _row(frame, "Task05_Demo4D/imagesTr/case_001-m0").modality == "MRI/T2"
    assert _row(frame, "Task05_Demo4D/imagesTr/case_001-m1").modality == "MRI/ADC"
    assert _row(frame, "dicom/patient1/series1").modality == "CT"
    assert _row(frame, "images2d/retina").modality == "RGB/photo" and _row(frame, "images2d/retina").channels == 3
    assert _row(frame, "images2d/US1_UNCI").modality == "RGB/US"
    assert _row(frame, "images2d/RG1_UNCI").modality == "gray/XR"
    assert sorted(k for k in ok["key"] if k.startswith("TotalSegmentator")) == ["TotalSegmentator/s0001/ct",
                                                                              "TotalSegmentator/s0002/ct"]
    assert (ok["split"] == "val").sum() >= 2 and set(ok["split"]) == {"train", "val"}
    assert validate_store(store).problems == []


def test_depth_axis_keeps_the_physical_meaning(store):
    frame = read_manifest(store)
    head = _row(frame, "Dataset990_DemoMR/imagesTr/head_0000")  # coronal acquisition, 2 x 2 x 3 mm
    assert (head.spacing_d, head.spacing_h, head.spacing_w) == (3.0, 2.0, 2.0) and head.shape_d <= 62
    for key in ("TotalSegmentator/s0001/ct", "TotalSegmentator/s0002/ct"):  # 5 mm CTs written with permuted axes
        row = _row(frame, key)
        assert row.spacing_d == pytest.approx(5.0) and row.spacing_h == pytest.approx(row.spacing_w)
        assert row.shape_d <= 61 and row.shape_h <= 128
    series = _row(frame, "dicom/patient1/series1")
    assert series.spacing_d == pytest.approx(5.0, rel=1e-3) and series.spacing_h == pytest.approx(1.1406 * 4, rel=1e-2)
    for key in ("images2d/retina", "images2d/693_UNCI"):
        assert _row(frame, key).spacing_d == 1e8 and _row(frame, key).shape_d == 1


def test_stored_values_are_the_numpy_percentile_scaling(store, real_demo_dir):
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(real_demo_dir / "Dataset901_RealBrainMaskT1" / "imagesTr"
                                                       / "mni152_coronal_0000.nii.gz")))[None]
    cropped = crop_foreground(source, natural=False)
    low, high = percentiles_above_min(cropped)
    expected = np.clip((cropped.astype(np.float64) - low) / (high - low), 0, 1)
    row = _row(read_manifest(store), "Dataset990_DemoMR/imagesTr/head_0000")
    stored = open_array(member_path(store, row))[...] / row.levels
    assert stored.shape == expected.shape
    np.testing.assert_allclose(stored, expected, atol=0.5 / row.levels + 1e-6)
    assert (row.p0_5, row.p99_5) == pytest.approx((low, high))


def test_large_2d_images_are_resized_to_512_on_the_short_side(store):
    row = _row(read_manifest(store), "images2d/RG1_UNCI")
    assert min(row.shape_h, row.shape_w) == 512 and row.spacing_h > 1.0


def test_failures_are_recorded_with_reasons_and_the_run_goes_on(store):
    frame = read_manifest(store)
    failed = frame[frame["status"] == "failed"].set_index("key")["error"].to_dict()
    assert set(failed) == {"images2d/notes.txt", "images2d/broken", "images2d/nospacing"}
    assert "not an image" in failed["images2d/notes.txt"]
    assert "corrupt gzip stream" in failed["images2d/broken"]
    assert "spacing" in failed["images2d/nospacing"]


def test_rerun_skips_done_items_and_refuses_to_write_into_sources(store, layouts):
    again = convert([layouts / "images2d"], store, num_workers=0, progress=False)
    assert again.converted == 0 and again.skipped == 7 and again.failed == 3
    with pytest.raises(UsageError, match="must not be inside"):
        convert([layouts / "images2d"], layouts / "images2d" / "store", progress=False)


def test_parts_split_the_work_without_overlap(layouts, tmp_path):
    for part in range(2):
        convert([layouts / "images2d"], tmp_path / "s", num_workers=0, part=part, parts=2, progress=False)
    frame = read_manifest(tmp_path / "s")
    assert (frame["status"] == "ok").sum() == 7 and frame["key"].is_unique


def test_counts_and_ensure_store(store, layouts, tmp_path):
    counts = corpus_counts(store)
    assert counts["by_aniso_d"][5] == 7 and counts["failed"] == 3
    assert counts["by_dataset"]["TotalSegmentator"] == 2
    assert ensure_store(store, tmp_path) == store
    made = ensure_store(layouts / "Task05_Demo4D", tmp_path)
    assert made.parent == tmp_path and corpus_counts(made)["images"] == 2


def test_cli_convert_inspect_validate_add(layouts, tmp_path, capsys, cli_main):
    out = tmp_path / "cli-store"
    assert cli_main(["corpus", "convert", str(layouts / "Task05_Demo4D"), "--out", str(out), "--no-progress"]) == 0
    assert cli_main(["corpus", "add", str(out), str(layouts / "dicom"), "--name", "MyCT", "--modality", "CT",
                              "--multiplier", "0.5", "--no-progress"]) == 0
    assert cli_main(["corpus", "inspect", str(out), "--plot", str(tmp_path / "counts.png")]) == 0
    printed = capsys.readouterr().out
    assert '"MyCT": 1' in printed and (tmp_path / "counts.png").stat().st_size > 0
    row = _row(read_manifest(out), "MyCT/patient1/series1")
    assert row.modality == "CT" and row.multiplier == 0.5
    assert json.loads((out / "catalog.json").read_text(encoding="utf-8"))["datasets"][0]["name"] == "MyCT"
    assert cli_main(["corpus", "validate", str(out)]) == 0
    member_path(out, _row(read_manifest(out), "MyCT/patient1/series1")).write_bytes(b"broken")
    assert cli_main(["corpus", "validate", str(out)]) == 1


def test_console_script_runs(store):
    exe = shutil.which("pumit-nnunet")
    if exe is None:
        pytest.skip("pumit-nnunet console script not installed")
    result = subprocess.run([exe, "corpus", "validate", str(store)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "0 problems" in result.stdout


def test_corpus_cli_registers_one_subparser():
    import argparse

    from pumit_nnunet.corpus.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["corpus", "convert", "a", "b", "--out", "s", "--workers", "2", "--part", "1", "--parts", "3"])
    assert args.sources == ["a", "b"] and (args.workers, args.part, args.parts) == (2, 1, 3) and callable(args.func)
    if sys.platform != "win32":
        assert parser.parse_args(["corpus", "inspect", "s"]).func is not None


def test_arrays_of_the_previous_layout_read_the_same(tmp_path, real_demo_dir):
    """Store files carry their own chunks, blocks, codec and filters: an image written with the layout before
    the cold-read tuning (16x128x128 chunks, BITSHUFFLE) reads exactly as one written with today's."""
    import blosc2

    from pumit_nnunet.corpus.store import CHUNK, read_box, write_array

    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(real_demo_dir / "Dataset903_RealMRBrainLesion" / "imagesTr"
                                                       / "brain2_0000.nii.gz")))
    data = np.clip(volume, 0, 65535).astype(np.uint16)[None]
    old = tmp_path / "old.b2nd"
    blosc2.asarray(data, urlpath=str(old), mode="w", chunks=(1, 16, 128, 128), blocks=(1, 16, 32, 32),
                   cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE]})
    write_array(tmp_path / "new.b2nd", data)
    new = open_array(tmp_path / "new.b2nd")
    assert new.chunks[2:] == tuple(min(CHUNK[1], s) for s in data.shape[2:])
    for start in ((0, 0, 0), (3, 100, 37), (-5, 200, 240)):
        expected = read_box(data, start, (16, 96, 96))
        assert np.array_equal(read_box(open_array(old), start, (16, 96, 96)), expected)
        assert np.array_equal(read_box(new, start, (16, 96, 96)), expected)
