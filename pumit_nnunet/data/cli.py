"""``pumit-nnunet data``: list the registered sources of real example data, fill the cache, build the demo datasets.

Nothing heavy is imported at registration; ``data build`` imports SimpleITK when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]

_EPILOG = ("The cache folder is $PUMIT_DATA_CACHE, else the platform's user cache folder (~/.cache/pumit-nnunet on "
           "Linux). Downloads use `python -m pip download` with the registry's sha256 pinned, so pip's own settings "
           "(PIP_INDEX_URL, proxies) apply; once cached, everything works offline. The one source package "
           "(pyradiomics 3.0.1's sdist) is only downloaded, never installed, but pip asks its setup.py for metadata "
           "(as any `pip download` of a source package does): the archive's sha256 is checked before that step, so "
           "only that exact published file can run.")


def _say(line: str) -> None:
    print(line, flush=True)  # progress goes to stdout: stderr stays the one line of an error


def _list(args: argparse.Namespace) -> int:
    from pumit_nnunet.data import cache_dir, is_cached, list_sources, source_dir

    print(f"cache: {cache_dir()}")
    for source in list_sources():
        state = f"cached at {source_dir(source)}" if is_cached(source.name) else "not cached"
        print(f"{source.name}: {source.requirement} ({source.kind}, {source.archive_size / 1e6:.1f} MB, "
              f"{len(source.members)} files, {state})")
        print(f"    {source.description}; licence: {source.licence}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from pumit_nnunet.data import cache_dir, fetch, get_source, list_sources

    names = args.sources or [source.name for source in list_sources()]
    for name in names:
        get_source(name)  # an unknown name is refused before anything is downloaded
    for name in names:
        folder = fetch(name, progress=_say, refresh=args.refresh)
        print(f"{name}: {folder} (verified)")
    print(f"cache: {cache_dir()}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from pumit_nnunet.data import build_raw_dataset, build_real_demo

    dest = Path(args.dest)
    if args.dataset:
        for name in args.dataset:
            print(f"{name}: {build_raw_dataset(name, dest)}")
    else:
        print(f"real demo: {build_real_demo(dest)}")
    return 0


def register(subparsers) -> None:
    """Add ``data`` with its nested ``list``, ``fetch`` and ``build``."""
    description = "Real example data: list the registered sources, fill the cache, build the real-demo datasets."
    data = subparsers.add_parser("data", help="real example data: list the sources, fill the cache, build datasets",
                                 description=description, epilog=_EPILOG)
    nested = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(file=sys.stdout), 2)[1])

    listing = nested.add_parser("list", help="the registered sources, what each holds and whether it is cached")
    listing.set_defaults(func=_list)

    fetch = nested.add_parser("fetch", help="download, verify and extract sources into the cache (prints where)",
                              epilog=_EPILOG)
    fetch.add_argument("sources", nargs="*", metavar="SOURCE", help="source names (default: all; see `data list`)")
    fetch.add_argument("--refresh", action="store_true",
                       help="download again even when cached (the cached copy stays until the new one is complete)")
    fetch.set_defaults(func=_fetch)

    build = nested.add_parser("build", help="write the real-demo nnU-Net raw datasets (deterministic) into a folder")
    build.add_argument("dest", help="folder to create (a folder that pumit-nnunet did not make is refused)")
    build.add_argument("--dataset", action="append", metavar="NAME",
                       help="build only this raw dataset under DEST (repeatable), e.g. Dataset902_RealCTLungNodule")
    build.set_defaults(func=_build)
