"""``pumit-nnunet corpus {convert,inspect,validate,add}``: build and check the pre-training corpus store."""

from __future__ import annotations

import argparse
import json


def _add_convert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=0, help="parallel worker processes (0: in process)")
    parser.add_argument("--part", type=int, default=0, help="this machine's share, 0-based (with --parts)")
    parser.add_argument("--parts", type=int, default=1, help="number of machines sharing the conversion")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--resample-uneven-series", action="store_true",
                        help="interpolate DICOM series (and multi-frame files) with missing or unevenly spaced slices "
                             "onto an even grid at the median step, instead of refusing them")
    parser.add_argument("--max-nonfinite", type=float, default=0.01, metavar="FRACTION",
                        help="refuse images with a larger share of NaN/Inf voxels (default 0.01); below it they are "
                             "replaced by the finite minimum and reported")


def _options(args: argparse.Namespace):
    from pumit_nnunet.corpus.convert import ConvertOptions

    return ConvertOptions(resample_uneven=args.resample_uneven_series, max_nonfinite=args.max_nonfinite)


def _print_conversion(report) -> int:
    """Summary on stdout, one line per failure on stderr; exit 1 when any input failed."""
    import sys

    print(f"converted {report.converted} images, skipped {report.skipped} unchanged items, "
          f"replaced {len(report.changed)} changed sources, {report.failed} failures; store: {report.store}")
    for source in report.changed[:50]:
        print(f"  CHANGED {source}: source differs from the converted one; its stored images were replaced")
    for source, note in report.warnings[:50]:
        print(f"  WARNING {source}: {note}")
    for source, reason in report.failures:
        print(f"pumit-nnunet corpus convert: error: {source}: {reason}", file=sys.stderr)
    return 1 if report.failures else 0


def _convert(args: argparse.Namespace) -> int:
    from pumit_nnunet.corpus.convert import convert

    report = convert(args.sources, args.out, dataset=args.dataset, modality=args.modality or "",
                     num_workers=args.workers, part=args.part, parts=args.parts, progress=not args.no_progress,
                     options=_options(args))
    return _print_conversion(report)


def _inspect(args: argparse.Namespace) -> int:
    from pumit_nnunet.corpus.report import corpus_counts, plot_counts

    counts = corpus_counts(args.store)
    print(json.dumps(counts, indent=1, sort_keys=True))
    if args.plot:
        print(f"plot written to {plot_counts(counts, args.plot)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from pumit_nnunet.corpus.report import validate_store

    import sys

    report = validate_store(args.store)
    for path, problem in report.problems:
        print(f"pumit-nnunet corpus validate: error: {path}: {problem}", file=sys.stderr)
    print(f"checked {report.checked} images, {len(report.problems)} problems")
    return 1 if report.problems else 0


def _add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pumit_nnunet.corpus.catalog import DatasetSpec, read_catalog_file, write_catalog_file
    from pumit_nnunet.corpus.convert import convert
    from pumit_nnunet.corpus.store import init_store

    store = init_store(args.store)
    catalog_file = Path(store) / "catalog.json"
    specs = [s for s in (read_catalog_file(catalog_file) if catalog_file.is_file() else []) if s.name != args.name]
    spec = DatasetSpec(name=args.name, modalities=(args.modality,), multiplier=args.multiplier, depth_axis=args.depth_axis,
                       citation=args.citation, licence=args.licence, notes=f"added from {Path(args.folder).resolve()}")
    write_catalog_file(catalog_file, specs + [spec])
    report = convert([args.folder], store, dataset=args.name, modality=args.modality, num_workers=args.workers,
                     part=args.part, parts=args.parts, progress=not args.no_progress, options=_options(args))
    return _print_conversion(report)


def register(subparsers) -> None:
    """Add the ``corpus`` sub-command with its nested ``convert``, ``inspect``, ``validate`` and ``add``."""
    corpus = subparsers.add_parser("corpus", help="build, inspect and validate the pre-training corpus store")
    nested = corpus.add_subparsers(dest="corpus_command", metavar="ACTION")
    corpus.set_defaults(func=lambda args: (corpus.print_help(), 2)[1])

    convert = nested.add_parser("convert", help="convert raw datasets (nnU-Net raw, catalog layouts, image folders)")
    convert.add_argument("sources", nargs="+", help="dataset folders, image folders or files")
    convert.add_argument("--out", required=True, help="store folder (created; never inside a source)")
    convert.add_argument("--dataset", help="catalog name of the dataset (default: the folder name)")
    convert.add_argument("--modality", help="modality for every image (overrides layouts and DICOM tags)")
    _add_convert_options(convert)
    convert.set_defaults(func=_convert)

    inspect = nested.add_parser("inspect", help="counts by dataset, modality and aniso_d")
    inspect.add_argument("store")
    inspect.add_argument("--plot", help="also save bar charts to this image file")
    inspect.set_defaults(func=_inspect)

    validate = nested.add_parser("validate", help="re-open every stored image")
    validate.add_argument("store")
    validate.set_defaults(func=_validate)

    add = nested.add_parser("add", help="add your own folder of images or nnU-Net raw dataset to a store")
    add.add_argument("store")
    add.add_argument("folder")
    add.add_argument("--name", required=True, help="dataset name (recorded in the store's catalog.json)")
    add.add_argument("--modality", required=True, help="modality string, e.g. CT, MRI/T1, RGB/fundus, gray/XR")
    add.add_argument("--multiplier", type=float, default=1.0, help="sampling multiplier of the dataset")
    add.add_argument("--depth-axis", default="auto", choices=("auto", "S", "A", "R"), help="depth-axis rule")
    add.add_argument("--citation", default="", help="how to cite the dataset")
    add.add_argument("--licence", default="", help="licence note")
    _add_convert_options(add)
    add.set_defaults(func=_add)
