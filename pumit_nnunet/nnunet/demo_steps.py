"""The demo's plumbing: its output folder (claimed, never someone else's), the stock commands it runs (output shown
live and kept in a log), and the record of finished steps that makes a rerun resume instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.io import write_json_atomic

__all__ = ["OUT_MARKER", "claim_out_folder", "nnunet_env", "run_logged", "DemoState"]

#: file that marks a folder as a demo output folder (a rerun may reuse it; any other non-empty folder is refused)
OUT_MARKER = ".pumit_demo_out"


def claim_out_folder(out: Path) -> Path:
    """Create ``out`` or reuse it when an earlier demo made it; refuse a non-empty folder of someone else's."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError("--out must be a folder, this is a file", out)
    if out.is_dir() and any(out.iterdir()) and not (out / OUT_MARKER).is_file():
        raise UsageError("not empty and not made by `pumit-nnunet demo`; choose a new or empty --out folder", out)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUT_MARKER).touch()
    return out


def nnunet_env(out: Path, training: bool) -> dict[str, str]:
    """The stock commands' environment, rooted in ``out``. Data augmentation runs in the main process for
    training on CPU (``nnUNet_n_proc_DA=0``: the seeded process draws every patch); the planner must not see 0
    (nnU-Net 2.8 passes it to ``torch.set_num_threads``)."""
    env = dict(os.environ, nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
               nnUNet_results=str(out / "nnUNet_results"), nnUNet_compile="f", PYTHONUNBUFFERED="1")
    env.setdefault("nnUNet_def_n_proc", "2")
    if training:
        env.setdefault("nnUNet_n_proc_DA", "0")
    elif env.get("nnUNet_n_proc_DA") == "0":
        del env["nnUNet_n_proc_DA"]
    return env


def run_logged(command: Sequence[str], env: dict[str, str], log: Path) -> float:
    """Run ``command``, showing its output live (nnU-Net's epoch lines are the progress) and appending it to
    ``log``; returns the wall time in seconds. A failure raises one line that points to the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(str(c) for c in command), flush=True)
    start = time.perf_counter()
    with open(log, "ab") as sink:
        sink.write(("\n$ " + " ".join(str(c) for c in command) + "\n").encode())
        process = subprocess.Popen([str(c) for c in command], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            sink.write(chunk)
        returncode = process.wait()
    if returncode != 0:
        raise DataError(f"{Path(command[0]).name} exited with status {returncode}; its output is above and in this log", log)
    return time.perf_counter() - start


class DemoState:
    """``demo_state.json``: per row, the seconds its training and prediction took and the weights it started from,
    so that a rerun reuses finished steps and still prints their original times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.rows = json.loads(path.read_text(encoding="utf-8")).get("rows", {})
            except (json.JSONDecodeError, AttributeError) as error:
                raise DataError(f"unreadable demo state ({error}); delete it to redo the timings", path) from error

    def get(self, row: str, key: str) -> Any:
        return self.rows.get(row, {}).get(key)

    def set(self, row: str, key: str, value: Any) -> None:
        self.rows.setdefault(row, {})[key] = value
        write_json_atomic(self.path, {"rows": self.rows})
