"""Under ``CI``, a skip for missing data or a missing tool fails; an allow-listed skip (CUDA, root) stays a skip.

The hooks of ``tests/conftest.py`` are loaded as a plugin into a pytest run of a tiny test folder made here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

TINY = '''
import pytest

def test_runs():
    pass

def test_missing_data():
    pytest.skip("real demo data not found")

def test_missing_tool():
    pytest.importorskip("no_such_module_for_pumit_ci_test")

def test_needs_cuda():
    pytest.skip("needs CUDA: no GPU on this machine")

def test_as_root():
    pytest.skip("running as root: file modes do not deny reads")

@pytest.mark.xfail(reason="a known failure is no skip")
def test_expected_failure():
    assert False
'''
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_for_pumit_ci_test")\n\ndef test_never():\n    pass\n'


def _run(folder: Path, ci: str | None) -> tuple[int, dict[str, int], str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "conftest", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "--rootdir", str(folder), str(folder)]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, encoding="utf-8", timeout=300)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|xfailed|errors?)",
                                                     result.stdout.splitlines()[-1])}
    return result.returncode, counts, result.stdout


def test_ci_turns_data_and_tool_skips_into_failures(tmp_path):
    (tmp_path / "test_tiny.py").write_text(TINY)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)

    code, counts, out = _run(tmp_path, None)
    assert code == 0 and counts == {"passed": 1, "skipped": 5, "xfailed": 1}, out

    code, counts, out = _run(tmp_path, "true")  # (without --continue-on-collection-errors the run stops: exit 2)
    assert code == 1 and counts == {"passed": 1, "failed": 2, "skipped": 2, "xfailed": 1, "error": 1}, out
    assert "skip refused because CI is set" in out and "real demo data not found" in out
    assert "FAILED test_tiny.py::test_missing_tool" in out and "ERROR test_module_skip.py" in out

    code, counts, out = _run(tmp_path, "false")  # CI=false is not CI
    assert code == 0 and counts["skipped"] == 5, out
