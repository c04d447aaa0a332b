"""``pumit-nnunet env`` and ``pumit-nnunet plan``: the nnU-Net side of the command line."""

from __future__ import annotations

import argparse
import os
import shlex

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "env", help="print the nnU-Net environment line that makes -tr PumitTrainer work without the start-up hook",
        description="The package installs a start-up hook that sets nnUNet_extTrainer; where .pth files are not "
        "processed (python -S, --target installs, PUMIT_NNUNET_NO_HOOK=1) use: eval \"$(pumit-nnunet env)\"",
    )
    parser.set_defaults(func=_env)
    from pumit_nnunet.nnunet.plan_cli import register_plan

    register_plan(subparsers)


def trainer_folder() -> str:
    """Folder that nnU-Net's external-trainer lookup must search (packaged or source checkout)."""
    import pumit_nnunet_hook

    folder = pumit_nnunet_hook.trainer_folder()
    if folder is None:
        raise RuntimeError("the PUMIT trainer folder (pumit_nnunet_trainers.py) is missing from this installation; reinstall pumit-nnunet")
    return folder


def _env(args: argparse.Namespace) -> int:
    folder = trainer_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p and p != folder]
    print(f"export nnUNet_extTrainer={shlex.quote(os.pathsep.join(current + [folder]))}")
    return 0
