"""Bad inputs made from real data never become stored images: one clear reason each, exit 1."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import torch
import SimpleITK as sitk

from pumit_nnunet.corpus.convert import ConvertOptions, convert, describe_error
from pumit_nnunet.corpus.loader import build_pretrain_loader
from pumit_nnunet.corpus.readers import load_source
from pumit_nnunet.corpus.report import validate_store
from pumit_nnunet.corpus.sampler import CropGrid
from pumit_nnunet.corpus.store import member_path, read_manifest
from tests.test_corpus_convert import _write_dicom_series

sitk.ProcessObject.SetGlobalWarningDisplay(False)


@pytest.fixture(scope="module")
def ct(real_demo_dir):
    image = sitk.ReadImage(str(real_demo_dir / "Dataset902_RealCTLungNodule" / "imagesTr" / "lung1_0000.nii.gz"))
    return sitk.Shrink(image, (8, 8, 1))[:, :, :12]


def _failures(folder, out, **kwargs):
    report = convert([folder], out, progress=False, **kwargs)
    return report, dict((os.path.basename(s), e) for s, e in report.failures)


def test_truncated_gzip_and_header_dims_beyond_data_are_refused(ct, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    sitk.WriteImage(ct, str(raw / "good.nii.gz"))
    data = (raw / "good.nii.gz").read_bytes()
    (raw / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    plain = gzip.decompress(data)
    (raw / "short.nii").write_bytes(plain[: len(plain) - 4096])  # header dims exceed the voxel bytes
    report, failed = _failures(raw, tmp_path / "store")
    assert report.converted == 1 and set(failed) == {"truncated.nii.gz", "short.nii"}
    assert "truncated gzip stream" in failed["truncated.nii.gz"]
    assert "exceed the data" in failed["short.nii"]


def test_gapped_and_truncated_dicom_series_fail_unless_resampling_is_asked(ct, tmp_path):
    _write_dicom_series(ct, tmp_path / "raw" / "gap")
    (tmp_path / "raw" / "gap" / "slice005.dcm").unlink()
    report, failed = _failures(tmp_path / "raw", tmp_path / "store")
    assert report.converted == 0 and "gap of" in failed["gap"] and "missing or unevenly spaced" in failed["gap"]
    resampled = convert([tmp_path / "raw"], tmp_path / "store2", progress=False,
                        options=ConvertOptions(resample_uneven=True))
    assert resampled.converted == 1
    row = read_manifest(tmp_path / "store2").iloc[0]
    assert row.spacing_d == pytest.approx(ct.GetSpacing()[2])
    _write_dicom_series(ct, tmp_path / "raw3" / "cut")
    victim = tmp_path / "raw3" / "cut" / "slice004.dcm"
    victim.write_bytes(victim.read_bytes()[:-500])
    report, failed = _failures(tmp_path / "raw3", tmp_path / "store3")
    assert report.converted == 0 and any("truncated DICOM slice" in e for e in failed.values())


def test_cine_multiframe_dicom_is_time_not_depth_and_needs_pixel_spacing(ct, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = sitk.GetArrayFromImage(ct)[:6].astype(np.uint16)
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, spacing in (("cine.dcm", True), ("nospacing.dcm", False)):
        (raw / name[:-4]).mkdir()  # one file per folder: each is its own (multi-frame) item
        meta = FileMetaDataset()
        meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(raw / name[:-4] / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "MR", meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns, ds.NumberOfFrames = frames.shape[1], frames.shape[2], frames.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.FrameTime, ds.FrameIncrementPointer = 33.3, pydicom.tag.Tag(0x0018, 0x1063)
        if spacing:
            ds.PixelSpacing = [0.7, 0.7]
        ds.PixelData = (frames + 1024).tobytes()
        ds.save_as(str(raw / name[:-4] / name), enforce_file_format=True)
    report, failed = _failures(raw, tmp_path / "store")
    assert "no pixel spacing" in failed["nospacing.dcm"]
    frame = read_manifest(tmp_path / "store")
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == 6 and set(ok["shape_d"]) == {1} and ok["key"].str.contains("-t").all()
    assert ok["spacing_h"].iloc[0] == pytest.approx(0.7)


def test_nonfinite_voxels_are_counted_replaced_or_refused(ct, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    for name, fill in (("few", 0.001), ("many", 0.2), ("all", 1.0)):
        values = array.copy()
        values.reshape(-1)[: int(values.size * fill)] = np.nan
        image = sitk.GetImageFromArray(values)
        image.CopyInformation(ct)
        sitk.WriteImage(image, str(raw / f"{name}.nrrd"))  # ITK's NIfTI writer turns NaN into 0
    report, failed = _failures(raw, tmp_path / "store")
    assert report.converted == 1 and "no finite voxels" in failed["all.nrrd"]
    assert "20.00% of the voxels are NaN" in failed["many.nrrd"]
    assert report.warnings and "NaN/Inf voxels replaced" in report.warnings[0][1]


def test_nonfinite_voxels_inside_nifti_are_counted_on_the_raw_data(ct, tmp_path):
    """ITK's NIfTI reader turns NaN/Inf into 0; the raw voxel bytes are counted, so the threshold applies."""
    import nibabel as nib  # an independent writer (a dependency of nnU-Net) that keeps NaN in the file

    raw = tmp_path / "raw"
    raw.mkdir()
    sitk.WriteImage(sitk.Cast(ct, sitk.sitkFloat32), str(tmp_path / "float.nii"))
    source = nib.load(tmp_path / "float.nii")
    values = np.asarray(source.dataobj, dtype=np.float32)
    for name, fill in (("few.nii.gz", 0.002), ("many.nii", 0.2), ("all.nii.gz", 1.0)):
        flat = values.reshape(-1, order="F").copy()  # the file's voxel order (x fastest)
        flat[: int(flat.size * fill)] = np.nan
        flat[-1] = np.inf
        bad = flat.reshape(values.shape, order="F")
        nib.save(nib.Nifti1Image(bad, source.affine, source.header), raw / name)
    assert np.count_nonzero(~np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "few.nii.gz"))))) == 0
    loaded = load_source(str(raw / "few.nii.gz"))[0].array[0]  # (D, H, W) = the file's (z, y, x)
    expected = ~np.isfinite(np.asarray(nib.load(raw / "few.nii.gz").dataobj)).T
    assert expected.sum() > 1 and np.array_equal(~np.isfinite(loaded), expected)
    report, failed = _failures(raw, tmp_path / "store")
    assert report.converted == 1 and "no finite voxels" in failed["all.nii.gz"]
    assert "20.00% of the voxels are NaN" in failed["many.nii"]
    row = read_manifest(tmp_path / "store").query("status == 'ok'").iloc[0]
    assert row.nonfinite_fraction == pytest.approx(expected.sum() / expected.size)
    assert report.warnings and "NaN/Inf voxels replaced" in report.warnings[0][1]


def test_truncated_or_corrupt_metaimage_and_nrrd_are_refused(ct, tmp_path):
    """Measured: ITK refuses truncated MetaImage with "No such file or directory" and reads a corrupt zlib
    stream as wrong voxels without an error; teem refuses broken NRRD itself. Each gets a clear reason."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, compress in (("good.mha", True), ("cut.mha", True), ("flip.mha", True), ("cutraw.mha", False),
                           ("cut.nrrd", True), ("cutraw.nrrd", False)):
        sitk.WriteImage(ct, str(raw / name), compress)
        data = bytearray((raw / name).read_bytes())
        if name == "flip.mha":
            middle = len(data) // 2
            data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        elif name != "good.mha":
            data = data[: len(data) * 2 // 3]
        (raw / name).write_bytes(bytes(data))
    sitk.WriteImage(ct, str(raw / "detached.mhd"))  # header + detached .raw whose data is cut
    (raw / "detached.raw").write_bytes((raw / "detached.raw").read_bytes()[:1000])
    report, failed = _failures(raw, tmp_path / "store")
    assert report.converted == 1 and set(failed) == {"cut.mha", "flip.mha", "cutraw.mha", "cut.nrrd", "cutraw.nrrd",
                                                      "detached.mhd"}
    assert "compressed voxel data ends early" in failed["cut.mha"]
    assert "compressed voxel data" in failed["flip.mha"]
    assert "need" in failed["cutraw.mha"] and "the file holds" in failed["cutraw.mha"]
    assert "detached.raw" in failed["detached.mhd"] and "the file holds 1000" in failed["detached.mhd"]
    assert "expected" in failed["cut.nrrd"] and "fread got only" in failed["cutraw.nrrd"]


def test_changed_source_is_reconverted_and_replaced(ct, tmp_path, cli_main):
    raw = tmp_path / "raw"
    raw.mkdir()
    sitk.WriteImage(ct, str(raw / "a.nii.gz"))
    assert cli_main(["corpus", "convert", str(raw), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    old = member_path(tmp_path / "s", read_manifest(tmp_path / "s").iloc[0])
    sitk.WriteImage(ct[:, :, :8], str(raw / "a.nii.gz"))
    report = convert([raw], tmp_path / "s", progress=False)
    assert report.changed == [str(raw / "a.nii.gz")] and report.converted == 1
    row = read_manifest(tmp_path / "s").iloc[0]
    assert row.shape_d <= 8 and not old.exists() and member_path(tmp_path / "s", row).exists()
    assert convert([raw], tmp_path / "s", progress=False).skipped == 1
    (raw / "a.nii.gz").write_bytes(b"not gzip")  # a source that changed into a broken one leaves no stale image
    assert cli_main(["corpus", "convert", str(raw), "--out", str(tmp_path / "s"), "--no-progress"]) == 1
    frame = read_manifest(tmp_path / "s")
    assert (frame["status"] == "ok").sum() == 0


def _without_file_access_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the child (root or
    not) is held to file modes like any user, while still reaching the interpreter under root's home."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _convert_held_to_file_modes(raw, out):
    """``pumit-nnunet corpus convert`` in a child process that file modes apply to (the real path, even as root)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "pumit_nnunet.cli", "corpus", "convert", str(raw), "--out", str(out), "--no-progress"]
    probe = [sys.executable, "-c", f"open({str(raw / 'a.nii.gz')!r}, 'rb')"]
    preexec = _without_file_access_override if os.geteuid() == 0 else None
    try:
        if subprocess.run(probe, preexec_fn=preexec, capture_output=True).returncode == 0:
            pytest.skip("cannot run as root without overriding file modes (dropping CAP_DAC_OVERRIDE had no effect)")
    except subprocess.SubprocessError as error:
        pytest.skip(f"cannot run as root without overriding file modes: {error}")
    return subprocess.run(command, preexec_fn=preexec, capture_output=True, text=True, timeout=300)


def test_permission_denied_is_named(ct, tmp_path):
    assert describe_error(PermissionError(13, "Permission denied", "/x/a.nii.gz")) == "permission denied: /x/a.nii.gz"
    raw = tmp_path / "raw"
    (raw / "locked").mkdir(parents=True)
    sitk.WriteImage(ct, str(raw / "a.nii.gz"))
    sitk.WriteImage(ct, str(raw / "b.nii.gz"))
    sitk.WriteImage(ct, str(raw / "locked" / "c.nii.gz"))
    os.chmod(raw / "a.nii.gz", 0)
    os.chmod(raw / "locked", 0)
    try:
        result = _convert_held_to_file_modes(raw, tmp_path / "store")
    finally:
        os.chmod(raw / "a.nii.gz", 0o644)
        os.chmod(raw / "locked", 0o755)
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert result.returncode == 1, result.stderr
    assert any("a.nii.gz" in line and "permission denied" in line for line in errors), result.stderr
    assert any("locked" in line and "permission denied" in line for line in errors), result.stderr
    assert (read_manifest(tmp_path / "store")["status"] == "ok").sum() == 1  # b.nii.gz


def test_broken_member_is_skipped_counted_and_validated(ct, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16) + i, str(raw / f"c{i}.nii.gz"))
    convert([raw], tmp_path / "s", progress=False)
    frame = read_manifest(tmp_path / "s")
    victim = member_path(tmp_path / "s", frame.iloc[0])
    victim.write_bytes(victim.read_bytes()[:200])
    assert len(validate_store(tmp_path / "s").problems) == 1
    loader = build_pretrain_loader(tmp_path / "s", 2, CropGrid(1, 1), seed=0, split="all", block_size=32)
    batches = [b for _, b in zip(range(6), loader)]
    assert all(b.image.shape[0] == 2 for b in batches) and loader.skipped > 0
    assert batches[-1].skipped == loader.skipped and list(loader.broken) == [str(victim)]
    assert capsys.readouterr().err.count("unreadable stored image") == 1


def test_broken_member_count_and_stream_do_not_depend_on_workers(ct, tmp_path, capsys):
    """Each worker meets the broken file on its own; the replaced crops are counted once each by the main
    process, and the other crops' random draws do not depend on which worker already knew the file was broken."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        sitk.WriteImage(sitk.Cast(ct, sitk.sitkInt16) + i, str(raw / f"c{i}.nii.gz"))
    convert([raw], tmp_path / "s", progress=False)
    victim = member_path(tmp_path / "s", read_manifest(tmp_path / "s").iloc[1])
    victim.write_bytes(victim.read_bytes()[:200])
    runs = {}
    for workers in (0, 2):
        loader = build_pretrain_loader(tmp_path / "s", 2, CropGrid(1, 1), seed=3, split="all", block_size=32,
                                       num_workers=workers)
        runs[workers] = (loader, [b for _, b in zip(range(8), loader)])
    (serial, serial_batches), (parallel, parallel_batches) = runs[0], runs[2]
    assert serial.skipped > 0 and parallel.skipped == serial.skipped
    assert [b.skipped for b in parallel_batches] == [b.skipped for b in serial_batches]
    for a, b in zip(serial_batches, parallel_batches):
        assert a.keys == b.keys and torch.equal(a.image, b.image)
    assert capsys.readouterr().err.count("unreadable stored image") == 2  # once per loader, not per worker
