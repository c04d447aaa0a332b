"""Shared fixtures. The real demo data lives beside the checkout (``../shared/data/real-demo``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_real_demo() -> Path | None:
    candidates = [os.environ.get("PUMIT_REAL_DEMO"), REPO_ROOT.parent / "shared" / "data" / "real-demo"]
    for candidate in candidates:
        if candidate and Path(candidate, "README.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def real_demo_dir() -> Path:
    """Read-only folder with the real demo datasets (nnU-Net raw layout). Never write into it."""
    path = _find_real_demo()
    if path is None:
        pytest.skip("real demo data not found (set PUMIT_REAL_DEMO or place it at ../shared/data/real-demo)")
    return path
