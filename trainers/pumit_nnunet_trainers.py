"""The module nnU-Net's external-trainer lookup (``nnUNet_extTrainer``) imports.

nnU-Net imports every module of this folder as a top-level module and drops it from ``sys.modules`` after the
search, so the classes live in the library under stable dotted names and are only re-exported here.
"""

from pumit_nnunet.nnunet.trainers import *  # noqa: F401,F403
from pumit_nnunet.nnunet.demo_trainers import *  # noqa: F401,F403  (the demo's PUMIT / nnU-Net trainer pairs)
