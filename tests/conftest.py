"""Shared fixtures. Real data comes only from the project's own fetcher (:mod:`pumit_nnunet.data`): the real-demo
folder is built in the data cache (``$PUMIT_DATA_CACHE``, else the user cache folder) on the first run, offline
afterwards. Under ``CI``, a test that would skip for missing data or a missing tool fails instead (see
:func:`pytest_runtest_makereport`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# child Python processes (console scripts, nnU-Net) print UTF-8 whatever the locale; tests decode UTF-8
os.environ.setdefault("PYTHONUTF8", "1")

#: skips that no machine of ours can turn into a run; under CI every other skip is a failure
CI_ALLOWED_SKIP_PREFIXES: tuple[str, ...] = ("needs CUDA", "needs a GPU", "cannot run as root", "running as root")


def ci_is_strict() -> bool:
    """True when the environment variable ``CI`` is set to anything but an empty/false value."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip_under_ci(report) -> None:
    """Under CI, turn a skip (not an xfail) whose reason is not allow-listed into a failure naming the reason."""
    if not (report.skipped and ci_is_strict()) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not reason.startswith(CI_ALLOWED_SKIP_PREFIXES):
        report.outcome = "failed"
        report.longrepr = (f"skip refused because CI is set (missing data or tools must fail in CI; allowed skip "
                           f"reasons start with {' / '.join(CI_ALLOWED_SKIP_PREFIXES)}): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # module-level pytest.importorskip(...) skips at collection
    _fail_skip_under_ci(outcome.get_result())


@pytest.fixture
def cli_main():
    """``pumit-nnunet``'s entry point, called in process: ``cli_main([...]) -> exit code``."""
    from pumit_nnunet.cli import main

    return main


@pytest.fixture(scope="session")
def real_demo_dir() -> Path:
    """Read-only folder with the real demo datasets (nnU-Net raw layout): ``pumit_nnunet.data.cached_real_demo()``,
    built from the fetched sources (downloads on the first run, then reused). Never write into it."""
    from pumit_nnunet.data import cached_real_demo

    return cached_real_demo()


# --- nnU-Net end-to-end support -------------------------------------------------------------------------------
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


def make_ct_dataset(real_demo: Path, raw: Path, dataset_id: int = CT_ID, name: str = "RealCTLung5mm",
                    splits: list[dict[str, list[str]]] | None = None) -> Path:
    """A small nnU-Net raw CT dataset from the real lung CTs: two patients plus a shifted crop of the first."""
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    src = real_demo / "Dataset902_RealCTLungNodule"
    cases = [
        SourceCase("lung1", src / "imagesTr/lung1_0000.nii.gz", src / "labelsTr/lung1.nii.gz"),
        SourceCase("lung2", src / "imagesTr/lung2_0000.nii.gz", src / "labelsTr/lung2.nii.gz"),
        SourceCase("lung1b", src / "imagesTr/lung1_0000.nii.gz", src / "labelsTr/lung1.nii.gz", (2, 10, -12)),
    ]
    if splits is None:
        splits = [{"train": ["lung1", "lung2"], "val": ["lung1b"]}, {"train": ["lung1b", "lung2"], "val": ["lung1"]}]
    return write_raw_dataset(cases, raw, dataset_id, name, "CT", {"background": 0, "nodule": 1}, (16, 96, 96), splits)


def _make_mri(real_demo: Path, raw: Path) -> Path:
    from pumit_nnunet.nnunet.demo_data import SourceCase, write_raw_dataset

    src = real_demo / "Dataset901_RealBrainMaskT1"
    cases = [
        # crops at the base of the brain (brain, skull, face and neck tissue: 30-60 % brain), inside the head so
        # that nnU-Net's crop to the non-zero region keeps them (nearly) 48^3
        SourceCase(name, src / "imagesTr/mni152_2009a_0000.nii.gz", src / "labelsTr/mni152_2009a.nii.gz", shift)
        for name, shift in (("mni152", (-60, -20, 10)), ("mni152r", (-55, 0, 20)), ("mni152b", (-60, 0, 0)))
    ]
    splits = [{"train": ["mni152", "mni152r"], "val": ["mni152b"]}]
    return write_raw_dataset(cases, raw, MRI_ID, "RealMRIBrain1mm", "T1", {"background": 0, "brain": 1}, (48, 48, 48), splits)


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory, real_demo_dir) -> Path:
    """nnU-Net raw/preprocessed/results folders with two real datasets, planned and preprocessed by the stock
    ``nnUNetv2_plan_and_preprocess`` (CT: 5 mm slices, 3d_fullres + 2d; MRI: 1 mm isotropic, 3d_fullres)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_environment(root, training=False)
    make_ct_dataset(real_demo_dir, root / "raw")
    _make_mri(real_demo_dir, root / "raw")
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(CT_ID), "-c", "3d_fullres", "2d", "-np", "2"], env)
    run_command(["nnUNetv2_plan_and_preprocess", "-d", str(MRI_ID), "-c", "3d_fullres", "-np", "2"], env)
    return root


# --- pre-training fixtures (tokenizer and MIM tests) ------------------------------------------------------------
@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torch.distributed's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and lose a lot on a shared, busy CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mim_store(real_demo_dir, tmp_path_factory) -> Path:
    """A corpus store of the real MR brain-lesion demo dataset."""
    from pumit_nnunet.corpus.api import ensure_store

    return ensure_store(real_demo_dir / "Dataset903_RealMRBrainLesion", tmp_path_factory.mktemp("mim-store"))


@pytest.fixture(scope="session")
def mim_tokenizer_ckpt(tmp_path_factory) -> Path:
    """A tiny tokenizer with seeded random weights in our checkpoint format: its soft tokens are a fixed, learnable
    target (logits scaled up so that the distributions are peaked, as a trained tokenizer's are)."""
    import torch

    from pumit_nnunet.checkpoints.format import save_pumit_checkpoint
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config

    torch.manual_seed(0)
    config = tokenizer_config("tiny")
    tokenizer = UniversalTokenizer(config)
    with torch.no_grad():
        tokenizer.quantize.proj.weight.mul_(20)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.pth"
    save_pumit_checkpoint(path, kind="tokenizer", state_dict=tokenizer.state_dict(), architecture=config.to_dict())
    return path


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory) -> tuple[Path, Path]:
    """Random-weight stand-ins for the VGG16 and LPIPS-lin files, with the real files' key names and shapes."""
    import torch

    from pumit_nnunet.layers.lpips import lpips_lin_shapes, vgg16_feature_shapes

    folder = tmp_path_factory.mktemp("lpips")
    gen = torch.Generator().manual_seed(0)
    vgg = {k: torch.randn(s, generator=gen) * 0.1 for k, s in vgg16_feature_shapes().items()}
    vgg["classifier.0.bias"] = torch.zeros(4096)  # the real file also holds the classifier, which is ignored
    lin = {k: torch.rand(s, generator=gen) for k, s in lpips_lin_shapes().items()}
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"
