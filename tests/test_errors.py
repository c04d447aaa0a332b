"""One error style for every ``pumit-nnunet`` subcommand: one stderr line, exit 1 (data) / 2 (usage), no traceback
unless ``--debug``."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from pumit_nnunet.errors import DataError, UsageError, format_error

LINE = re.compile(r"^pumit-nnunet( [a-z -]+)?: error: .+")  # no command word: the top-level parser


@pytest.fixture
def bad(tmp_path, monkeypatch):
    """A text file posing as a checkpoint/image/JSON, an empty folder, and nnU-Net folders that hold nothing."""
    (tmp_path / "bad.txt").write_text("garbage\n")
    (tmp_path / "empty").mkdir()
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (argv, expected exit code): realistic mistakes, each a different subcommand or failure class
CASES = [
    (["evaluate", "empty", "empty", "--labels", "1"], 1),  # no label images
    (["evaluate", "bad.txt", "empty", "--labels", "1"], 1),  # a file where a folder belongs
    (["evaluate", "missing", "empty", "--labels", "1"], 1),  # missing folder
    (["evaluate", "empty", "empty", "--dataset-json", "bad.txt"], 1),  # wrong format
    (["evaluate", "empty", "empty", "--labels", "1", "--nsd-tolerance", "x"], 2),
    (["evaluate", "empty"], 2),  # argparse: missing argument
    (["convert", "btcv", "empty", "--out", "o"], 1),
    (["convert", "chaos", "empty", "--out", "o"], 1),
    (["export", "btcv", "empty", "empty", "o.zip"], 1),
    (["export", "btcv", "empty", "empty", "bad.txt"], 2),  # would overwrite
    (["export", "chaos", "empty", "empty", "o.zip"], 1),
    (["label-efficiency", "splits", "999"], 1),
    (["label-efficiency", "report", "999", "--out", "o"], 1),
    (["corpus", "inspect", "missing"], 1),
    (["corpus", "validate", "bad.txt"], 1),
    (["corpus", "convert", "empty", "--out", "empty/store"], 2),  # --out inside the source
    (["weights", "inspect", "bad.txt"], 1),
    (["weights", "inspect", "empty"], 1),
    (["weights", "verify", "missing.ckpt"], 1),
    (["plan", "-d", "999"], 2),
    (["pretrain", "tokenizer", "--data", "missing", "--out", "o"], 1),
    (["pretrain", "mim", "--data", "missing", "--tokenizer", "bad.txt", "--out", "o"], 1),
    (["demo", "--weights", "missing.ckpt", "--out", "w"], 1),
    (["medmnist", "train"], 2),
    (["no-such-command"], 2),
]


@pytest.mark.parametrize("argv, code", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_every_subcommand_fails_in_one_line(bad, cli_main, capsys, argv, code):
    with pytest.raises(SystemExit) if code == 2 and _is_parse_error(argv) else _no_exit() as exited:
        returned = cli_main(argv)
    status = exited.value.code if exited is not None and hasattr(exited, "value") else returned
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == code, err
    assert len(lines) == 1 and LINE.match(lines[0]), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [CASES[0][0], CASES[14][0], CASES[16][0]], ids=["evaluate", "corpus", "weights"])
def test_debug_shows_the_traceback(bad, cli_main, argv):
    with pytest.raises(Exception) as caught:
        cli_main(["--debug", *argv])
    assert not isinstance(caught.value, SystemExit)


def test_console_script_prints_one_line_and_exits_1(bad):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["pumit-nnunet", "evaluate", "empty", "empty", "--labels", "1"], capture_output=True,
                          encoding="utf-8", errors="replace", env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"pumit-nnunet evaluate: error: empty: no label images "
                                                "(.nii.gz, .nrrd, .mha, ...)"]
    debug = subprocess.run(["pumit-nnunet", "--debug", "evaluate", "empty", "empty", "--labels", "1"],
                           capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_format_error_names_the_file_of_os_errors():
    assert format_error("evaluate", PermissionError(13, "Permission denied", "/x/y.nii.gz")) == \
        "pumit-nnunet evaluate: error: /x/y.nii.gz: permission denied"
    assert format_error("corpus convert", OSError(28, "No space left on device", "/out/a")) == \
        "pumit-nnunet corpus convert: error: /out/a: no space left on device"
    assert format_error("plan", UsageError("two\nlines", "p.json")) == "pumit-nnunet plan: error: p.json: two lines"
    assert DataError("x").exit_code == 1 and UsageError("x").exit_code == 2


def _is_parse_error(argv):
    return argv in (["evaluate", "empty"], ["medmnist", "train"], ["no-such-command"])


class _no_exit:
    """Context manager standing in for ``pytest.raises`` when the command returns its code."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
