"""Cost of spatial adaptivity in the tokenizer: SAC modules vs the same network of plain convs with pre-reduced kernels.

For each degree of anisotropy the SAC tokenizer is "frozen" into ``nn.Conv3d``/``nn.ConvTranspose3d`` layers whose
kernels, strides and paddings are the ones SAC computes on the fly; both networks give the same output (checked).
Printed figures are ratios SAC / plain measured in the same run (target: < 1.05, i.e. under 5 % extra):

* frozen encode throughput (voxels per second, no grad, encoder + soft tokens): how the tokenizer runs inside
  MIM and in evaluation. SAC serves its reduced, cast kernels from its frozen-kernel cache (``layers/sac.py``),
  so only a dictionary look-up per layer remains (target >= 0.95, i.e. <= 1.05x the time);
* one training step (forward, L1 + regulariser, backward, AdamW step): nothing is cached under autograd.

Reading the 2D / thick-slice train-step rows: SAC sums the depth taps of every full 3D kernel on each call (and its backward
spreads the gradient back over them), and AdamW updates the full 3D kernels, while the plain network holds the
already reduced kernels (a 3x3x3 conv is a 1x3x3 conv at aniso_d 5: a third of the weights). When the activations
are small (2D crops, small batches) these weight-sized, memory-bound passes are a visible share of a CPU step; on
a GPU they cost microseconds. Isotropic input (aniso_d 0) reduces nothing.

    python benchmarks/bench_tokenizer_sac.py --quick      # tiny preset on CPU, under a minute
    python benchmarks/bench_tokenizer_sac.py              # paper preset, 4 x (64 x 128 x 128) crops (GPU advised)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from pumit_nnunet.layers.sac import SpatiallyAdaptiveConv3d, SpatiallyAdaptiveConvTranspose3d, SpatialSequential
from pumit_nnunet.models.tokenizer import AdaptiveTransposedConvUpsample, UniversalTokenizer, tokenizer_config


def _plain_conv(module: SpatiallyAdaptiveConv3d, aniso_d: int, level: int) -> nn.Conv3d:
    weight, stride, padding = module.effective_weight(aniso_d, level)
    conv = nn.Conv3d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride, padding)
    conv.weight.data.copy_(weight.detach())
    conv.bias.data.copy_(module.bias.detach())
    return conv


def _plain_transposed(module: SpatiallyAdaptiveConvTranspose3d, aniso_d: int, level: int) -> nn.ConvTranspose3d:
    weight, stride = module.effective_weight(aniso_d, level)
    conv = nn.ConvTranspose3d(weight.shape[0], weight.shape[1], tuple(weight.shape[2:]), stride)
    conv.weight.data.copy_(weight.detach())
    conv.bias.data.copy_(module.bias.detach())
    return conv


def freeze(module: nn.Module, aniso_d: int, level: int) -> nn.Module:
    """A plain-conv copy of a SAC stack at ``aniso_d`` starting at ``level``."""
    if isinstance(module, SpatiallyAdaptiveConv3d):
        return _plain_conv(module, aniso_d, level)
    if isinstance(module, SpatiallyAdaptiveConvTranspose3d):
        return _plain_transposed(module, aniso_d, level)
    if isinstance(module, AdaptiveTransposedConvUpsample):
        return nn.Sequential(_plain_transposed(module.transposed_conv, aniso_d, level),
                             freeze(module.conv, aniso_d, level + module.level_change))
    if isinstance(module, SpatialSequential):
        layers = []
        for child in module:
            layers.append(freeze(child, aniso_d, level))
            level += getattr(child, "level_change", 0)
        return nn.Sequential(*layers)
    return module  # norms and activations are shared as they are


class PlainTokenizer(nn.Module):
    """The SAC tokenizer frozen at one ``aniso_d``; same call signature."""

    def __init__(self, sac: UniversalTokenizer, aniso_d: int) -> None:
        super().__init__()
        self.encoder = freeze(sac.encoder, aniso_d, 0)
        self.quantize = sac.quantize
        self.decoder = freeze(sac.decoder, aniso_d, sac.latent_level)

    def encode(self, x, aniso_d):
        return self.quantize.logits(self.encoder(x)).float().softmax(-1)

    def forward(self, x, aniso_d):
        z_q, probs, log_probs = self.quantize(self.encoder(x))
        return self.decoder(z_q), probs, log_probs


def _sac_encode(model, x, aniso_d):
    return model.encode_logits(x, aniso_d).float().softmax(-1)


def _sac_forward(model, x, aniso_d):
    out = model(x, aniso_d)
    return out.reconstruction, out.probs, out.log_probs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _compare(fn_a, fn_b, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per call of ``fn_a`` and ``fn_b``, alternated call by call so that load drifts hit both."""
    times: tuple[list[float], list[float]] = ([], [])
    fn_a(), fn_b()  # warm-up (allocations, optimiser state, cuDNN autotuning)
    for _ in range(repeats):
        for fn, bucket in ((fn_a, times[0]), (fn_b, times[1])):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _train_step(forward, params, x, aniso_d):
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        recon, probs, log_probs = forward(x, aniso_d)
        loss = (recon.float() - x).abs().mean() + 0.01 * (probs * log_probs).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(sac: UniversalTokenizer, batch: int, tokens: tuple[int, int], aniso_d: int, repeats: int,
            device: torch.device) -> dict:
    """SAC vs plain at one ``aniso_d``: frozen-encode and train-step seconds (medians), and their outputs' gap."""
    depth = 1 if aniso_d >= 5 else tokens[0] * max(16 >> aniso_d, 1)
    x = torch.rand(batch, 3, depth, tokens[1] * 16, tokens[1] * 16, device=device) * 2 - 1
    plain = PlainTokenizer(sac, aniso_d).to(device)
    with torch.no_grad():  # frozen use: SAC serves its reduced kernels from FrozenKernelCache
        diff = float((plain(x, aniso_d)[0] - sac(x, aniso_d).reconstruction).abs().max())
        enc_sac, enc_plain = _compare(lambda: _sac_encode(sac, x, aniso_d), lambda: plain.encode(x, aniso_d),
                                      repeats, device)
    step_sac, step_plain = _compare(_train_step(lambda a, b: _sac_forward(sac, a, b), sac.parameters(), x, aniso_d),
                                    _train_step(plain, plain.parameters(), x, aniso_d), repeats, device)
    return {"crop": tuple(x.shape[2:]), "voxels": x[:, 0].numel(), "encode_sac_s": enc_sac, "encode_plain_s": enc_plain,
            "step_sac_s": step_sac, "step_plain_s": step_plain, "max_diff": diff}


def bench(preset: str, batch: int, tokens: tuple[int, int], aniso_ds: list[int], repeats: int, device: torch.device):
    torch.manual_seed(0)
    sac = UniversalTokenizer(tokenizer_config(preset)).to(device)
    print(f"preset {preset}, batch {batch}, {tokens[0]} x {tokens[1]}^2 tokens, device {device}, {repeats} repeats")
    print(f"{'aniso_d':>7} {'crop':>14} {'frozen encode vox/s SAC/plain':>31} {'train step time SAC/plain':>27} "
          f"{'max |diff|':>10}")
    for aniso_d in aniso_ds:
        r = measure(sac, batch, tokens, aniso_d, repeats, device)
        crop = "x".join(str(s) for s in r["crop"])
        enc_ratio = r["encode_plain_s"] / r["encode_sac_s"]  # (voxels / t_sac) / (voxels / t_plain)
        print(f"{aniso_d:>7} {crop:>14} {enc_ratio:>31.3f} {r['step_sac_s'] / r['step_plain_s']:>27.3f} "
              f"{r['max_diff']:>10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, small crops, CPU-friendly")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        torch.set_num_threads(1)  # one thread: far less timing noise on a shared CPU
        bench("tiny", 2, (2, 2), [0, 2, 5], repeats=15, device=device)
    else:
        bench("base", 4, (4, 8), [0, 1, 2, 3, 4, 5], repeats=10, device=device)


if __name__ == "__main__":
    main()
