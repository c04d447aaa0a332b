"""MIM step of the universal ViT-B vs timm's EVA-02-B forward+backward at the same token count.

Figures (each printed as a ratio against a reference measured in the same run):

* ViT-B MIM forward+backward (masked forward, head, soft-label loss, backward) / timm ``eva02_base_patch14_224``
  forward+backward with the image size set to give the same number of tokens (20 x 25 = 500 = 5 x 10 x 10);
  time and peak memory (target time ratio <= 1.05);
* the tokenizer's share of the full MIM step (tokenizer targets + forward/backward + clipping + AdamW);
* tokens per second of the full step, and model FLOPs utilisation on CUDA.

Each workload runs in its own process, so peak memory is not blurred by the other (CUDA: peak allocated bytes
above what was allocated before the step; CPU: peak resident set size above the resident size before the step,
Linux only). Run ``python benchmarks/bench_mim_step.py`` (ViT-B, batch 8, 5x10x10 tokens) or ``--quick`` for a
small CPU run. No weights are downloaded: every model is randomly initialised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: dense bf16 peak FLOP/s used for MFU, by GPU name fragment (override with --peak-tflops)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
TOKEN_GRID = (5, 10, 10)
TIMM_IMAGE = (20 * 14, 25 * 14)  # 500 tokens of 14 x 14
#: timm's EVA-02 of the same width, depth and heads as our preset (our T has no timm twin)
TIMM_NAMES = {"S": "eva02_small_patch14_224", "B": "eva02_base_patch14_224", "L": "eva02_large_patch14_224"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the level at ``reset()``: CUDA allocator stats, or Linux VmHWM for the CPU."""

    def __init__(self, device) -> None:
        self.device, self.base = device, 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/clear_refs").exists():
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
            self.base = self._status("VmRSS:")

    def peak(self) -> float:
        import torch

        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device) - self.base)
        return float(self._status("VmHWM:") - self.base) if self.base else float("nan")


def _time(fn, device, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds per call, and the peak memory of the timed calls."""
    memory = PeakMemory(device)
    memory.reset()  # the CPU's peak RSS counts from here: pages freed after the warm-up stay resident
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":  # the allocator's peak is exact: count the timed calls only
        memory.reset()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), memory.peak()


def _mim_trainer(args, device, workdir: str):
    """A real MIMTrainer (the exact training step) on ViT-B with a randomly initialised base tokenizer."""
    from pumit_nnunet.checkpoints.format import save_pumit_checkpoint
    from pumit_nnunet.models.tokenizer import UniversalTokenizer, tokenizer_config
    from pumit_nnunet.pretrain.distributed import DistInfo
    from pumit_nnunet.pretrain.mim_trainer import MIMTrainConfig, MIMTrainer

    config = tokenizer_config(getattr(args, "tokenizer", "base"))
    path = os.path.join(workdir, "tokenizer.pth")
    save_pumit_checkpoint(path, kind="tokenizer", state_dict=UniversalTokenizer(config).state_dict(),
                          architecture=config.to_dict())
    run = MIMTrainConfig(data=workdir, out=workdir, tokenizer=path, vit=args.vit, steps=10**6, warmup_steps=0,
                         batch_size=args.batch, precision=args.precision, device=str(device))
    return MIMTrainer(run, DistInfo(0, 1, 0, device), loader=[])


def _forward_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def run_mim(args, device) -> dict:
    import torch

    from pumit_nnunet.models.mim import mim_inputs, random_token_mask
    from pumit_nnunet.pretrain.precision import autocast_context

    with tempfile.TemporaryDirectory() as workdir:
        trainer = _mim_trainer(args, device, workdir)
    model, aniso_d = trainer.model, 0
    image = torch.rand(args.batch, 1, *(t * 16 for t in TOKEN_GRID), device=device)
    vit_in, tokenizer_in = mim_inputs(image)
    target = trainer.targets(tokenizer_in, aniso_d)
    mask = random_token_mask(args.batch, target.shape[1], generator=torch.Generator().manual_seed(0)).to(device)

    def forward_loss():
        with autocast_context(device, args.precision):
            logits = model(vit_in, aniso_d, mask)
        return model.objective(logits, target, mask).loss

    def forward_backward():
        model.zero_grad(set_to_none=True)
        forward_loss().backward()

    tokenizer_s, _ = _time(lambda: trainer.targets(tokenizer_in, aniso_d), device, args.warmup, args.iters)
    fwd_bwd_s, fwd_bwd_mem = _time(forward_backward, device, args.warmup, args.iters)
    step_s, step_mem = _time(lambda: trainer.train_step(image, aniso_d), device, args.warmup, args.iters)
    flops = 3 * _forward_flops(forward_loss)  # backward ~ 2x forward
    return {"tokenizer_s": tokenizer_s, "fwd_bwd_s": fwd_bwd_s, "fwd_bwd_mem": fwd_bwd_mem, "step_s": step_s,
            "step_mem": step_mem, "model_flops": flops, "tokens": args.batch * target.shape[1]}


def run_timm(args, device) -> dict:
    import timm
    import torch

    from pumit_nnunet.pretrain.precision import autocast_context

    name = TIMM_NAMES[args.vit]
    model = timm.create_model(name, pretrained=False, img_size=TIMM_IMAGE, num_classes=0).to(device).train()
    image = torch.rand(args.batch, 3, *TIMM_IMAGE, device=device)

    def forward_loss():
        with autocast_context(device, args.precision):
            features = model.forward_features(image)
        return features.float().square().mean()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        forward_loss().backward()

    fwd_bwd_s, fwd_bwd_mem = _time(forward_backward, device, args.warmup, args.iters)
    return {"fwd_bwd_s": fwd_bwd_s, "fwd_bwd_mem": fwd_bwd_mem, "model_flops": 3 * _forward_flops(forward_loss),
            "tokens": args.batch * (TIMM_IMAGE[0] // 14) * (TIMM_IMAGE[1] // 14)}


def _child(args) -> None:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    result = run_mim(args, device) if args.only == "mim" else run_timm(args, device)
    threads = torch.get_num_threads()
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} threads)"
    print("RESULT " + json.dumps(result))


def _spawn(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--only", which, "--vit", args.vit, "--batch", str(args.batch), "--warmup",
           str(args.warmup), "--iters", str(args.iters), "--precision", args.precision, "--tokenizer", args.tokenizer]
    if args.device:
        cmd += ["--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, encoding="utf-8", errors="replace").stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def _peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in device_name), None)


def report(args, ours: dict, ref: dict) -> None:
    mb = 2.0**20
    print(f"device: {ours['device']}; ViT-{args.vit}, batch {args.batch}, tokens {'x'.join(map(str, TOKEN_GRID))}, "
          f"precision {args.precision if 'cpu' not in ours['device'] else 'fp32 (CPU)'}")
    print(f"reference: timm EVA-02-{args.vit} forward+backward at {TIMM_IMAGE} = {ref['tokens'] // args.batch} "
          f"tokens: {ref['fwd_bwd_s'] * 1e3:.1f} ms, peak +{ref['fwd_bwd_mem'] / mb:.0f} MiB")
    time_ratio, memory_ratio = ours["fwd_bwd_s"] / ref["fwd_bwd_s"], ours["fwd_bwd_mem"] / ref["fwd_bwd_mem"]
    print(f"MIM forward+backward / timm EVA-02 forward+backward, time:   {time_ratio:.3f} "
          f"(target <= 1.05; {ours['fwd_bwd_s'] * 1e3:.1f} ms)")
    print(f"MIM forward+backward / timm EVA-02 forward+backward, memory: {memory_ratio:.3f} "
          f"(+{ours['fwd_bwd_mem'] / mb:.0f} MiB)")
    print(f"MIM forward+backward FLOPs / timm FLOPs: {ours['model_flops'] / ref['model_flops']:.3f} "
          "(the 16^3 x 3-channel patch embedding and the MIM head are the extra work)")
    print(f"full MIM step / timm forward+backward: {ours['step_s'] / ref['fwd_bwd_s']:.3f} "
          f"({ours['step_s'] * 1e3:.1f} ms, peak +{ours['step_mem'] / mb:.0f} MiB)")
    print(f"tokenizer share of the full MIM step: {ours['tokenizer_s'] / ours['step_s']:.3f} "
          f"({ours['tokenizer_s'] * 1e3:.1f} ms)")
    ours_tps, ref_tps = ours["tokens"] / ours["step_s"], ref["tokens"] / ref["fwd_bwd_s"]
    print(f"tokens/s, full MIM step: {ours_tps:.0f}; ratio to timm forward+backward tokens/s: {ours_tps / ref_tps:.3f}")
    peak = _peak_flops(ours["device"], args.peak_tflops)
    if "cpu" in ours["device"] or peak is None:
        print("MFU: n/a (CUDA with a known or given --peak-tflops only)")
    else:
        mfu, ref_mfu = ours["model_flops"] / ours["fwd_bwd_s"] / peak, ref["model_flops"] / ref["fwd_bwd_s"] / peak
        print(f"MFU of the MIM forward+backward: {mfu:.3f} (timm EVA-02: {ref_mfu:.3f}, ratio {mfu / ref_mfu:.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run: batch 1, 1 warm-up, 2 timed steps")
    parser.add_argument("--vit", default="B", choices=sorted(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokenizer", default="base", help="tokenizer preset of the MIM targets (base: the paper's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU")
    parser.add_argument("--only", choices=("mim", "timm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.warmup, args.iters = 1, 1, 2
    if args.only:
        _child(args)
        return 0
    report(args, _spawn(args, "mim"), _spawn(args, "timm"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
