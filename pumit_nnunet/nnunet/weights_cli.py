"""``pumit-nnunet weights``: inspect, convert, verify and attach pre-trained weights.

- ``inspect FILE [--json]``: format, kind, version, architecture, pre-training plan, heads.
- ``convert FILE --out OUT [target options]``: any supported format -> our checkpoint for a target ViT.
- ``verify FILE [target options]``: load into the target ViT and print the load report (exit 1 if incomplete).
- ``attach PLANS CONFIGURATION FILE``: record the weights in a plans configuration, so that the plain
  ``nnUNetv2_train ... -tr PumitTrainer`` fine-tunes from them.

Every file is read weights-only and must hold finite tensors. ``pumit-nnunet check-model-folder DIR`` (registered
here too) certifies a whole nnU-Net results folder before prediction.

Target options: ``--vit T|S|B|L`` (default: the checkpoint's own size), ``--dataset ID`` or ``--plans FILE`` with
``--configuration`` (the backbone a PUMIT trainer builds for that plan), then ``--in-channels``,
``--patch-depth`` (0 = adaptive SAC 16^3 kernel) and ``--pos-embed-shape D H W`` override single fields.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def _add_conversion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel-mode", choices=("sum", "imagenet-fold"), default=None,
                        help="RGB -> dataset channels: sum and share (the original's rule; any input scaling) or fold "
                             "the ImageNet normalisation into the kernel (input in [0, 1])")
    parser.add_argument("--allow-partial", action="store_true", help="load the matching part only")
    parser.add_argument("--eva-cls-pos-index", type=int, choices=(0, 1), default=0,
                        help="EVA-02 CLS position-embedding index (1 reproduces the original code's bug)")


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vit", choices=("T", "S", "B", "L"), help="target size (default: the checkpoint's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--dataset", help="nnU-Net dataset name or ID: target the backbone of its plan")
    group.add_argument("--plans", help="plans JSON (dataset.json beside it): target the backbone of its plan")
    parser.add_argument("--configuration", default="3d_fullres", help="plans configuration (default 3d_fullres)")
    parser.add_argument("--plans-name", default="nnUNetPlans", help="plans identifier with --dataset")
    parser.add_argument("--in-channels", type=int)
    parser.add_argument("--patch-depth", type=int, help="fixed token depth; 0 = adaptive SAC kernel")
    parser.add_argument("--pos-embed-shape", type=int, nargs=3, metavar=("D", "H", "W"))
    _add_conversion_options(parser)


def _target_config(args: argparse.Namespace, weights: Any) -> Any:
    from dataclasses import replace

    from pumit_nnunet.checkpoints.tools import source_vit_config
    from pumit_nnunet.models.vit import vit_config

    config = vit_config(args.vit) if args.vit else source_vit_config(weights)
    if args.dataset is not None or args.plans is not None:
        from pumit_nnunet.nnunet.pretrained import plan_vit_config, preprocessed_plan_files

        plans, dataset_json = (preprocessed_plan_files(args.dataset, args.plans_name) if args.dataset is not None
                               else (args.plans, None))
        config = plan_vit_config(config, plans, args.configuration, dataset_json)
    overrides: dict[str, Any] = {}
    if args.in_channels is not None:
        overrides["in_channels"] = args.in_channels
    if args.patch_depth is not None:
        overrides["patch_depth"] = args.patch_depth or None
    if args.pos_embed_shape is not None:
        overrides["pos_embed_shape"] = tuple(args.pos_embed_shape)
    return replace(config, **overrides)


def _conversion_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    # an unset --channel-mode keeps what the plans already ask for (e.g. the pretraining-match preset), else "sum"
    kwargs = {"channel_mode": args.channel_mode, "allow_partial": args.allow_partial,
              "eva_cls_pos_index": args.eva_cls_pos_index}
    return {k: v for k, v in kwargs.items() if v is not None}


def _inspect(args: argparse.Namespace) -> int:
    from pumit_nnunet.checkpoints.readers import read_weights
    from pumit_nnunet.checkpoints.tools import describe_checkpoint

    info = describe_checkpoint(read_weights(args.file))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key:>16}: {value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pumit_nnunet.checkpoints.readers import read_weights
    from pumit_nnunet.checkpoints.tools import convert_checkpoint

    config = _target_vit(args, read_weights(args.file)).config
    report = convert_checkpoint(args.file, args.out, config, overwrite=args.force, **_conversion_kwargs(args))
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def _target_vit(args: argparse.Namespace, weights: Any) -> Any:
    """The target ViT; a target these weights cannot describe (e.g. an impossible head split) names the file."""
    from pumit_nnunet.checkpoints.format import CheckpointError
    from pumit_nnunet.models.vit import UniversalViT

    try:
        return UniversalViT(_target_config(args, weights))
    except CheckpointError:
        raise
    except (ValueError, KeyError) as error:  # an impossible config (bad head split, absent key); not assertions: bugs
        raise CheckpointError(f"no target ViT can be built for these weights: {error}", args.file) from error


def _verify(args: argparse.Namespace) -> int:
    from pumit_nnunet.checkpoints.load import load_vit_weights
    from pumit_nnunet.checkpoints.readers import read_weights

    weights = read_weights(args.file)
    vit = _target_vit(args, weights)
    options = _conversion_kwargs(args)
    report = load_vit_weights(vit, weights, log=None, **{**options, "allow_partial": True})
    print(report.summary())
    print(f"target: {vit.config.to_dict()}")
    return 0 if report.complete or options["allow_partial"] else 1


def _attach(args: argparse.Namespace) -> int:
    from pumit_nnunet.nnunet.pretrained import record_pretrained_in_plans

    backup = record_pretrained_in_plans(args.plans_file, args.configuration, args.file, **_conversion_kwargs(args))
    print(f"recorded {args.file} in {args.plans_file} [{args.configuration}] (previous plans kept as {backup})")
    return 0


def _check_model_folder(args: argparse.Namespace) -> int:
    from pumit_nnunet.errors import DataError
    from pumit_nnunet.nnunet.model_folder import check_model_folder

    verdicts = check_model_folder(args.folder)
    for verdict in verdicts:
        print(verdict.line())
    bad = [v for v in verdicts if v.problem is not None]
    if bad:
        more = f" (and {len(bad) - 1} more of {len(verdicts)} checkpoints)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0].problem}{more}; do not predict with this folder", bad[0].path)
    print(f"{len(verdicts)} checkpoints load weights-only and are finite; predict with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 "
          "nnUNetv2_predict ...")
    return 0


def _register_check_model_folder(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-model-folder", help="certify an nnU-Net results folder is safe to predict with",
        description="Checks that every fold_*/checkpoint_*.pth below FOLDER loads with torch.load(weights_only=True) "
        "(pickled code cannot run) and holds finite weights; exit 1 naming the first offending file. Then predict "
        "with `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 nnUNetv2_predict ...`, which refuses files changed since.")
    parser.add_argument("folder", help="nnU-Net results folder (root, dataset or trainer__plans__configuration)")
    parser.set_defaults(func=_check_model_folder)


def register(subparsers: Any) -> None:
    """Add ``weights`` with its nested sub-commands."""
    parser = subparsers.add_parser("weights", help="inspect, convert, verify and attach pre-trained weights",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    nested = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    inspect = nested.add_parser("inspect", help="describe a checkpoint of any supported format")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_inspect)

    convert = nested.add_parser("convert", help="convert a checkpoint into ours for a target ViT")
    convert.add_argument("file")
    convert.add_argument("--out", required=True, help="output checkpoint (refused if it exists, unless --force)")
    convert.add_argument("--force", action="store_true", help="overwrite --out")
    _add_target_options(convert)
    convert.set_defaults(func=_convert)

    verify = nested.add_parser("verify", help="load a checkpoint into a target ViT and print the load report")
    verify.add_argument("file")
    _add_target_options(verify)
    verify.set_defaults(func=_verify)

    attach = nested.add_parser("attach", help="record weights in a plans configuration for nnUNetv2_train")
    attach.add_argument("plans_file")
    attach.add_argument("configuration")
    attach.add_argument("file")
    _add_conversion_options(attach)
    attach.set_defaults(func=_attach)
    _register_check_model_folder(subparsers)
