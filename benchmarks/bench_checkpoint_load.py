"""Start-up cost of pre-trained weights: reading + converting + loading a ViT-B checkpoint (the released Lightning
layout, 16^3 RGB kernel, MIM heads) into a fine-tuning backbone (1 channel, (4, 16, 16) patch, plan token grid),
relative to one training step (forward, backward, AdamW) of the same ViT-B on this machine.

Run: ``python benchmarks/bench_checkpoint_load.py [--quick] [--repeats N]``. Every figure is printed as a ratio
to the training step measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pumit_nnunet.checkpoints.load import load_vit_weights
from pumit_nnunet.checkpoints.readers import read_weights
from pumit_nnunet.checkpoints.samples import released_pumit_checkpoint
from pumit_nnunet.models.vit import UniversalViT, vit_config


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small input for the reference step (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (1, 1, 8, 64, 64) if args.quick else (2, 1, 16, 128, 128)
    grid = (shape[2] // 4, shape[3] // 16, shape[4] // 16)
    target = replace(vit_config("B"), in_channels=1, patch_depth=4, pos_embed_shape=grid)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pumit-b.ckpt"
        torch.save(released_pumit_checkpoint(UniversalViT(replace(vit_config("B"), mask_token=True)).state_dict()), path)
        vit = UniversalViT(target)
        read_s = _median_seconds(lambda: read_weights(path), args.repeats)
        load_s = _median_seconds(lambda: load_vit_weights(vit, path, log=None), args.repeats)
        build_s = _median_seconds(lambda: UniversalViT(target), args.repeats)
        size_mb = path.stat().st_size / 2**20

    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-4)
    x = torch.randn(shape)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        vit(x, 2).float().pow(2).mean().backward()
        optimizer.step()

    step()  # warm-up (allocations, optimizer state)
    step_s = _median_seconds(step, args.repeats)
    print(f"ViT-B checkpoint {size_mb:.0f} MiB; training step input {shape} ({len(x.flatten(2)[0, 0]) // (4 * 256)} tokens)")
    print(f"reference: one ViT-B training step = {step_s:.3f} s (1.00)")
    print(f"read checkpoint / training step             = {read_s / step_s:.3f}")
    print(f"read + convert + load / training step       = {load_s / step_s:.3f}")
    print(f"(building the ViT-B itself / training step  = {build_s / step_s:.3f})")


if __name__ == "__main__":
    main()
