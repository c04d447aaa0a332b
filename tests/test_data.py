"""The project's own data fetcher (:mod:`pumit_nnunet.data`): cache, verification, offline use, errors, builders.

Download tests use the real ``pip download`` against a local package index (a ``--find-links`` folder holding a
wheel made here), so they are fast and need no network; the offline error is checked against the real registry with
pip pointed at an unreachable index.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pumit_nnunet.data import cache as cache_module
from pumit_nnunet.data.cache import fetch, source_dir
from pumit_nnunet.data.download import selection_options
from pumit_nnunet.data.labels import ct_tissue_classes, tissue_argmax
from pumit_nnunet.data.registry import Member, Source, get_source, list_sources
from pumit_nnunet.errors import DataError, UsageError

UNREACHABLE_INDEX = "http://127.0.0.1:9/"  # the discard port: connection refused at once
PAYLOADS = {"pumit_testdata/data/scan.bin": bytes(range(256)) * 64, "pumit_testdata/data/label.bin": b"\x00\x01" * 300}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiny_wheel(folder: Path) -> Path:
    """A minimal valid wheel ``pumit_testdata-1.0`` holding :data:`PAYLOADS`."""
    path = folder / "pumit_testdata-1.0-py3-none-any.whl"
    meta = {"pumit_testdata-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pumit-testdata\nVersion: 1.0\n",
            "pumit_testdata-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  b"Tag: py3-none-any\n"}
    files = {**PAYLOADS, **meta}
    record = "".join(f"{name},,\n" for name in files) + "pumit_testdata-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in {**files, "pumit_testdata-1.0.dist-info/RECORD": record.encode()}.items():
            bundle.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), data)
    return path


def _source_for(archive: Path, payloads: dict[str, bytes] = PAYLOADS) -> Source:
    members = tuple(Member(name, len(data), _sha(data)) for name, data in payloads.items())
    return Source("tiny", "pumit-testdata", "1.0", "wheel", archive.name, archive.stat().st_size,
                  _sha(archive.read_bytes()), "CC0", "a wheel made by the test", members)


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Source:
    """A registered source ``tiny`` served by a local index; an empty cache in ``PUMIT_DATA_CACHE``."""
    index = tmp_path / "index"
    index.mkdir()
    source = _source_for(_tiny_wheel(index))
    monkeypatch.setattr(cache_module, "get_source", lambda name: source if name == "tiny" else get_source(name))
    monkeypatch.setenv("PUMIT_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip configuration adds other indexes
    return source


def _go_offline(monkeypatch) -> None:
    """pip sees only an unreachable index: no find-links, no extra index, no configuration file."""
    for key, value in _offline_pip_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PIP_NO_INDEX")


def _offline_pip_env() -> dict[str, str]:
    return {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
            "PIP_INDEX_URL": UNREACHABLE_INDEX}


def _leftovers(source: Source) -> list[Path]:
    return list(source_dir(source).parent.glob(".partial-*"))


def test_fetch_extracts_only_the_verified_members_then_works_offline(tiny, monkeypatch):
    lines = []
    folder = fetch("tiny", progress=lines.append)
    assert folder == source_dir(tiny) and folder.parent.parent == Path(str(cache_module.cache_dir()))
    assert {p.name for p in folder.iterdir()} == {"scan.bin", "label.bin", "SOURCE.json"}  # no metadata, no paths
    assert (folder / "scan.bin").read_bytes() == PAYLOADS["pumit_testdata/data/scan.bin"]
    assert any("downloading pumit-testdata==1.0" in line for line in lines) and not _leftovers(tiny)
    _go_offline(monkeypatch)
    assert fetch("tiny") == folder  # the cache alone serves it


def test_tampered_cached_file_is_fetched_again(tiny):
    victim = fetch("tiny") / "label.bin"
    victim.write_bytes(b"\x00\x02" * 300)  # same size, other bytes
    lines = []
    fetch("tiny", progress=lines.append)
    assert victim.read_bytes() == PAYLOADS["pumit_testdata/data/label.bin"]
    assert any(str(victim) in line and "sha256" in line for line in lines)


def test_tampered_cached_file_without_network_is_refused_by_name(tiny, monkeypatch):
    victim = fetch("tiny") / "scan.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    _go_offline(monkeypatch)
    with pytest.raises(DataError) as caught:
        fetch("tiny")
    assert caught.value.path == victim and "sha256" in caught.value.problem
    assert "pumit-testdata==1.0" in str(caught.value)


def test_interrupted_extraction_leaves_no_source_folder(tiny, monkeypatch):
    real_write = cache_module.atomic_write_bytes
    calls = []

    def interrupted_after_one_member(path, payload):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(cache_module, "atomic_write_bytes", interrupted_after_one_member)
    with pytest.raises(KeyboardInterrupt):
        fetch("tiny")
    assert not source_dir(tiny).exists() and not _leftovers(tiny)
    monkeypatch.setattr(cache_module, "atomic_write_bytes", real_write)
    assert (fetch("tiny") / "label.bin").is_file()  # the next fetch starts cleanly


def test_member_that_differs_from_the_registry_is_refused(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    wrong = dict(PAYLOADS, **{"pumit_testdata/data/scan.bin": b"what the registry says"})
    source = _source_for(_tiny_wheel(index), wrong)
    monkeypatch.setattr(cache_module, "get_source", lambda name: source)
    for key, value in {"PUMIT_DATA_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1",
                       "PIP_FIND_LINKS": str(index)}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DataError, match="member pumit_testdata/data/scan.bin differs from the registry"):
        fetch("tiny")
    assert not source_dir(source).exists() and not _leftovers(source)


def test_sdist_member_that_is_a_link_is_refused(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        link = tarfile.TarInfo("pkg-1.0/data/scan.nrrd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        bundle.addfile(link)
    source = Source("pkg", "pkg", "1.0", "sdist", archive.name, 0, "", "", "", (Member(link.name, 1, ""),))
    with pytest.raises(DataError, match="not a regular file"):
        cache_module._read_member(archive, source, source.members[0])


def test_no_cache_and_no_network_is_one_line_naming_distribution_and_cache(tmp_path):
    cache = tmp_path / "empty-cache"
    env = {**_clean_pip_env(), **_offline_pip_env(), "PUMIT_DATA_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "pumit_nnunet.cli", "data", "fetch", "skimage-samples"], env=env,
                            capture_output=True, encoding="utf-8", timeout=300)
    assert result.returncode == 1, result.stderr
    line, = result.stderr.splitlines()
    assert line.startswith("pumit-nnunet data fetch: error: ") and "scikit-image==0.24.0" in line
    assert str(cache) in line and "not cached and could not be downloaded" in line
    assert not list((cache / "sources").glob("*"))  # no partial folder left behind


def _clean_pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}


def test_unknown_source_is_a_usage_error():
    with pytest.raises(UsageError, match="known: pyradiomics-data"):
        fetch("no-such-source")


def test_registry_pins_exact_files_and_wheels_select_by_their_tags():
    sources = list_sources()
    assert {s.name for s in sources} >= {"pyradiomics-data", "nilearn-mni152", "pydicom-data", "skimage-samples"}
    for source in sources:
        assert len(source.archive_sha256) == 64 and all(len(m.sha256) == 64 and m.size > 0 for m in source.members)
        assert source.archive.startswith(source.distribution.replace("-", "_")) or source.kind == "sdist"
    options = selection_options(get_source("skimage-samples"))
    assert options[options.index("--platform") + 1] == "manylinux_2_17_x86_64"
    assert options[options.index("--python-version") + 1] == "311" and "--abi" in options


# --- builders --------------------------------------------------------------------------------------------------
def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_builders_are_deterministic_to_the_byte(tmp_path):
    from pumit_nnunet.data import build_extras_2d, build_raw_dataset

    first = build_raw_dataset("Dataset904_RealCTChestTissue", tmp_path / "a")
    second = build_raw_dataset("Dataset904_RealCTChestTissue", tmp_path / "b")
    assert _tree_bytes(first) == _tree_bytes(second) and len(_tree_bytes(first)) == 4  # 2 images, json, marker
    assert _tree_bytes(build_extras_2d(tmp_path / "x")) == _tree_bytes(build_extras_2d(tmp_path / "y"))


def test_builder_refuses_a_folder_it_did_not_make_and_reuses_or_rebuilds_its_own(tmp_path):
    from pumit_nnunet.data import build_extras_2d
    from pumit_nnunet.data.real_demo import MARKER

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my data")
    with pytest.raises(DataError, match="not made by pumit-nnunet"):
        build_extras_2d(user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".partial-*"))

    ours = build_extras_2d(tmp_path / "ours")
    stamp = (ours / "retina.jpg").stat().st_mtime_ns
    assert build_extras_2d(ours) == ours and (ours / "retina.jpg").stat().st_mtime_ns == stamp  # current: reused
    (ours / MARKER).write_text('{"digest": "older"}')
    (ours / "retina.jpg").write_bytes(b"stale")
    build_extras_2d(ours)  # an older build of ours is replaced
    assert (ours / "retina.jpg").read_bytes()[:2] == b"\xff\xd8" and not list(tmp_path.glob(".partial-*"))


def test_real_demo_layout(real_demo_dir):
    import json

    expected = {"Dataset901_RealBrainMaskT1": {"mni152_2009a", "mni152_coronal"},
                "Dataset902_RealCTLungNodule": {"lung1", "lung2"}, "Dataset903_RealMRBrainLesion": {"brain1", "brain2"},
                "Dataset904_RealCTChestTissue": {"lung1"}, "Dataset905_RealMNI152Tissue": {"mni152_2009a"}}
    for name, cases in expected.items():
        dataset = json.loads((real_demo_dir / name / "dataset.json").read_text())
        assert set(dataset["cases"]) == cases and dataset["numTraining"] == len(cases)
        assert {p.name for p in (real_demo_dir / name / "labelsTr").iterdir()} == {f"{c}.nii.gz" for c in cases}
    assert len(list((real_demo_dir / "extras_2d_demo").iterdir())) == 7


def test_cli_list_and_fetch_print_the_cache(cli_main, capsys):
    assert cli_main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("cache: ") and "pyradiomics==3.0.1 (sdist" in listing and "nilearn==0.10.3" in listing
    assert cli_main(["data", "fetch", "skimage-samples"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("skimage-samples: ") and out[-2].endswith("(verified)")
    assert out[-1] == f"cache: {cache_module.cache_dir()}"


# --- label rules (pure functions) ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(arrays(np.int16, (3, 4, 5), elements=st.integers(-1100, 2000)))
def test_ct_tissue_classes_are_the_threshold_rule(hu):
    from pumit_nnunet.data.labels import BONE_HU, SOFT_TISSUE_HU

    expected = np.where(hu >= BONE_HU, 2, np.where(hu >= SOFT_TISSUE_HU, 1, 0))
    np.testing.assert_array_equal(ct_tissue_classes(hu), expected)


@settings(max_examples=60, deadline=None)
@given(*[arrays(np.uint8, (2, 3, 4), elements=st.integers(0, 255))] * 2)
def test_tissue_argmax_picks_the_most_probable_class(grey, white):
    label = tissue_argmax(grey, white)
    g, w = grey.astype(int), white.astype(int)
    rest = np.clip(255 - g - w, 0, None)
    chosen = np.choose(label, [rest, g, w])
    assert (chosen >= np.maximum(rest, np.maximum(g, w))).all()
    assert ((label == 2) <= (w > g)).all()  # ties go to the lower label


def test_cli_build_writes_one_dataset_and_refuses_a_foreign_folder(cli_main, tmp_path, capsys):
    assert cli_main(["data", "build", str(tmp_path / "raw"), "--dataset", "Dataset904_RealCTChestTissue"]) == 0
    assert (tmp_path / "raw" / "Dataset904_RealCTChestTissue" / "labelsTr" / "lung1.nii.gz").is_file()
    assert capsys.readouterr().out.startswith("Dataset904_RealCTChestTissue: ")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    assert cli_main(["data", "build", str(tmp_path / "mine")]) == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"pumit-nnunet data build: error: {tmp_path / 'mine'}: exists and was not made by")
