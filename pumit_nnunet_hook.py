"""Interpreter start-up hook (imported by ``pumit_nnunet.pth``): let stock nnU-Net find the PUMIT trainers.

It appends our trainer folder to ``nnUNet_extTrainer`` (nnU-Net >= 2.8's external-trainer lookup) without
overwriting what the user set, imports nothing heavy, and never raises. Opt out with ``PUMIT_NNUNET_NO_HOOK=1``.
"""

import os

_SHIM = "pumit_nnunet_trainers.py"


def trainer_folder() -> "str | None":
    """The folder holding ``pumit_nnunet_trainers.py``: packaged in a wheel, ``trainers/`` in a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "pumit_nnunet", "_nnunet_trainers"), os.path.join(here, "trainers")):
        if os.path.isfile(os.path.join(folder, _SHIM)):
            return folder
    return None


def install() -> None:
    if os.environ.get("PUMIT_NNUNET_NO_HOOK"):
        return
    try:
        folder = trainer_folder()
        if folder is None:
            return
        current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        if folder not in current:
            os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])
    except Exception:  # a start-up hook must never break the interpreter
        pass
