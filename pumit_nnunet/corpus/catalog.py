"""The dataset catalog: the 55 public datasets of the PUMIT paper's corpus as data, plus users' own.

The catalog is JSON (``pumit_nnunet/corpus/data/datasets.json``); a store may carry extra entries in its own
``catalog.json`` (written by ``pumit-nnunet corpus add``) with the same schema. Layout patterns are globs relative
to the dataset folder (``**`` spans folders); the first matching pattern gives the modality.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

#: modality placeholders resolved per image: from the DICOM tags, or from an nnU-Net/MSD ``dataset.json``
MODALITY_FROM_DICOM = "auto"
MODALITY_FROM_DATASET_JSON = "dataset.json"
DEPTH_AXIS_RULES = ("auto", "S", "A", "R")
SEQUENCE_4D_RULES = ("duplicates", "b0+duplicates", "channels")


@dataclass(frozen=True)
class LayoutPattern:
    """One expected file (or DICOM-series folder) pattern of a dataset and the modality it holds."""

    pattern: str
    modality: str
    #: regex on the file name; files whose first group matches form one near-duplicate group
    duplicate_group: str | None = None
    #: DICOM series with fewer slices are skipped (NCTCT keeps series of >= 81 images)
    min_slices: int = 0
    #: regex on the file name marking the group's b0 volume: it keeps weight 1, the others share (2n-1)/n² with
    #: n the number of the others (authors' IXI DTI: ``process.py`` IXIProcessor gives index 0 weight 1)
    b0_pattern: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """One catalog entry: what a dataset is, how it is laid out, and how much it is sampled."""

    name: str
    modalities: tuple[str, ...]
    multiplier: float = 1.0
    kind: str = "3d"
    citation: str = ""
    licence: str = ""
    layouts: tuple[LayoutPattern, ...] = ()
    exclude: tuple[str, ...] = ()
    #: "auto" (image metadata, then the most anisotropic axis) or the anatomical axis of the official description
    depth_axis: str = "auto"
    #: how the 4th axis of a 4D image is split: near-duplicate frames/directions, or distinct modalities
    sequence_4d: str = "duplicates"
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"dataset name must be non-empty without '/', got {self.name!r}")
        if self.multiplier < 0:
            raise ValueError(f"{self.name}: multiplier must be >= 0, got {self.multiplier}")
        if self.depth_axis not in DEPTH_AXIS_RULES:
            raise ValueError(f"{self.name}: depth_axis must be one of {DEPTH_AXIS_RULES}, got {self.depth_axis!r}")
        if self.sequence_4d not in SEQUENCE_4D_RULES:
            raise ValueError(f"{self.name}: sequence_4d must be one of {SEQUENCE_4D_RULES}, got {self.sequence_4d!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetSpec":
        data = dict(data)
        data["modalities"] = tuple(data.get("modalities", ()))
        data["layouts"] = tuple(LayoutPattern(**layout) for layout in data.get("layouts", ()))
        data["exclude"] = tuple(data.get("exclude", ()))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        data["exclude"] = list(self.exclude)
        data["layouts"] = [asdict(layout) for layout in self.layouts]
        return data

    def match(self, relative_path: str) -> LayoutPattern | None:
        """The first layout pattern matching ``relative_path`` (posix, relative to the dataset root), if any."""
        if any(glob_match(pattern, relative_path) for pattern in self.exclude):
            return None
        return next((layout for layout in self.layouts if glob_match(layout.pattern, relative_path)), None)


@dataclass
class Catalog:
    """Datasets by name; user entries override built-in ones of the same name."""

    datasets: dict[str, DatasetSpec] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DatasetSpec:
        try:
            return self.datasets[name]
        except KeyError:
            raise KeyError(f"dataset {name!r} is not in the catalog; add it with `pumit-nnunet corpus add`") from None

    def __contains__(self, name: str) -> bool:
        return name in self.datasets

    def __len__(self) -> int:
        return len(self.datasets)

    def multiplier(self, name: str) -> float:
        return self.datasets[name].multiplier if name in self.datasets else 1.0


def duplicate_group_weight(n: int) -> float:
    """Weight of each of ``n`` near-duplicate images (cine frames, diffusion directions): (2n - 1) / n².

    The group then weighs ``2 - 1/n`` in total: more than one image, far less than ``n`` (the paper's weighting of near-duplicates).
    """
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    return (2 * n - 1) / (n * n)


def sequence_weights(n: int, b0_first: bool = False) -> list[float]:
    """Weights of the ``n`` entries of a near-duplicate group; with ``b0_first`` entry 0 (the b0 volume of a
    diffusion series, a different contrast from the directions) keeps 1 and the ``n - 1`` others share."""
    if not b0_first or n < 2:
        return [duplicate_group_weight(n)] * n
    return [1.0] + [duplicate_group_weight(n - 1)] * (n - 1)


@lru_cache(maxsize=512)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(pattern: str, relative_path: str) -> bool:
    """Glob match on a posix relative path: ``*``/``?`` stay inside one folder, ``**`` spans folders."""
    return _glob_regex(pattern).match(relative_path) is not None


def builtin_catalog_path() -> Path:
    return Path(str(resources.files("pumit_nnunet.corpus") / "data" / "datasets.json"))


def read_catalog_file(path: str | Path) -> list[DatasetSpec]:
    """Parse a catalog JSON file (``{"datasets": [...]}``), failing with the file name on bad content."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["datasets"]
        return [DatasetSpec.from_dict(entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot read catalog {path}: {error}") from error


def load_catalog(*extra_files: str | Path) -> Catalog:
    """The built-in catalog, updated with the entries of ``extra_files`` that exist (later files win)."""
    catalog = Catalog({spec.name: spec for spec in read_catalog_file(builtin_catalog_path())})
    for extra in extra_files:
        if Path(extra).is_file():
            catalog.datasets.update({spec.name: spec for spec in read_catalog_file(extra)})
    return catalog


def write_catalog_file(path: str | Path, specs: list[DatasetSpec]) -> None:
    """Write ``specs`` as a catalog JSON file, atomically."""
    from pumit_nnunet.io import write_text_atomic

    payload = {"schema_version": 1, "datasets": [spec.to_dict() for spec in specs]}
    write_text_atomic(Path(path), json.dumps(payload, indent=1, ensure_ascii=False))
