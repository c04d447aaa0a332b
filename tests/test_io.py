"""Atomic writes: leftovers of killed writers are swept (never a live writer's file), normal file modes, strict JSON."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from pumit_nnunet import io as pio

WRITER = textwrap.dedent("""
    import sys, time
    from pumit_nnunet.io import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"half a file")
            handle.flush()
        print(tmp, flush=True)
        time.sleep(600)  # killed here, mid-write
""")


def _start_writer(target):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    tmp = process.stdout.readline().strip()
    assert tmp and os.path.exists(tmp)
    return process, tmp


def test_a_killed_writers_temporary_file_is_swept_but_a_live_one_is_kept(tmp_path):
    killed, killed_tmp = _start_writer(tmp_path / "result.json")
    live, live_tmp = _start_writer(tmp_path / "other.json")
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        assert os.path.exists(killed_tmp) and not (tmp_path / "result.json").exists()  # what kill -9 leaves
        pio._swept.clear()  # as in a new run
        pio.write_text_atomic(tmp_path / "result.json", "done\n")
        assert not os.path.exists(killed_tmp)
        assert os.path.exists(live_tmp)  # the concurrent writer's file is untouched
        assert (tmp_path / "result.json").read_text() == "done\n"
    finally:
        live.kill()
        live.wait()


def test_sweep_leaves_foreign_files_and_recent_unknown_writers_alone(tmp_path):
    (tmp_path / "data.csv").write_text("x")
    foreign = tmp_path / ".data.csv.otherhost-1.abcdefgh.tmp"  # another machine on a shared file system
    legacy_old = tmp_path / ".data.csv.abcdefgh.tmp"  # the older naming, writer unknown
    unrelated = tmp_path / ".notes.tmp"
    for path in (foreign, legacy_old, unrelated):
        path.write_text("x")
    old = time.time() - 2 * pio.STALE_AFTER_S
    os.utime(legacy_old, (old, old))
    os.utime(unrelated, (old, old))
    assert pio.sweep_stale_temporaries(tmp_path) == [legacy_old]
    assert foreign.exists() and unrelated.exists()
    os.utime(foreign, (old, old))
    assert pio.sweep_stale_temporaries(tmp_path) == [foreign]


def test_outputs_get_the_users_file_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        pio.write_text_atomic(tmp_path / "a.txt", "a")
        pio.write_json_atomic(tmp_path / "b.json", {"a": 1})
        assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o640)
        os.umask(0o002)
        pio.write_text_atomic(tmp_path / "a.txt", "again")  # replacing a file: the current umask applies
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o664
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


def test_image_writes_leave_no_temporary_and_normal_mode(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    import numpy as np

    image = sitk.GetImageFromArray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    pio.write_image_atomic(image, tmp_path / "case.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]
    assert (tmp_path / "case.nii.gz").stat().st_mode & 0o777 == pio.default_file_mode()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.nii.gz"))),
                                  sitk.GetArrayFromImage(image))
    with pytest.raises(ValueError, match="second file"):
        pio.write_image_atomic(image, tmp_path / "case.mhd")


def test_json_is_strict_and_nonfinite_values_round_trip(tmp_path):
    with pytest.raises(ValueError):
        pio.write_json_atomic(tmp_path / "m.json", {"hd": math.inf})
    assert not (tmp_path / "m.json").exists()
    data = {"case": "a", "metrics": {"1": {"dice": 0.0, "hd": math.inf, "low": -math.inf, "ravd": math.nan}}}
    pio.write_json_atomic(tmp_path / "m.json", pio.nonfinite_to_null(data))
    text = (tmp_path / "m.json").read_text()
    stored = json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token}"))
    assert stored["metrics"]["1"] == {"dice": 0.0, "hd": None, "hd_status": "inf", "low": None, "low_status": "-inf",
                                      "ravd": None, "ravd_status": "nan"}
    back = pio.null_to_nonfinite(stored)["metrics"]["1"]
    assert back["hd"] == math.inf and back["low"] == -math.inf and math.isnan(back["ravd"]) and back["dice"] == 0.0
    assert set(back) == {"dice", "hd", "low", "ravd"}
    with pytest.raises(ValueError, match=r"\$\.values\[1\]"):
        pio.nonfinite_to_null({"values": [1.0, math.nan]})


def test_symlinks_are_placed_atomically_without_touching_the_source_mode(tmp_path):
    from pumit_nnunet.io import symlink_atomic

    source = tmp_path / "scan.nii.gz"
    source.write_bytes(b"voxels")
    os.chmod(source, 0o400)
    target = tmp_path / "raw" / "case_0000.nii.gz"
    symlink_atomic(source, target)
    symlink_atomic(source, target)  # replacing an existing link is one rename as well
    assert target.is_symlink() and target.resolve() == source
    assert stat.S_IMODE(source.stat().st_mode) == 0o400
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def _folder_with(path, **files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_replace_folder_atomic_swaps_in_the_new_folder_and_removes_the_old(tmp_path):
    target = _folder_with(tmp_path / "dataset", old="1", shared="old")
    pio.replace_folder_atomic(_folder_with(tmp_path / ".partial-dataset-new", new="2", shared="new"), target)
    assert _listing(target) == ["new", "shared"] and (target / "shared").read_text() == "new"
    assert _listing(tmp_path) == ["dataset"]  # neither the staging folder nor the old one is left behind
    pio.replace_folder_atomic(_folder_with(tmp_path / ".partial-fresh", only="3"), tmp_path / "fresh")
    assert _listing(tmp_path / "fresh") == ["only"]


def test_a_failed_or_interrupted_swap_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    target = _folder_with(tmp_path / "dataset", old="1")
    with pytest.raises(FileNotFoundError):
        pio.replace_folder_atomic(tmp_path / ".partial-missing", target)
    assert _listing(target) == ["old"] and _listing(tmp_path) == ["dataset"]

    real_rename, calls = os.rename, []

    def interrupted_second_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:  # after the old folder went aside, before the new one is in place
            raise KeyboardInterrupt
        real_rename(source, destination)

    staging = _folder_with(tmp_path / ".partial-dataset-new", new="2")
    monkeypatch.setattr(os, "rename", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        pio.replace_folder_atomic(staging, target)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, the interrupted swap, and putting the old folder back
    assert (target / "old").read_text() == "1" and _listing(target) == ["old"]
    assert _listing(tmp_path) == [".partial-dataset-new", "dataset"]  # the caller's staging folder is its own


def test_remove_folder_and_the_sweep_of_stale_partial_folders(tmp_path):
    target = _folder_with(tmp_path / "cache", member="x")
    assert pio.remove_folder(target) is True and pio.remove_folder(target) is False
    assert _listing(tmp_path) == []
    stale = _folder_with(tmp_path / ".partial-cache-old-abc", member="x")
    fresh = _folder_with(tmp_path / ".partial-cache-def", member="y")
    _folder_with(tmp_path / "cache", member="z")
    old = time.time() - pio.STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    assert pio.sweep_stale_partials(tmp_path) == [stale]
    assert _listing(tmp_path) == [fresh.name, "cache"]


def test_figures_are_written_atomically_and_always_closed(tmp_path):
    from pumit_nnunet.pretrain.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    written = pio.write_figure_atomic(fig, tmp_path / "curve.png", dpi=50)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.number not in plt.get_fignums()
    svg = plt.figure()
    assert pio.write_figure_atomic(svg, tmp_path / "blank.svg").read_text().lstrip().startswith("<?xml")
    broken = plt.figure()
    with pytest.raises(Exception):
        pio.write_figure_atomic(broken, tmp_path / "curve.png", dpi="not a number")
    assert broken.number not in plt.get_fignums()  # closed although saving failed
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the earlier figure is untouched
    assert _listing(tmp_path) == ["blank.svg", "curve.png"]
