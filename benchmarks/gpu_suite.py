"""One short GPU run that measures every performance figure of the project, printed as one table and written as JSON.

Each row is a ratio against a reference measured in the same run (same process, same device, same inputs):

* ``seg``: one nnU-Net training step (forward, Dice + CE with deep supervision where the network has it,
  backward, gradient clipping 1.0, AdamW) of PumitTrainer's network (ViT-B, the BTCV preset patch 48x192x192 at
  3 x 0.75 x 0.75 mm, aniso_d 2), eager and through ``torch.compile`` (nnU-Net's default on CUDA), against
  nnU-Net's default network (reference), nnU-Net's ResEnc-M and Primus-B (``dynamic_network_architectures``)
  at the same patch and batch; time (median) and peak memory (``torch.cuda.max_memory_allocated`` above what
  was allocated before the network was built; on the CPU the counted saved-for-backward + parameter, gradient
  and AdamW bytes of :mod:`pumit_nnunet.nnunet.memory_count`). The compiled row also gives the compile time
  (first compiled step minus a steady one).
* ``memory``: the memory model (:mod:`pumit_nnunet.nnunet.memory`) against the measured PUMIT step: its counted
  part (``training_memory_bytes``) and its peak estimate with the CUDA overheads (``peak_memory_bytes``).
* ``mim``: a real ``MIMTrainer`` step of the universal ViT-B against timm's ``eva02_base_patch14_224`` forward +
  backward at the same token count (500 tokens, batch 8), time, FLOPs and model FLOP utilisation (MFU).
  FLOPs = 3 x the forward FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls, convs,
  attention; backward taken as twice the forward). MFU = FLOPs / seconds / the device's dense bf16 peak
  (:data:`PEAK_TFLOPS` by device name, or ``--peak-tflops``).
* ``tokenizer``: tokenizer training throughput (voxels per second of forward, loss, backward and AdamW on the
  paper's tokenizer) and frozen encoding (as inside MIM), SAC against the same network of plain convs with
  pre-reduced kernels, isotropic (aniso_d 0) and 2D (aniso_d 5).
* ``predict``: nnU-Net's sliding window (``nnUNetPredictor``, Gaussian blending, tile step 0.5) over one real
  CT (``Dataset902_RealCTLungNodule/lung1`` of :func:`pumit_nnunet.data.cached_real_demo`, preprocessed once by
  the plans' preprocessor), PUMIT against nnU-Net's default network, without and with 8-flip mirroring (TTA).

All networks are randomly initialised (time does not depend on the values); nothing is downloaded at run time.
The real case comes from the project's data cache: on an offline GPU machine point ``PUMIT_DATA_CACHE`` at a
copy of this machine's cache (``pumit-nnunet data fetch`` fills it) or pass ``--data REAL_DEMO_FOLDER``.

    python benchmarks/gpu_suite.py                        # CUDA, bf16 autocast, about 5-8 minutes on one GPU
    python benchmarks/gpu_suite.py --quick                # the same code on the CPU at tiny sizes (< 3 min idle)
    python benchmarks/gpu_suite.py --sections seg,memory  # a subset; --json PATH (default gpu_suite.json)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
import bench_mim_step as mim_bench  # noqa: E402
import bench_tokenizer_sac as sac_bench  # noqa: E402

#: dense bf16 peak TFLOP/s by device-name fragment (first match wins; override with --peak-tflops)
PEAK_TFLOPS = mim_bench.PEAK_TFLOPS
SECTIONS = ("seg", "memory", "mim", "tokenizer", "predict")
MIB = 2.0**20


@dataclass(frozen=True)
class SuiteSize:
    """The sizes of one suite mode (``full`` on a GPU, ``quick`` on the CPU)."""

    vit: str
    patch: tuple[int, int, int]
    batch: int
    seg_overrides: dict[str, Any]
    primus: str
    mim_vit: str
    mim_batch: int
    mim_tokenizer: str
    tokenizer: tuple[str, int, tuple[int, int]]  # preset, batch, (depth tokens, in-plane tokens)
    crop: tuple[int, int, int] | None
    warmup: int
    repeats: int
    predict_repeats: int
    compile_backend: str = "inductor"


SIZES = {
    "full": SuiteSize("B", (48, 192, 192), 2, {}, "B", "B", 8, "base", ("base", 4, (4, 8)), None, 3, 10, 3),
    # the quick mode uses the tests' tiny decoder widths, ViT-T and Primus-S so that every row runs in seconds;
    # it compiles with dynamo + AOTAutograd but without inductor's code generation (minutes of C++ on a CPU)
    "quick": SuiteSize("T", (16, 32, 32), 2, {"lateral_channels": [32, 64, 128, 128], "fullres_channels": [16, 32]},
                       "S", "S", 1, "tiny", ("tiny", 2, (2, 2)), (9, 96, 96), 1, 2, 1, "aot_eager"),
}


@dataclass
class Row:
    """One line of the table: ``value`` of ``name`` and its ratio to ``reference`` measured in the same run."""

    section: str
    name: str
    value: float
    unit: str
    reference: str
    ratio: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- seg: training steps ---------------------------------------------------------------------------------------
def seg_plans(size: SuiteSize) -> tuple[dict, dict]:
    """nnU-Net's default plans at the BTCV spacing and the suite's patch, and the PUMIT plans derived from them."""
    from pumit_nnunet.nnunet.plans import adapt_configuration

    stock = common.default_unet_plans(common.SPACING, size.patch)
    ours = copy.deepcopy(stock)
    adapt_configuration(ours, "3d_fullres", size.vit, arch_overrides=size.seg_overrides)
    return stock, ours


def resenc_m(stock: dict) -> nn.Module:
    """nnU-Net's ResEnc-M network for the same topology (``nnUNetPlannerResEncM``: residual encoder blocks
    (1, 3, 4, 6, 6, 6, ...) per stage, one conv per decoder stage, the default planner's features)."""
    plans = copy.deepcopy(stock)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    kwargs = arch["arch_kwargs"]
    stages = kwargs["n_stages"]
    kwargs.pop("n_conv_per_stage")
    kwargs["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6, 6, 6, 6, 6][:stages]
    kwargs["n_conv_per_stage_decoder"] = [1] * (stages - 1)
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    return common.network_from_plans(plans, True)


def plans_patch(plans: dict) -> tuple[int, ...]:
    return tuple(plans["configurations"]["3d_fullres"]["patch_size"])


def seg_builders(size: SuiteSize, stock: dict, ours: dict) -> dict[str, tuple[Callable[[], nn.Module], bool, tuple]]:
    """Name -> (builder, compile, patch); the first entry is the reference. PUMIT trains on its plans' token-aligned
    patch (the suite's patches are token-aligned already, so every network sees the same input)."""
    patch = plans_patch(ours)
    return {
        "nnU-Net default": (lambda: common.network_from_plans(stock, True), False, size.patch),
        f"PUMIT ViT-{size.vit}": (lambda: common.network_from_plans(ours, True), False, patch),
        f"PUMIT ViT-{size.vit} compiled": (lambda: common.network_from_plans(ours, True), True, patch),
        "nnU-Net ResEnc-M": (lambda: resenc_m(stock), False, size.patch),
        f"Primus-{size.primus}": (lambda: common.primus(size.primus, size.patch), False, size.patch),
    }


class SegStep:
    """One nnU-Net-style training step of ``network`` (called through ``model``: itself or its compiled form)."""

    def __init__(self, network: nn.Module, model: nn.Module, x: torch.Tensor, autocast) -> None:
        from pumit_nnunet.nnunet.memory_count import nnunet_default_loss
        from pumit_nnunet.optim import build_adamw

        self.network, self.model, self.x, self.autocast = network, model, x, autocast
        self.optimizer = build_adamw(network, 1e-4, 0.05)
        with torch.no_grad():  # the eager network, so that a compiled model compiles the training graph only
            outputs = network(x)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        generator = torch.Generator().manual_seed(0)
        self.targets = [torch.randint(0, o.shape[1], (o.shape[0], 1, *o.shape[2:]), generator=generator).to(x.device)
                        for o in outputs]
        self.loss = nnunet_default_loss(len(outputs))

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            outputs = self.model(self.x)
            loss = self.loss(outputs, self.targets) if len(self.targets) > 1 else self.loss(outputs, self.targets[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()


def _counted_memory(step: SegStep) -> float:
    """CPU stand-in for the peak: saved-for-backward + parameter/gradient/AdamW bytes (as the memory model)."""
    from pumit_nnunet.nnunet.memory_count import forward_loss, saved_tensor_bytes, training_state_bytes

    saved = saved_tensor_bytes(forward_loss(step.network, step.x), exclude=list(step.network.parameters()))
    return float(saved + training_state_bytes(step.network, step.optimizer))


def measure_seg(build: Callable[[], nn.Module], compiled: bool, patch: Sequence[int], size: SuiteSize,
                config: common.BenchConfig) -> dict:
    """Median step seconds, peak memory bytes (CUDA) or counted bytes (CPU eager), parameters, compile seconds."""
    device, cuda = config.device, config.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    network = build().to(device).train()
    model = torch.compile(network, backend=size.compile_backend) if compiled else network
    step = SegStep(network, model, torch.randn(size.batch, 1, *patch, device=device), config.autocast)
    first = common.median_seconds(step, replace(config, repeats=1, warmup=0))
    seconds = common.median_seconds(step, replace(config, warmup=config.warmup - 1))
    result = {"s": seconds, "params": sum(p.numel() for p in network.parameters()), "compile_s": first - seconds}
    if cuda:
        result["memory"] = float(torch.cuda.max_memory_allocated(device) - base)
    elif not compiled:  # autograd's saved-tensor hooks see the eager graph only
        result["memory"] = _counted_memory(step)
    return result


def seg_rows(size: SuiteSize, config: common.BenchConfig, results: dict) -> list[Row]:
    stock, ours = seg_plans(size)
    measured = {name: measure_seg(build, compiled, patch, size, config)
                for name, (build, compiled, patch) in seg_builders(size, stock, ours).items()}
    results["seg"] = measured
    reference = next(iter(measured))
    ref = measured[reference]
    rows = []
    for name, r in measured.items():
        compiled = f"; {size.compile_backend}, compile {r['compile_s']:.1f} s" if "compiled" in name else ""
        note = f"{r['params'] / 1e6:.1f} M params{compiled}"
        rows.append(Row("seg", f"train step time: {name}", r["s"] * 1e3, "ms", reference, r["s"] / ref["s"], note))
        if "memory" in r:
            rows.append(Row("seg", f"train memory: {name}", r["memory"] / MIB, "MiB", reference,
                            r["memory"] / ref["memory"], "peak allocated" if config.device.type == "cuda" else "counted"))
    return rows


# -- memory: the model against the measured step ---------------------------------------------------------------
def memory_rows(size: SuiteSize, config: common.BenchConfig, results: dict) -> list[Row]:
    from pumit_nnunet.nnunet import memory
    from pumit_nnunet.nnunet.planner import network_shape

    _, ours = seg_plans(size)
    arch = ours["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    name = f"PUMIT ViT-{size.vit}"
    measured = results.get("seg", {}).get(name) or measure_seg(
        lambda: common.network_from_plans(ours, True), False, plans_patch(ours), size, config)
    shape = network_shape(size.vit, 1, len(common.DATASET_JSON["labels"]), arch["aniso_d"], 3, size.seg_overrides)
    cuda = config.device.type == "cuda"
    precision = memory.BF16_AUTOCAST if cuda else memory.FP32
    counted = memory.training_memory_bytes(arch["patch_size"], size.batch, arch["aniso_d"], shape, precision)
    peak = memory.peak_memory_bytes(arch["patch_size"], size.batch, arch["aniso_d"], shape, precision)
    reference = f"measured {name} ({'peak allocated' if cuda else 'counted'})"
    return [Row("memory", "memory model: training_memory_bytes", counted / MIB, "MiB", reference,
                counted / measured["memory"], "saved for backward + params/grads/AdamW"),
            Row("memory", "memory model: peak_memory_bytes", peak / MIB, "MiB", reference, peak / measured["memory"],
                "incl. CUDA context/workspace/slack" + ("" if cuda else " (no CPU counterpart)"))]


# -- mim: against timm's EVA-02 --------------------------------------------------------------------------------
def _mim_args(size: SuiteSize, config: common.BenchConfig, peak_tflops: float | None) -> argparse.Namespace:
    precision = "bf16" if config.device.type == "cuda" else "fp32"
    return argparse.Namespace(vit=size.mim_vit, batch=size.mim_batch, warmup=config.warmup, iters=config.repeats,
                              precision=precision, tokenizer=size.mim_tokenizer, peak_tflops=peak_tflops)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def mim_rows(size: SuiteSize, config: common.BenchConfig, results: dict, peak_tflops: float | None) -> list[Row]:
    args = _mim_args(size, config, peak_tflops)
    torch.manual_seed(0)
    ours = mim_bench.run_mim(args, config.device)
    ref = mim_bench.run_timm(args, config.device)
    results["mim"] = {"ours": ours, "timm": ref}
    reference = f"timm EVA-02-{size.mim_vit} fwd+bwd, {ref['tokens'] // size.mim_batch} tokens"
    rows = [Row("mim", "MIM fwd+bwd time", ours["fwd_bwd_s"] * 1e3, "ms", reference, ours["fwd_bwd_s"] / ref["fwd_bwd_s"]),
            Row("mim", "MIM fwd+bwd FLOPs", ours["model_flops"] / 1e9, "GFLOP", reference,
                ours["model_flops"] / ref["model_flops"], "3 x forward FlopCounterMode"),
            Row("mim", "full MIM step tokens/s", ours["tokens"] / ours["step_s"], "tokens/s", reference,
                (ours["tokens"] / ours["step_s"]) / (ref["tokens"] / ref["fwd_bwd_s"]), "incl. tokenizer targets, AdamW")]
    peak = mim_bench._peak_flops(device_name(config.device), peak_tflops)
    if config.device.type == "cuda" and peak:
        mfu, ref_mfu = (r["model_flops"] / r["fwd_bwd_s"] / peak for r in (ours, ref))
        rows.append(Row("mim", "MIM fwd+bwd MFU", mfu, "fraction", reference, mfu / ref_mfu,
                        f"peak {peak / 1e12:.0f} TFLOP/s bf16; timm MFU {ref_mfu:.3f}"))
    else:
        rows.append(Row("mim", "MIM fwd+bwd MFU", math.nan, "fraction", reference, math.nan,
                        "CUDA with a known or given --peak-tflops only"))
    return rows


# -- tokenizer: SAC against plain convs ------------------------------------------------------------------------
def tokenizer_rows(size: SuiteSize, config: common.BenchConfig, results: dict) -> list[Row]:
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config

    preset, batch, tokens = size.tokenizer
    torch.manual_seed(0)
    sac = UniversalTokenizer(tokenizer_config(preset)).to(config.device)
    rows, reference = [], "the same tokenizer in plain convs, pre-reduced kernels"
    for aniso_d in (0, 5):
        r = sac_bench.measure(sac, batch, tokens, aniso_d, max(config.repeats, 15), config.device)
        results.setdefault("tokenizer", {})[aniso_d] = r
        crop = "x".join(map(str, r["crop"]))
        rows.append(Row("tokenizer", f"train throughput, aniso_d {aniso_d}", r["voxels"] / r["step_sac_s"], "voxel/s",
                        reference, r["step_plain_s"] / r["step_sac_s"], f"{preset}, {batch} x {crop}"))
        rows.append(Row("tokenizer", f"frozen encode, aniso_d {aniso_d}", r["voxels"] / r["encode_sac_s"], "voxel/s",
                        reference, r["encode_plain_s"] / r["encode_sac_s"], "frozen-kernel cache"))
    return rows


# -- predict: sliding window on a real case --------------------------------------------------------------------
def prediction_calls(plans: dict, data: torch.Tensor, config: common.BenchConfig) -> dict[bool, Callable[[], Any]]:
    torch.manual_seed(0)
    network = common.network_from_plans(plans, False)
    predictors = {tta: common.make_predictor(plans, network, config, tta) for tta in (False, True)}
    return {tta: (lambda p=p: p.predict_logits_from_preprocessed_data(data)) for tta, p in predictors.items()}


def predict_rows(size: SuiteSize, config: common.BenchConfig, results: dict) -> list[Row]:
    stock, ours = seg_plans(size)
    image, properties = common.load_case(config)
    networks = {f"PUMIT ViT-{size.vit}": ours, "nnU-Net default": stock}
    calls = {(name, tta): fn for name, plans in networks.items()
             for tta, fn in prediction_calls(plans, common.preprocess(plans, image, properties), config).items()}
    seconds = common.interleaved_median_seconds(calls, replace(config, repeats=size.predict_repeats))
    results["predict"] = {f"{name} tta={tta}": s for (name, tta), s in seconds.items()}
    ours_name, ref_name = networks
    case = f"{common.CASE[1]} {'x'.join(map(str, image.shape[1:]))}"
    return [Row("predict", f"sliding window, {label}: {ours_name}", seconds[ours_name, tta], "s/case",
                f"{ref_name}, {label}", seconds[ours_name, tta] / seconds[ref_name, tta], case)
            for tta, label in ((False, "no TTA"), (True, "8-flip TTA"))]



# -- the run ---------------------------------------------------------------------------------------------------
def run_sections(sections: Sequence[str], size: SuiteSize, config: common.BenchConfig,
                 peak_tflops: float | None) -> tuple[list[Row], dict]:
    """Run the sections in order; returns the table's rows and the raw measurements."""
    results: dict[str, Any] = {}
    runners = {"seg": seg_rows, "memory": memory_rows, "tokenizer": tokenizer_rows, "predict": predict_rows,
               "mim": lambda s, c, r: mim_rows(s, c, r, peak_tflops)}
    rows: list[Row] = []
    for section in sections:
        start = time.perf_counter()
        new_rows = runners[section](size, config, results)
        rows += new_rows
        results.setdefault("section_seconds", {})[section] = time.perf_counter() - start
        print(f"[{section}: {results['section_seconds'][section]:.0f} s]", flush=True)
        print_rows(new_rows)  # as soon as a section ends: a run cut short still shows what it measured
        sys.stdout.flush()
    return rows, results


def print_rows(rows: Sequence[Row]) -> None:
    common.print_table(["section", "row", "value", "unit", "ratio", "reference (same run)", "note"],
                       [(r.section, r.name, _fmt(r.value), r.unit, _fmt(r.ratio), r.reference, r.note) for r in rows])


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the same code on the CPU at tiny sizes (< 3 min idle)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak for MFU")
    parser.add_argument("--data", type=Path, default=None, help="real-demo folder (default: the project's data cache)")
    parser.add_argument("--json", type=Path, default=Path("gpu_suite.json"), help="where to write the results")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return args


def make_config(args: argparse.Namespace, size: SuiteSize, sections: Sequence[str]) -> common.BenchConfig:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = common.find_real_demo(args.data) if "predict" in sections else Path(".")
    return common.BenchConfig(size.vit, size.patch, size.crop, device, size.repeats, size.warmup, 0.5, data)


def main(argv: Sequence[str] | None = None) -> int:
    from pumit_nnunet.io import write_json_atomic

    args = parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    config = make_config(args, size, sections)
    if config.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer and predictor
    start = time.perf_counter()
    print(f"gpu_suite ({'quick' if args.quick else 'full'}): {device_name(config.device)}; {size}", flush=True)
    rows, results = run_sections(sections, size, config, args.peak_tflops)
    print_rows(rows)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s; JSON: {args.json}")
    write_json_atomic(args.json, {"mode": "quick" if args.quick else "full", "device": device_name(config.device),
                                  "size": asdict(size), "total_s": total, "rows": [asdict(r) for r in rows],
                                  "raw": results}, allow_nan=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
