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
import warnings
from typing import Sequence

#: subcommand registration modules, in the order ``--help`` lists them
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "pumit_nnunet.nnunet.cli",  # plan, env
    "pumit_nnunet.nnunet.weights_cli",  # weights (needs the plans side of nnU-Net)
    "pumit_nnunet.corpus.cli",  # corpus
    "pumit_nnunet.pretrain.cli",  # pretrain
    "pumit_nnunet.evaluation.cli",  # evaluate, convert, export, medmnist, label-efficiency
    "pumit_nnunet.demo",  # demo
    "pumit_nnunet.data.cli",  # data (list, fetch, build)
)


def build_parser() -> argparse.ArgumentParser:
    from pumit_nnunet import __version__
    from pumit_nnunet.errors import OneLineArgumentParser

    parser = OneLineArgumentParser(  # sub-parsers inherit the class: one-line usage errors everywhere
        prog="pumit-nnunet",
        description="PUMIT inside nnU-Net v2. Train and predict with the stock nnUNetv2_* commands "
        "(-tr PumitTrainer); this command covers planning, weights, the pre-training corpus, pre-training, "
        "evaluation, challenge export and the demo.",
    )
    parser.add_argument("--version", action="version", version=f"pumit-nnunet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of expected errors too")
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


def _command_name(args: argparse.Namespace) -> str:
    """``"corpus convert"`` for nested subcommands: every nested parser stores its choice in ``<name>_command``."""
    words = [args.command]
    words += [value for key, value in sorted(vars(args).items())
              if key.endswith("_command") and key != "command" and isinstance(value, str)]
    return " ".join(w for w in words if w)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; expected errors (``PumitError`` and the user's OS errors) become one line on stderr."""
    from pumit_nnunet.errors import INTERRUPTED_EXIT_CODE, format_error, is_expected

    _safe_streams()
    # torch's own import-time deprecation notice is no message of ours: stderr stays one line on an error
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(format_error(_command_name(args), KeyboardInterrupt("interrupted")), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as error:  # noqa: BLE001 - only expected errors are caught; bugs are re-raised below
        if args.debug or not is_expected(error):
            raise
        print(format_error(_command_name(args), error), file=sys.stderr)
        return getattr(error, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
