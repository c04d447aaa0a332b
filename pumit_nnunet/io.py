"""Atomic file writes shared by every layer: readers never see half a file, an interrupted write loses nothing.

Everything is written to a temporary file in the target's folder (same file system), flushed, then moved over
the target with ``os.replace``. Three details make this safe to use everywhere:

* **Leftovers are swept.** A writer killed mid-write (``kill -9``, power loss) leaves its temporary file behind.
  Temporary files are named ``.<target>.<host>-<pid>.<random>.tmp[<ending>]``; the first atomic write into a folder
  in a process removes the temporary files in it whose writer, on this host, is no longer running. A live writer's
  file is never touched (its pid is alive), so two processes writing into one folder cannot delete each other's
  files. Files of another host (a shared file system) and of the older ``.<target>.<random>.tmp`` naming cannot be
  asked for their writer: they are removed only when untouched for :data:`STALE_AFTER_S` seconds.
* **Normal file modes.** ``mkstemp`` creates 0600 files; the result instead gets ``0o666 & ~umask`` (the mode any
  other program would give it).
* **Strict JSON.** :func:`write_json_atomic` refuses NaN and infinity, which strict JSON parsers reject; data that
  can hold them passes through :func:`nonfinite_to_null` first (``"hd": null, "hd_status": "inf"``) and is read back
  with :func:`null_to_nonfinite`.

Whole folders are replaced with renames only (:func:`replace_folder_atomic`, :func:`remove_folder`): the new folder
is built in a sibling ``.partial-*`` folder, the old one is moved aside under a hidden ``.partial-*`` name before
the new one takes its place, so readers see the old folder or the new one, and an interruption never loses the old
data; :func:`sweep_stale_partials` removes what an interrupted swap left behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["IMAGE_ENDINGS", "STALE_AFTER_S", "atomic_path", "atomic_write_bytes", "write_text_atomic",
           "write_json_atomic", "write_image_atomic", "write_figure_atomic", "symlink_atomic",
           "sweep_stale_temporaries", "nonfinite_to_null", "null_to_nonfinite", "STATUS_SUFFIX", "default_file_mode",
           "PARTIAL_PREFIX", "STALE_PARTIAL_S", "replace_folder_atomic", "remove_folder", "sweep_stale_partials"]

#: file endings SimpleITK reads (longest first so ".nii.gz" wins over ".gz")
IMAGE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff")
#: image formats whose header names a second data file: the data file would keep its temporary name
DETACHED_HEADER_ENDINGS: tuple[str, ...] = (".mhd", ".nhdr")
#: age (seconds since last change) after which a temporary file whose writer cannot be checked counts as stale
STALE_AFTER_S = 3600.0
#: name start of the hidden sibling folders a folder is built in, or moved aside to, during a swap
PARTIAL_PREFIX = ".partial-"
#: a ``.partial-*`` folder older than this is the leftover of an interrupted build or swap, not one in progress
STALE_PARTIAL_S = 6 * 3600.0
#: key suffix that records the value of a non-finite float in JSON (see :func:`nonfinite_to_null`)
STATUS_SUFFIX = "_status"

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_OURS = re.compile(r"^\.(?P<target>.+)\.(?P<host>\w+)-(?P<pid>\d+)\.\w+\.tmp")
_LEGACY = re.compile(r"^\.(?P<target>.+)\.\w{8}\.tmp$")
_swept: set[str] = set()
_swept_lock = threading.Lock()


# --- file modes -------------------------------------------------------------------------------------------------
def _read_umask() -> int:
    """The process umask without changing it (Linux ``/proc``); elsewhere set-and-restore once, at import."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` would give a new file (read at each call: umask may change)."""
    return 0o666 & ~_read_umask()


# --- stale temporaries -------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _is_stale(entry: os.DirEntry, now: float, stale_after_s: float) -> bool:
    ours = _OURS.match(entry.name)
    if ours is not None and ours["host"] == _HOST:
        return not _pid_alive(int(ours["pid"]))
    legacy = _LEGACY.match(entry.name) if ours is None else None
    if ours is None and (legacy is None or not os.path.lexists(Path(entry.path).with_name(legacy["target"]))):
        return False  # not a temporary file of ours: never touch it
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > stale_after_s
    except FileNotFoundError:
        return False


def sweep_stale_temporaries(folder: Path | str, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the leftover temporary files of interrupted atomic writes in ``folder``; returns what was removed."""
    removed, now = [], time.time()
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and ".tmp" in e.name]
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if entry.is_file(follow_symlinks=False) and _is_stale(entry, now, stale_after_s):
            try:
                os.remove(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:  # another process swept it first
                pass
    return removed


def _sweep_once(folder: Path) -> None:
    """Sweep a folder the first time this process writes into it (a folder can hold many thousand files)."""
    key = os.path.abspath(folder)
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    sweep_stale_temporaries(folder)


# --- atomic writes -----------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``target`` in one step.

    ``suffix`` ends the temporary name (e.g. ``".nii.gz"``, for writers that pick the format from the name). The
    result gets the user's normal file mode (``0o666 & ~umask``); on an exception the temporary file is removed and ``target`` is
    unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}-{os.getpid()}.", suffix=".tmp" + suffix,
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def symlink_atomic(source: Path | str, target: Path | str) -> None:
    """Make ``target`` a symlink to ``source`` in one step (a temporary link renamed over it).

    Not through :func:`atomic_path`: its ``chmod`` would follow the link and change the *source's* mode."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(target.parent)
    tmp = target.parent / f".{target.name}.{_HOST}-{os.getpid()}.{os.urandom(4).hex()}.tmp"
    os.symlink(source, tmp)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, data: Any, indent: int = 2, allow_nan: bool = False) -> None:
    """Strict JSON: NaN and infinity raise ``ValueError`` (convert them with :func:`nonfinite_to_null` first).

    ``allow_nan=True`` writes the bare ``NaN``/``Infinity`` tokens of Python's json (as nnU-Net's summary.json); only
    for files that nnU-Net itself reads back.
    """
    write_text_atomic(path, json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n")


def write_image_atomic(image: Any, path: Path | str, compress: bool = True) -> None:
    """Write a SimpleITK image atomically; the temporary file keeps the ending so the format is chosen right."""
    import SimpleITK as sitk

    path = Path(path)
    ending = next((e for e in IMAGE_ENDINGS if path.name.endswith(e)), path.suffix)
    if ending in DETACHED_HEADER_ENDINGS:
        raise ValueError(f"{path}: {ending} keeps the voxels in a second file, which cannot be written atomically; "
                         "use .mha, .nrrd or .nii.gz")
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def write_figure_atomic(figure: Any, path: Path | str, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the ending, PNG without one), and close it, also on error.

    ``savefig_kwargs`` go to ``Figure.savefig`` (e.g. ``dpi``, ``bbox_inches``). matplotlib is imported only here."""
    path = Path(path)
    ending = path.suffix or ".png"
    try:
        with atomic_path(path, suffix=ending) as tmp:
            figure.savefig(tmp, format=ending.lstrip("."), **savefig_kwargs)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)  # pyplot keeps every open figure alive: an unclosed one leaks its memory
    return path


# --- whole folders -----------------------------------------------------------------------------------------------
def _aside(folder: Path, why: str) -> Path:
    """Move ``folder`` out of sight into a new hidden ``.partial-<name>-<why>-*`` sibling; returns that sibling."""
    holder = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{folder.name}-{why}-", dir=folder.parent))
    try:
        os.rename(folder, holder / folder.name)
    except BaseException:
        os.rmdir(holder)
        raise
    return holder


def replace_folder_atomic(staging: Path | str, target: Path | str) -> None:
    """Put the complete folder ``staging`` at ``target`` with renames only; a previous ``target`` is removed.

    The old folder is first renamed aside (a hidden ``.partial-*`` sibling), then ``staging`` is renamed into place,
    then the old one is deleted: readers see the old folder or the new one, never a mix. If the second rename fails,
    the old folder is put back (unless another process has put a folder there meanwhile) and the error is raised;
    an interruption leaves the old data whole in the hidden folder, where :func:`sweep_stale_partials` finds it.
    ``staging`` must be on the same file system as ``target`` (a sibling, as ``.partial-*`` folders are).
    """
    staging, target = Path(staging), Path(target)
    holder = _aside(target, "old") if os.path.lexists(target) else None
    try:
        os.rename(staging, target)
    except BaseException:
        if holder is not None and not os.path.lexists(target):
            os.rename(holder / target.name, target)
        raise
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


def remove_folder(path: Path | str) -> bool:
    """Delete the folder ``path`` after renaming it out of sight (no reader sees it half deleted); True if it existed."""
    path = Path(path)
    if not path.is_dir():
        return False
    shutil.rmtree(_aside(path, "removed"), ignore_errors=True)
    return True


def sweep_stale_partials(parent: Path | str, stale_after_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the ``.partial-*`` folders in ``parent`` untouched for ``stale_after_s`` seconds; returns them."""
    removed, now = [], time.time()
    for partial in Path(parent).glob(f"{PARTIAL_PREFIX}*"):
        try:
            if partial.is_dir() and now - partial.stat().st_mtime > stale_after_s:
                shutil.rmtree(partial, ignore_errors=True)
                removed.append(partial)
        except FileNotFoundError:  # another process removed it first
            pass
    return removed


# --- non-finite floats in JSON -------------------------------------------------------------------------------------
def _status(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def nonfinite_to_null(data: Any, where: str = "$") -> Any:
    """Copy of ``data`` with every non-finite float ``d[k]`` of a mapping written as ``d[k] = None`` and
    ``d[k + "_status"] = "nan" | "inf" | "-inf"`` (``float(status)`` gives the value back).

    A non-finite float in a list has no place for its status and raises ``ValueError`` naming where it is.
    """
    if isinstance(data, dict):
        out: dict[Any, Any] = {}
        for key, value in data.items():
            if isinstance(value, float) and not math.isfinite(value):
                status_key = f"{key}{STATUS_SUFFIX}"
                if status_key in data:
                    raise ValueError(f"{where}.{key}: cannot record a non-finite value, {status_key!r} exists")
                out[key], out[status_key] = None, _status(value)
            else:
                out[key] = nonfinite_to_null(value, f"{where}.{key}")
        return out
    if isinstance(data, (list, tuple)):
        return [nonfinite_to_null(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"{where}: non-finite value {data} in a list cannot be written as strict JSON")
    return data


def null_to_nonfinite(data: Any) -> Any:
    """Inverse of :func:`nonfinite_to_null`: ``{"hd": None, "hd_status": "inf"}`` -> ``{"hd": inf}``."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            status = data.get(f"{key}{STATUS_SUFFIX}") if value is None else None
            if isinstance(status, str) and status in ("nan", "inf", "-inf"):
                out[key] = float(status)
            elif not (isinstance(key, str) and key.endswith(STATUS_SUFFIX)
                      and data.get(key[: -len(STATUS_SUFFIX)], 0) is None):
                out[key] = null_to_nonfinite(value)
        return out
    if isinstance(data, list):
        return [null_to_nonfinite(v) for v in data]
    return data
