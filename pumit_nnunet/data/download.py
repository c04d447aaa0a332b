"""Download one registered distribution file with pip, the package index's own client.

pip is run as ``sys.executable -m pip download --no-deps --require-hashes`` with the archive's sha256 pinned in a
requirements file, so pip refuses any other file before unpacking it. Its usual configuration applies
(``PIP_INDEX_URL``, proxies, ``PIP_NO_INDEX``...). A wheel is selected by the platform tags of its file name, so
every machine downloads the very same file. An sdist is only fetched, never installed, but pip still asks its build
backend for metadata: pyradiomics 3.0.1's ``setup.py`` imports numpy and setuptools, so that step runs without build
isolation, with this environment's (both are our dependencies).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from pumit_nnunet.data.registry import Source
from pumit_nnunet.io import write_text_atomic

__all__ = ["pip_download", "selection_options", "DownloadFailed", "HEARTBEAT_S"]

#: seconds between "still downloading" lines
HEARTBEAT_S = 10.0
_STATUS_PREFIXES = ("Downloading", "File was already downloaded")  # pip's lines worth showing


class DownloadFailed(Exception):
    """pip could not download the file; the message is pip's last error line."""


def selection_options(source: Source) -> list[str]:
    """pip options that select exactly ``source.archive``: the sdist, or the wheel with its file name's tags."""
    if source.kind == "sdist":
        return ["--no-binary", ":all:", "--no-build-isolation"]
    python_tag, abi_tag, platform_tag = source.archive[: -len(".whl")].split("-")[-3:]
    if (abi_tag, platform_tag) == ("none", "any"):
        return ["--only-binary", ":all:"]
    return ["--only-binary", ":all:", "--platform", platform_tag.split(".")[0], "--implementation", python_tag[:2],
            "--python-version", python_tag[2:], "--abi", abi_tag]


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    return (errors or lines or ["pip gave no output"])[-1]


def _run_streaming(command: list[str], timeout_s: float, progress: Callable[[str], None] | None) -> tuple[int, str]:
    """Run pip, passing its status lines ("Downloading pyradiomics-3.0.1.tar.gz (34.5 MB)") to ``progress`` as
    they come and a heartbeat every :data:`HEARTBEAT_S` while it downloads; (exit code, output)."""
    lines: list[str] = []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               encoding="utf-8", errors="replace")

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if progress is not None and line.strip().startswith(_STATUS_PREFIXES):
                progress(f"  pip: {line.strip()}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    while True:
        try:
            process.wait(timeout=HEARTBEAT_S)
            break
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - start
            if elapsed > timeout_s:
                process.kill()
                process.wait()
                raise DownloadFailed(f"pip download timed out after {timeout_s:.0f} s") from None
            if progress is not None:
                progress(f"  ... {elapsed:.0f} s")
    reader.join()
    return process.returncode, "".join(lines)


def pip_download(source: Source, folder: Path, timeout_s: float = 900.0,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Download ``source.archive`` into ``folder`` (verified by pip against the registry's sha256); its path.

    ``progress`` receives one line per step of the download (None: silent)."""
    folder.mkdir(parents=True, exist_ok=True)
    requirements = folder / "requirements.txt"
    write_text_atomic(requirements, f"{source.requirement} --hash=sha256:{source.archive_sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
               "--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "30",
               "--dest", str(folder), "-r", str(requirements), *selection_options(source)]
    returncode, output = _run_streaming(command, timeout_s, progress)
    archive = folder / source.archive
    if returncode != 0:
        raise DownloadFailed(_last_error_line(output))
    if not archive.is_file():
        raise DownloadFailed(f"pip succeeded but did not save {source.archive}")
    return archive
