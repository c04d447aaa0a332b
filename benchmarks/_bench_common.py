"""Shared set-up of the segmentation benchmarks (``bench_pumit_vs_nnunet.py``, ``bench_prediction_tta.py``).

Both compare networks built from the SAME nnU-Net plans: one ``3d_fullres`` configuration at the BTCV preset's
spacing (3 x 0.75 x 0.75 mm, aniso_d 2) and a fixed patch. nnU-Net's default network is written into those plans
exactly as its ``ExperimentPlanner.get_plans_for_configuration`` writes it for a given spacing and patch
(``get_pool_and_conv_props`` topology, 32 base features capped at 320, two convs per stage, instance norm,
LeakyReLU); we fix the patch instead of letting the planner's VRAM loop shrink it, so every network sees the
same input. The PUMIT plans are those plans passed through the trainer's own :func:`adapt_configuration`.
The real case is ``Dataset902_RealCTLungNodule/lung1`` (512 x 512 x 48, 0.57 x 0.57 x 5 mm chest CT).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

CASE = ("Dataset902_RealCTLungNodule", "lung1")
SPACING = (3.0, 0.75, 0.75)  # BTCV preset: ratio 4 -> aniso_d 2, token depth 4
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1}, "numTraining": 1,
                "file_ending": ".nii.gz"}
#: (vit, patch, crop of the case in voxels z, y, x or None for the whole case)
MODES = {"full": ("B", (48, 192, 192), None), "quick": ("S", (16, 64, 64), (9, 96, 96))}
#: Primus sizes of nnU-Net's ``primus_trainers.py``: embed dim, depth, heads (patch embedding 8^3)
PRIMUS = {"S": (396, 12, 6), "B": (792, 12, 12), "L": (1056, 24, 16)}


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run uses."""

    vit: str
    patch_size: tuple[int, int, int]
    crop: tuple[int, int, int] | None
    device: torch.device
    repeats: int
    warmup: int
    step: float
    data: Path

    @property
    def autocast(self):
        """bf16 autocast on CUDA (as the trainers), nothing on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small CPU run: ViT-S, patch 16x64x64, cropped case")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (median); default 5, quick 2")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vit", default=None, choices=sorted(PRIMUS), help="ViT size (default B, quick S)")
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window tile step (nnU-Net's default 0.5)")
    parser.add_argument("--data", type=Path, default=None,
                        help="real-demo folder (default: built by pumit_nnunet.data in the data cache)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    vit, patch, crop = MODES["quick" if args.quick else "full"]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = args.repeats or (2 if args.quick else 5)
    return BenchConfig(args.vit or vit, patch, crop, device, repeats, args.warmup, args.step, find_real_demo(args.data))


def setup(argv: Sequence[str] | None, description: str) -> tuple[BenchConfig, dict[str, Any], dict[str, Any]]:
    """Parse the command line; return the run's config, the stock plans and the PUMIT plans derived from them."""
    parser = argparse.ArgumentParser(description=description)
    add_common_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    stock = default_unet_plans(SPACING, config.patch_size)
    return config, stock, pumit_plans(stock, config.vit)


def find_real_demo(path: Path | None) -> Path:
    """``path`` if given, else the real-demo folder that the project's own fetcher builds in its data cache."""
    if path is None:
        from pumit_nnunet.data import cached_real_demo

        return cached_real_demo()
    if not (Path(path) / CASE[0] / "imagesTr" / f"{CASE[1]}_0000.nii.gz").is_file():
        raise SystemExit(f"real demo case {CASE[0]}/imagesTr/{CASE[1]}_0000.nii.gz not found under {path}")
    return Path(path)


# -- plans and networks ----------------------------------------------------------------------------------------
def default_unet_plans(spacing: Sequence[float], patch_size: Sequence[int]) -> dict[str, Any]:
    """Stock nnU-Net plans (one ``3d_fullres`` configuration) with the default planner's network for this
    spacing and patch; CTNormalization with the BTCV window as intensity properties."""
    from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    from pumit_nnunet.nnunet.presets import ct_window_intensity_properties

    _, strides, kernels, patch, _ = get_pool_and_conv_props(list(spacing), list(patch_size), 4, 999999)
    if list(patch) != list(patch_size):
        raise ValueError(f"patch {list(patch_size)} is not valid for nnU-Net's topology (it wants {list(patch)})")
    conv, stages = convert_dim_to_conv_op(3), len(strides)
    norm = get_matching_instancenorm(conv)
    arch = {"n_stages": stages, "features_per_stage": [min(320, 32 * 2**i) for i in range(stages)],
            "conv_op": f"{conv.__module__}.{conv.__name__}", "kernel_sizes": kernels, "strides": strides,
            "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
            "norm_op": f"{norm.__module__}.{norm.__name__}", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    data_fn, data_kw, seg_fn, seg_kw = ExperimentPlanner.determine_resampling(None)  # uses no state
    prob_fn, prob_kw = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch_size), "median_image_size_in_voxels": list(patch_size), "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": data_fn.__name__, "resampling_fn_seg": seg_fn.__name__,
        "resampling_fn_data_kwargs": data_kw, "resampling_fn_seg_kwargs": seg_kw,
        "resampling_fn_probabilities": prob_fn.__name__, "resampling_fn_probabilities_kwargs": prob_kw,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": arch, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    return {"dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp":
            list(spacing), "original_median_shape_after_transp": list(patch_size), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": configuration},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": ct_window_intensity_properties(-175, 250)}}


def pumit_plans(stock: dict[str, Any], vit: str, decoder: str = "authors") -> dict[str, Any]:
    """The stock plans as a PUMIT trainer adapts them (token-aligned patch, PumitSegNet architecture) with the
    decoder preset ``decoder`` (``authors``: the trainers' default; ``lite``: widths capped at 320)."""
    from pumit_nnunet.nnunet.plans import adapt_configuration

    plans = copy.deepcopy(stock)
    adapt_configuration(plans, "3d_fullres", vit, arch_overrides={"decoder": decoder})
    return plans


def managers(plans: dict[str, Any]):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    return manager, manager.get_configuration("3d_fullres")


def network_from_plans(plans: dict[str, Any], deep_supervision: bool) -> nn.Module:
    """The network nnU-Net builds from ``plans`` (as ``nnUNetTrainer.build_network_architecture``)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    manager, configuration = managers(plans)
    heads = manager.get_label_manager(DATASET_JSON).num_segmentation_heads
    return get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                  configuration.network_arch_init_kwargs_req_import, 1, heads, allow_init=True,
                                  deep_supervision=deep_supervision)


def primus(size: str, patch_size: Sequence[int], num_classes: int = 2) -> nn.Module:
    """Primus as nnU-Net's ``nnUNet_Primus_{size}_Trainer`` builds it."""
    from dynamic_network_architectures.architectures.primus import Primus

    embed, depth, heads = PRIMUS[size]
    return Primus(1, embed, (8, 8, 8), num_classes, depth, heads, tuple(patch_size), drop_path_rate=0.2,
                  scale_attn_inner=True, init_values=0.1)


# -- the real case and nnU-Net's predictor ---------------------------------------------------------------------
def load_case(config: BenchConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """The real CT as nnU-Net's SimpleITKIO reads it: ``(1, z, y, x)`` float32 and ``{"spacing": [z, y, x]}``."""
    import SimpleITK as sitk

    from pumit_nnunet.nnunet.demo_data import crop_around_label

    folder = config.data / CASE[0]
    image = sitk.ReadImage(str(folder / "imagesTr" / f"{CASE[1]}_0000.nii.gz"))
    if config.crop is not None:
        image, _ = crop_around_label(image, sitk.ReadImage(str(folder / "labelsTr" / f"{CASE[1]}.nii.gz")), config.crop)
    array = sitk.GetArrayFromImage(image).astype(np.float32)[None]
    return array, {"spacing": list(image.GetSpacing())[::-1]}


def preprocess(plans: dict[str, Any], image: np.ndarray, properties: dict[str, Any]) -> torch.Tensor:
    """The case resampled and normalised by the configuration's preprocessor (what the sliding window sees)."""
    manager, configuration = managers(plans)
    preprocessor = configuration.preprocessor_class(verbose=False)
    data, _, _ = preprocessor.run_case_npy(image, None, copy.deepcopy(properties), manager, configuration, DATASET_JSON)
    return torch.from_numpy(data)


def make_predictor(plans: dict[str, Any], network: nn.Module, config: BenchConfig, mirroring: bool):
    """nnU-Net's own predictor around ``network`` (Gaussian blending, mirroring over all three axes as the
    default trainer allows for 3D)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=config.step, use_gaussian=True, use_mirroring=mirroring,
                                device=config.device, verbose=False, allow_tqdm=False)
    manager, configuration = managers(plans)
    predictor.manual_initialization(network.to(config.device), manager, configuration, [network.state_dict()],
                                    DATASET_JSON, "bench", (0, 1, 2))
    return predictor


# -- timing and reporting --------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_median_seconds(fns: dict[Any, Callable[[], Any]], config: BenchConfig) -> dict[Any, float]:
    """Median wall time of each function over ``config.repeats`` rounds (after ``config.warmup`` untimed calls
    each); every round times all functions in turn, so that a shared machine's load drift hits them alike."""
    for fn in fns.values():
        for _ in range(config.warmup):
            fn()
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(config.repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, config.device))
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(fn: Callable[[], Any], config: BenchConfig) -> float:
    return interleaved_median_seconds({"fn": fn}, config)["fn"]


def describe(config: BenchConfig, pumit_patch: Sequence[int]) -> str:
    where = torch.cuda.get_device_name(config.device) if config.device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads, fp32)"
    case = f"{CASE[0]}/{CASE[1]}" + (f" cropped to {'x'.join(map(str, config.crop))} voxels" if config.crop else "")
    return (f"device: {where}; ViT-{config.vit}; spacing {SPACING} mm; patch nnU-Net {'x'.join(map(str, config.patch_size))}, "
            f"PUMIT {'x'.join(map(str, pumit_patch))}; case {case}; median of {config.repeats} after {config.warmup} warm-up")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
