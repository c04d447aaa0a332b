"""Shared fixtures. The real demo data lives beside the checkout (``../shared/data/real-demo``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# child Python processes (console scripts, nnU-Net) print UTF-8 whatever the locale; tests decode UTF-8
os.environ.setdefault("PYTHONUTF8", "1")


def _find_real_demo() -> Path | None:
    candidates = [os.environ.get("PUMIT_REAL_DEMO"), REPO_ROOT.parent / "shared" / "data" / "real-demo"]
    for candidate in candidates:
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def cli_main():
    """``pumit-nnunet``'s entry point, called in process: ``cli_main([...]) -> exit code``."""
    from pumit_nnunet.cli import main

    return main


@pytest.fixture(scope="session")
def real_demo_dir() -> Path:
    """Read-only folder with the real demo datasets (nnU-Net raw layout). Never write into it."""
    path = _find_real_demo()
    if path is None:
        message = "real demo data not found (set PUMIT_REAL_DEMO or place it at ../shared/data/real-demo)"
        if os.environ.get("CI"):  # CI must run the end-to-end tests, never skip them silently
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- nnU-Net end-to-end support -------------------------------------------------------------------------------
import subprocess

CT_ID, MRI_ID = 950, 951


def nnunet_environment(root: Path, training: bool = True) -> dict[str, str]:
    """Environment for the stock nnU-Net commands on 2 cores, rooted at ``root``.

    Single-process data augmentation (``nnUNet_n_proc_DA=0``) only for training: nnU-Net 2.8.1's planner
    passes that value to ``torch.set_num_threads`` and crashes on 0."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"), nnUNet_results=str(root / "results"),
        nnUNet_def_n_proc="2", nnUNet_compile="f", PYTHONUNBUFFERED="1",
    )
    if training:
        env["nnUNet_n_proc_DA"] = "0"
    else:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def run_command(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a console command; on failure raise with its output (the test then shows what nnU-Net said)."""
    result = subprocess.run(args, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _make_ct(real_demo: Path, raw: Path) -> Path:
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    src = real_demo / "Dataset902_RealCTLungNodule"
    cases = [
        SourceCase("lung1", src / "imagesTr/lung1_0000.nii.gz", src / "labelsTr/lung1.nii.gz"),
        SourceCase("lung2", src / "imagesTr/lung2_0000.nii.gz", src / "labelsTr/lung2.nii.gz"),
        SourceCase("lung1b", src / "imagesTr/lung1_0000.nii.gz", src / "labelsTr/lung1.nii.gz", (2, 10, -12)),
    ]
    splits = [{"train": ["lung1", "lung2"], "val": ["lung1b"]}, {"train": ["lung1b", "lung2"], "val": ["lung1"]}]
    return write_raw_dataset(cases, raw, CT_ID, "RealCTLung5mm", "CT", {"background": 0, "nodule": 1}, (16, 96, 96), splits)


def _make_mri(real_demo: Path, raw: Path) -> Path:
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    src = real_demo / "Dataset901_RealBrainMaskT1"
    cases = [
        SourceCase("colin27", src / "imagesTr/colin27_0000.nii.gz", src / "labelsTr/colin27.nii.gz", (0, 0, 60)),
        SourceCase("mni152", src / "imagesTr/mni152_2009a_0000.nii.gz", src / "labelsTr/mni152_2009a.nii.gz", (0, 0, 60)),
        SourceCase("colin27b", src / "imagesTr/colin27_0000.nii.gz", src / "labelsTr/colin27.nii.gz", (10, 10, 50)),
    ]
    splits = [{"train": ["colin27", "mni152"], "val": ["colin27b"]}]
    return write_raw_dataset(cases, raw, MRI_ID, "RealMRIBrain1mm", "T1", {"background": 0, "brain": 1}, (48, 48, 48), splits)


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory, real_demo_dir) -> Path:
    """nnU-Net raw/preprocessed/results folders with two real datasets, planned and preprocessed by the stock
    ``nnUNetv2_plan_and_preprocess`` (CT: 5 mm slices, 3d_fullres + 2d; MRI: 1 mm isotropic, 3d_fullres)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root, training=False)
    _make_ct(real_demo_dir, root / "raw")
    _make_mri(real_demo_dir, root / "raw")
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(CT_ID), "-c", "3d_fullres", "2d", "-np", "2"], env)
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(MRI_ID), "-c", "3d_fullres", "-np", "2"], env)
    return root
