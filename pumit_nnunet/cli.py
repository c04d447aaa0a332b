"""The ``pumit-nnunet`` console command.

Each subcommand lives in the module of the layer it belongs to; that module exposes
``register(subparsers) -> None``, which adds one sub-parser and sets ``func=handler`` on it, where
``handler(args) -> int`` returns the exit code. Registration modules keep heavy imports (torch, nnU-Net)
inside their handlers so that ``pumit-nnunet --help`` stays fast.
nnU-Net's own commands (``nnUNetv2_train`` and friends) stay nnU-Net's.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: subcommand registration modules, in the order ``--help`` lists them
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pumit_nnunet.nnunet.cli",  # plan, env
    "pumit_nnunet.nnunet.weights_cli",  # weights (needs the plans side of nnU-Net)
    "pumit_nnunet.corpus.cli",  # corpus
    "pumit_nnunet.pretrain.cli",  # pretrain
    "pumit_nnunet.evaluation.cli",  # evaluate, convert, export, medmnist, label-efficiency
    "pumit_nnunet.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    from pumit_nnunet import __version__

    parser = argparse.ArgumentParser(
        prog="pumit-nnunet",
        description="PUMIT inside nnU-Net v2. Train and predict with the stock nnUNetv2_* commands "
        "(-tr PumitTrainer); this command covers planning, weights, the pre-training corpus, pre-training, "
        "evaluation, challenge export and the demo.",
    )
    parser.add_argument("--version", action="version", version=f"pumit-nnunet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def _safe_streams() -> None:
    """Tables use characters such as '±': on a terminal without UTF-8, replace them instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _safe_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
