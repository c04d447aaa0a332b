"""The nnU-Net side of pre-trained weights: ``-pretrained_weights FILE`` and weights recorded in the plans.

Two routes reach :func:`pumit_nnunet.checkpoints.load_vit_weights`:

1. ``nnUNetv2_train ... -tr PumitTrainer -pretrained_weights FILE``. nnU-Net calls the name
   ``load_pretrained_weights`` imported into :mod:`nnunetv2.run.run_training`, which only accepts an identical
   nnU-Net network. :func:`install_pretrained_weights_route` (called by ``PumitTrainer.__init__``) wraps that
   module attribute: networks with a ``backbone`` ViT take our route (every supported format; a full results
   checkpoint of the same network loads strictly as a whole); any other network goes to nnU-Net's function.
   The command line has no room for options, so they come from the plans configuration's ``pumit_pretrained``
   block (options only, e.g. the pretraining-match preset's ``channel_mode``), overridden by the environment:
   ``PUMIT_PRETRAINED_ALLOW_PARTIAL=1`` and ``PUMIT_PRETRAINED_CHANNEL_MODE=sum|imagenet-fold``.
2. A ``"pumit_pretrained"`` block in a plans configuration (written by ``pumit-nnunet weights attach``):
   ``{"path": str, "allow_partial": bool, "channel_mode": "sum" | "imagenet-fold", "eva_cls_pos_index": 0}``.
   ``PumitTrainer.initialize`` loads it unless training continues (``--c``). ``path`` may use ``~`` and
   environment variables (``$nnUNet_results/...``); a relative path is resolved against the folder of the plans
   file (``nnUNet_preprocessed/DatasetXXX``). ``attach`` records absolute paths.
If both are given, ``-pretrained_weights`` is applied last and wins.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pumit_nnunet.checkpoints.convert import CHANNEL_MODES
from pumit_nnunet.errors import DataError, UsageError
from pumit_nnunet.checkpoints.report import LoadReport
from pumit_nnunet.checkpoints.load import unwrap_network
from pumit_nnunet.io import write_text_atomic

if TYPE_CHECKING:
    from pumit_nnunet.models.vit import ViTConfig

__all__ = [
    "PLANS_KEY",
    "install_pretrained_weights_route",
    "pumit_load_pretrained_weights",
    "load_pretrained_from_plans",
    "record_pretrained_in_plans",
    "resolve_weights_path",
    "validate_pretrained_options",
    "preprocessed_plan_files",
    "plan_vit_config",
]

PLANS_KEY = "pumit_pretrained"
#: attribute set on a network once ``-pretrained_weights`` loaded into it (weights recorded in the plans then yield)
WEIGHTS_LOADED_FLAG = "_pumit_pretrained_loaded"
_DEFAULT_OPTIONS: dict[str, Any] = {"allow_partial": False, "channel_mode": "sum", "eva_cls_pos_index": 0}


class PretrainedOptionsError(DataError, ValueError):
    """A ``pumit_pretrained`` block (or its environment overrides) holds an unknown or invalid option."""


class MissingConfigurationError(DataError, KeyError):
    """A plans file has no configuration of the requested name."""


def validate_pretrained_options(options: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check the options of a ``pumit_pretrained`` block; raises ``ValueError`` naming the bad one."""
    unknown = set(options) - set(_DEFAULT_OPTIONS)
    if unknown:
        raise PretrainedOptionsError(f"unknown pretrained-weights options {sorted(unknown)}; known: {sorted(_DEFAULT_OPTIONS)}")
    merged = {**_DEFAULT_OPTIONS, **options}
    if merged["channel_mode"] not in CHANNEL_MODES:
        raise PretrainedOptionsError(f"channel_mode {merged['channel_mode']!r} is not one of {CHANNEL_MODES}")
    if merged["eva_cls_pos_index"] not in (0, 1):
        raise PretrainedOptionsError("eva_cls_pos_index must be 0 (correct) or 1 (reproduces the original code's bug)")
    merged["allow_partial"] = bool(merged["allow_partial"])
    return merged


def _backbone(network: Any) -> Any:
    from pumit_nnunet.checkpoints.load import unwrap_network
    from pumit_nnunet.models.vit import UniversalViT

    backbone = getattr(unwrap_network(network), "backbone", None)
    return backbone if isinstance(backbone, UniversalViT) else None


#: options of the running trainer's plans block, set by :func:`install_pretrained_weights_route`
_PLAN_OPTIONS: dict[str, Any] = {}


def _options_from_env() -> dict[str, Any]:
    options = dict(_PLAN_OPTIONS)
    if "PUMIT_PRETRAINED_ALLOW_PARTIAL" in os.environ:
        options["allow_partial"] = os.environ["PUMIT_PRETRAINED_ALLOW_PARTIAL"].lower() in ("1", "true", "yes")
    if "PUMIT_PRETRAINED_CHANNEL_MODE" in os.environ:
        options["channel_mode"] = os.environ["PUMIT_PRETRAINED_CHANNEL_MODE"]
    return validate_pretrained_options(options)


def _same_network(model_state: dict, checkpoint_state: dict) -> bool:
    """Every model key is in the checkpoint with the same shape (a results checkpoint of this very network)."""
    return all(k in checkpoint_state and checkpoint_state[k].shape == v.shape for k, v in model_state.items())


def pumit_load_pretrained_weights(network: Any, fname: str, verbose: bool = False,
                                  log: Callable[[str], None] = print) -> LoadReport:
    """Load ``fname`` into a network with a ``backbone`` ViT: the whole network strictly when ``fname`` holds all
    of its keys (a results checkpoint of the same network), else the backbone from any supported format."""
    from pumit_nnunet.checkpoints.load import load_network_strict, load_vit_weights, unwrap_network
    from pumit_nnunet.checkpoints.readers import read_weights

    weights = read_weights(fname)
    network = unwrap_network(network)
    if weights.encoder_prefix == "backbone." and _same_network(network.state_dict(), weights.state_dict):
        return load_network_strict(network, weights, log=log)
    ignored = [k for k in weights.state_dict if not k.startswith(weights.encoder_prefix)]
    if ignored:
        log(f"{len(ignored)} checkpoint entries outside the ViT backbone are not used (e.g. {ignored[0]})")
    options = _options_from_env()
    return load_vit_weights(network.backbone, weights, log=log, **options)


def install_pretrained_weights_route(plan_options: dict[str, Any] | None = None) -> None:
    """Wrap ``nnunetv2.run.run_training.load_pretrained_weights`` (idempotent); see the module docstring.

    ``plan_options``: the ``pumit_pretrained`` block of the trainer's plans (its ``path`` is ignored here)."""
    import nnunetv2.run.run_training as run_training

    _PLAN_OPTIONS.clear()
    _PLAN_OPTIONS.update({k: v for k, v in (plan_options or {}).items() if k != "path"})

    current = run_training.load_pretrained_weights
    if getattr(current, "_pumit_route", False):
        return

    def load_pretrained_weights(network, fname, verbose=False):
        if _backbone(network) is None:
            return current(network, fname, verbose=verbose)
        from pumit_nnunet.nnunet.checkpointing import trainer_refuses_bad_input

        print(f"################### PUMIT: loading pre-trained weights from {fname} ###################")
        with trainer_refuses_bad_input("-pretrained_weights not loaded"):  # one line, not a traceback
            pumit_load_pretrained_weights(network, fname, verbose)
        setattr(unwrap_network(network), WEIGHTS_LOADED_FLAG, True)

    load_pretrained_weights._pumit_route = True  # type: ignore[attr-defined]
    load_pretrained_weights.__wrapped__ = current  # type: ignore[attr-defined]
    run_training.load_pretrained_weights = load_pretrained_weights


def resolve_weights_path(path: str, base: str | os.PathLike | None) -> Path:
    """Expand ``~`` and environment variables; a relative path is taken relative to ``base``."""
    expanded = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if not expanded.is_absolute() and base is not None:
        expanded = Path(base) / expanded
    return expanded


def load_pretrained_from_plans(trainer: Any) -> LoadReport | None:
    """Load the weights recorded in the trainer's plans configuration into ``trainer.network.backbone``."""
    from pumit_nnunet.checkpoints.load import load_vit_weights

    block = trainer.configuration_manager.configuration.get(PLANS_KEY)
    if not isinstance(block, (dict, type(None))):
        raise PretrainedOptionsError(f"plans configuration {trainer.configuration_name!r}: {PLANS_KEY!r} must be a dict")
    if not block or "path" not in block:  # no weights recorded (a preset may record only options such as channel_mode)
        return None
    options = validate_pretrained_options({k: v for k, v in block.items() if k != "path"})
    path = resolve_weights_path(block["path"], getattr(trainer, "preprocessed_dataset_folder_base", None))
    if not path.is_file():
        raise FileNotFoundError(
            f"plans configuration {trainer.configuration_name!r} records pre-trained weights {path}, which does not "
            f"exist; fix the path with `pumit-nnunet weights attach` or remove the {PLANS_KEY!r} block"
        )
    backbone = _backbone(trainer.network)
    if backbone is None:
        raise PretrainedOptionsError(f"the network of configuration {trainer.configuration_name!r} has no ViT backbone to "
                                     "load these weights into", path)
    log = getattr(trainer, "print_to_log_file", print)
    log(f"PUMIT: loading pre-trained weights recorded in the plans: {path}")
    return load_vit_weights(backbone, path, log=log, **options)


def _read_plans_json(plans_path: Path) -> dict[str, Any]:
    """The plans dict; a file that is not JSON (or not a JSON object) is a one-line :class:`DataError`."""
    try:
        plans = json.loads(plans_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"is not a plans JSON file (not UTF-8 text: {error.reason} at byte {error.start})",
                        plans_path) from error
    except json.JSONDecodeError as error:
        raise DataError(f"is not a plans JSON file ({error.msg} at line {error.lineno} column {error.colno})",
                        plans_path) from error
    if not isinstance(plans, dict):
        raise DataError(f"is not a plans file: it holds a JSON {type(plans).__name__}, not an object", plans_path)
    return plans


def record_pretrained_in_plans(plans_file: str, configuration: str, weights: str, **options: Any) -> Path:
    """Write the ``pumit_pretrained`` block into ``configuration`` of a plans JSON (atomically; the previous file is
    kept as ``<plans>.<time>.bak``); returns the backup's path. The weights are read once to fail early."""
    from pumit_nnunet.checkpoints.readers import read_weights

    plans_path = Path(plans_file)
    if not plans_path.is_file():
        raise FileNotFoundError(f"plans file {plans_path} does not exist")
    plans = _read_plans_json(plans_path)
    configurations = plans.get("configurations", {})
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise MissingConfigurationError(f"configuration {configuration!r} not in the plans (have: {sorted(configurations)})",
                                        plans_path)
    # options already recorded (e.g. a preset's channel_mode) stay unless given again
    recorded = {k: v for k, v in (configurations[configuration].get(PLANS_KEY) or {}).items() if k != "path"}
    block = {"path": str(Path(weights).expanduser().resolve()), **validate_pretrained_options({**recorded, **options})}
    read_weights(block["path"])  # absent, broken or ViT-less files fail here, not hours later in training
    configurations[configuration][PLANS_KEY] = block
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    backup = plans_path.with_name(f"{plans_path.name}.{stamp}.bak")
    while backup.exists():  # never overwrite an earlier backup
        n += 1
        backup = plans_path.with_name(f"{plans_path.name}.{stamp}-{n}.bak")
    shutil.copy2(plans_path, backup)
    write_text_atomic(plans_path, json.dumps(plans, indent=4))  # nnU-Net writes plans with indent 4
    return backup


def preprocessed_plan_files(dataset: str | int, plans_name: str = "nnUNetPlans") -> tuple[Path, Path]:
    """``(plans JSON, dataset.json)`` of a dataset (name or ID) in ``nnUNet_preprocessed``."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_preprocessed is None:
        raise UsageError("nnUNet_preprocessed is not set; pass --plans FILE instead of --dataset")
    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)
    return folder / f"{plans_name}.json", folder / "dataset.json"


def plan_vit_config(base: ViTConfig, plans_file: str | os.PathLike, configuration: str,
                    dataset_json: str | os.PathLike | None = None) -> ViTConfig:
    """The backbone config a PUMIT trainer builds for ``configuration`` of a plans file (channels from the
    ``dataset.json`` beside it): fixed token depth of the plan's aniso_d, the plan's token grid."""
    from pumit_nnunet.models.segmentation import backbone_config
    from pumit_nnunet.nnunet.plans import adapt_configuration

    plans_path = Path(plans_file)
    dataset_path = Path(dataset_json) if dataset_json else plans_path.parent / "dataset.json"
    for path in (plans_path, dataset_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    plans = json.loads(plans_path.read_text(encoding="utf-8"))
    dataset = json.loads(dataset_path.read_text(encoding="utf-8"))
    channels = len(dataset.get("channel_names", dataset.get("modality", {})))
    vit = {k: v for k, v in base.to_dict().items()}
    resolved = adapt_configuration(copy.deepcopy(plans), configuration, vit)
    kwargs = resolved["architecture"]["arch_kwargs"]
    return backbone_config(vit, channels, kwargs["patch_size"], kwargs["aniso_d"])
