"""What nnU-Net's default ``torch.compile`` (on for CUDA training) buys a PUMIT training step.

One training step (forward, deep-supervision loss, backward, AdamW) of :class:`PumitSegNet`, eager and through
``torch.compile`` with its default (inductor) backend, as nnU-Net calls it. Prints the compile time (first
compiled step minus an eager step), the steady-state step times and the ratio compiled / eager (< 1 is faster).
The input is random: step time does not depend on the values.

    python benchmarks/bench_compile.py --quick          # CPU: ViT-T, patch 16x64x64, batch 2 (a few minutes)
    python benchmarks/bench_compile.py --quick --cold   # the same, compile time without inductor's disk caches
    python benchmarks/bench_compile.py --device cuda    # ViT-B, BTCV preset patch 48x192x192, batch 2, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

#: (vit, patch, batch, overrides) per mode; the quick mode uses the tests' tiny decoder widths
MODES: dict[str, tuple[str, tuple[int, int, int], int, dict[str, Any]]] = {
    "quick": ("T", (16, 64, 64), 2, {"lateral_channels": [32, 64, 128, 128], "fullres_channels": [16, 32]}),
    "full": ("B", (48, 192, 192), 2, {}),
}


def build(vit: str, patch: tuple[int, int, int], overrides: dict[str, Any], device: torch.device) -> nn.Module:
    from pumit_nnunet.models.segmentation import PumitSegNet

    torch.manual_seed(0)
    return PumitSegNet(1, 2, True, patch_size=list(patch), aniso_d=2, vit=vit, **overrides).to(device)


def make_step(network: nn.Module, model: nn.Module, batch: int, patch: tuple[int, int, int],
              device: torch.device) -> Callable[[], float]:
    """One training step of ``model`` (``network`` or its compiled wrapper); returns its loss."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    data = torch.randn(batch, 1, *patch, device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(data)
            loss = sum(o.float().square().mean() / 2 ** i for i, o in enumerate(outputs))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def timed(step: Callable[[], float], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(mode: str, device: torch.device, repeats: int, cold: bool = False) -> dict[str, Any]:
    """Compile time and median step times; eager and compiled steps alternate so that a change in the machine's
    load (a shared CPU) hits both alike. ``cold``: ignore inductor's on-disk caches (a first run's compile time)."""
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = cold
    vit, patch, batch, overrides = MODES[mode]
    network = build(vit, patch, overrides, device)
    eager = make_step(network, network, batch, patch, device)
    timed(eager, device)  # warm-up (allocator, kernels)
    eager_first = timed(eager, device)
    compiled = make_step(network, torch.compile(network), batch, patch, device)
    first = timed(compiled, device)  # includes tracing and code generation
    timed(compiled, device)
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times.append(timed(eager, device))
        compiled_times.append(timed(compiled, device))
    eager_s, compiled_s = statistics.median(eager_times), statistics.median(compiled_times)
    return {"mode": mode, "device": str(device), "vit": vit, "patch": list(patch), "batch": batch,
            "eager_step_s": eager_s, "compiled_step_s": compiled_s, "ratio_compiled_over_eager": compiled_s / eager_s,
            "compile_s": first - eager_first, "inductor_caches": "disabled" if cold else "used (may be warm)",
            "repeats": repeats, "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, ViT-T, patch 16x64x64")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, cpu with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps each (default 5 quick, 10 full)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--cold", action="store_true", help="ignore inductor's on-disk caches (first-run compile time)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    result = measure("quick" if args.quick else "full", device, args.repeats or (5 if args.quick else 10), args.cold)
    print(f"training step, ViT-{result['vit']} patch {result['patch']} batch {result['batch']} on {result['device']}")
    print(f"  eager     {result['eager_step_s'] * 1e3:9.1f} ms")
    print(f"  compiled  {result['compiled_step_s'] * 1e3:9.1f} ms   ratio compiled/eager {result['ratio_compiled_over_eager']:.3f}")
    print(f"  compile time (first compiled step minus an eager step) {result['compile_s']:.1f} s, inductor caches "
          f"{result['inductor_caches']}")
    if args.json:
        from pumit_nnunet.io import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
