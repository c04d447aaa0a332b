"""The start-up hook finds the trainer folder beside the ``pumit_nnunet`` package Python imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _folder_seen_by_a_fresh_interpreter(extra_path: Path | None = None) -> str:
    code = "import sys\n"
    if extra_path is not None:
        code += f"sys.path.insert(0, {str(extra_path)!r})\n"
    code += "import pumit_nnunet_hook\nprint(pumit_nnunet_hook.trainer_folder())\n"
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_source_checkout_uses_its_own_trainers_folder_not_a_stale_copy():
    import pumit_nnunet

    if Path(pumit_nnunet.__file__).resolve().parents[1] != REPO_ROOT:
        raise AssertionError("tests must run against the checkout's package (pip install -e .)")
    assert Path(_folder_seen_by_a_fresh_interpreter()) == REPO_ROOT / "trainers"


def test_wheel_layout_uses_the_trainers_shipped_inside_the_package(tmp_path):
    package = tmp_path / "pumit_nnunet"
    (package / "_nnunet_trainers").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_nnunet_trainers" / "pumit_nnunet_trainers.py").write_text("")
    assert Path(_folder_seen_by_a_fresh_interpreter(tmp_path)) == package / "_nnunet_trainers"


def test_failed_registration_of_the_normalisation_schemes_warns_in_one_line_and_never_raises(tmp_path, monkeypatch,
                                                                                                capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkout_hook", REPO_ROOT / "pumit_nnunet_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)  # the checkout's hook, not the copy an editable install put in site-packages
    (tmp_path / "stand_in_normalization_schemes.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "pumit_nnunet.nnunet.recipe_normalization", None)  # its import now fails
    finder = hook._RegisterNormalizationAfterImport()
    finder.target = "stand_in_normalization_schemes"
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    module = importlib.import_module("stand_in_normalization_schemes")  # must not raise
    monkeypatch.delitem(sys.modules, "stand_in_normalization_schemes")
    assert module.VALUE == 7
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("pumit-nnunet: warning: could not register the PUMIT normalisation schemes in nnU-Net "
                             "(ModuleNotFoundError: ") and err[0].endswith("); plans that use them will fail")
