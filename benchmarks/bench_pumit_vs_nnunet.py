"""PumitTrainer's network (the authors' decoder widths and the "lite" decoder) vs nnU-Net's default network (same
plans) and Primus (same patch): training step and sliding-window prediction, printed as ratios measured in the
same run.

* Training step (timed interleaved: every round runs each network once) = forward + nnU-Net's loss (Dice + CE, wrapped in its deep-supervision weighting where the
  network has deep supervision) + backward + gradient clipping 1.0 + AdamW step (``build_adamw``, for every
  network), batch 2 of random input. Memory: on CUDA the peak allocated bytes above what was allocated before
  the network was built (``torch.cuda.max_memory_allocated``: parameters, gradients, AdamW state, activations,
  workspace); on the CPU the bytes of the unique storages that autograd saves for backward in one forward + loss
  (``saved_tensors_hooks``, parameters excluded) PLUS parameter + gradient + AdamW-state bytes, counted by
  :mod:`pumit_nnunet.nnunet.memory_count` (what the memory model is validated against).
* Decoders: ``authors`` (the PUMIT code's widths, 512 channels at 1/16 and 1/32; the default) and ``lite``
  (nnU-Net's widths capped at 320, ``PumitTrainer_lite``); time, memory and parameter ratios of both against
  nnU-Net's default network are printed.
* Prediction = nnU-Net's ``nnUNetPredictor`` (set up with ``manual_initialization``) running its sliding window
  (Gaussian blending, no mirroring) on the real CT ``lung1`` preprocessed once with the plans' preprocessor;
  PUMIT vs nnU-Net's default network only.

Default: ViT-B, patch 48x192x192 at aniso_d 2 (12x12x12 tokens), CUDA with bf16 autocast when available.
``--quick``: ViT-S (vs Primus-S), patch 16x64x64, the case cropped; a few CPU minutes.
Run: ``python benchmarks/bench_pumit_vs_nnunet.py [--quick] [--device cpu] [--repeats N]``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

from pumit_nnunet.nnunet.memory_count import nnunet_default_loss, saved_tensor_bytes, training_state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402

REFERENCE = "nnU-Net default"


class TrainStep:
    """One training step of ``network`` on a fixed random batch; targets match every output's size."""

    def __init__(self, network: nn.Module, config: common.BenchConfig, batch: int = 2) -> None:
        from pumit_nnunet.optim import build_adamw

        torch.manual_seed(0)
        self.network, self.config = network.to(config.device).train(), config
        self.optimizer = build_adamw(self.network, 1e-4, 0.05)
        self.x = torch.randn(batch, 1, *config.patch_size, device=config.device)
        with torch.no_grad():
            outputs = self.network(self.x)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        self.targets = [torch.randint(0, o.shape[1], (o.shape[0], 1, *o.shape[2:]), device=config.device) for o in outputs]
        self.loss = nnunet_default_loss(len(outputs))

    def loss_value(self) -> torch.Tensor:
        with self.config.autocast:
            outputs = self.network(self.x)
        return self.loss(outputs, self.targets) if len(self.targets) > 1 else self.loss(outputs, self.targets[0])

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_value().backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.optimizer.step()

    def state_bytes(self) -> int:
        """Parameters + gradients + AdamW state (after at least one step)."""
        return training_state_bytes(self.network, self.optimizer)

    def saved_for_backward_bytes(self) -> int:
        """Bytes of the unique non-parameter storages autograd saves in one forward + loss."""
        return saved_tensor_bytes(self.loss_value, exclude=self.network.parameters())


def measure_memory(build, config: common.BenchConfig) -> dict:
    """Parameter count and memory bytes of one network (as described in the module docstring), built alone so
    that the CUDA peak is its own; the step runs once first (AdamW allocates its state there)."""
    cuda = config.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(config.device)
        torch.cuda.reset_peak_memory_stats(config.device)
    step = TrainStep(build(), config)
    step()
    result = {"params": sum(p.numel() for p in step.network.parameters())}
    if cuda:
        result["memory"] = float(torch.cuda.max_memory_allocated(config.device) - base)
    else:
        result["saved"], result["state"] = float(step.saved_for_backward_bytes()), float(step.state_bytes())
        result["memory"] = result["saved"] + result["state"]
    return result


def measure_training(builds: dict, config: common.BenchConfig) -> dict:
    """Memory of each network alone, then median step seconds with the networks timed in turn (interleaved, so
    that a shared machine's load drift hits them alike)."""
    train = {name: measure_memory(build, config) for name, build in builds.items()}
    steps = {name: TrainStep(build(), config) for name, build in builds.items()}
    for name, seconds in common.interleaved_median_seconds(steps, config).items():
        train[name]["s"] = seconds
    return train


def print_training(train: dict, predict: dict, cuda: bool) -> None:
    mib = 2.0**20
    headers = ["network", "params (M)", "train step (ms)"]
    headers += ["peak CUDA memory (MiB)"] if cuda else ["saved for backward (MiB)", "params+grads+AdamW (MiB)", "sum (MiB)"]
    rows = []
    for name, r in train.items():
        memory = [r["memory"] / mib] if cuda else [r["saved"] / mib, r["state"] / mib, r["memory"] / mib]
        rows.append([name, f"{r['params'] / 1e6:.1f}", r["s"] * 1e3, *memory, predict.get(name, "-")])
    common.print_table(headers + ["sliding window (s)"], rows)
    primus = next(name for name in train if name.startswith("Primus"))
    keys = (("s", "train step time"), ("memory", "train memory")) + (() if cuda else (("saved", "  saved for backward"),))
    for ours in (name for name in train if name.startswith("PUMIT")):
        print(f"{ours}:")
        for key, label in keys + (("params", "parameters"),):
            print(f"  {label:<20} /nnU-Net default: {train[ours][key] / train[REFERENCE][key]:.3f}   "
                  f"/{primus}: {train[ours][key] / train[primus][key]:.3f}")
        if ours in predict:
            print(f"  {'sliding window':<20} /nnU-Net default: {predict[ours] / predict[REFERENCE]:.3f}   (no mirroring)")


def lite_plans(stock: dict, vit: str) -> dict:
    """The stock plans as ``PumitTrainer_lite`` adapts them (the lite decoder)."""
    import copy

    from pumit_nnunet.nnunet.plans import adapt_configuration

    plans = copy.deepcopy(stock)
    adapt_configuration(plans, "3d_fullres", vit, arch_overrides={"decoder": "lite"})
    return plans


def sliding_window(plans: dict, image, properties, config: common.BenchConfig):
    """nnU-Net's sliding window (no mirroring) over the preprocessed case, as a call."""
    data = common.preprocess(plans, image, properties)
    predictor = common.make_predictor(plans, common.network_from_plans(plans, False), config, mirroring=False)
    return lambda: predictor.predict_logits_from_preprocessed_data(data)


def token_counts(pumit_patch, aniso_d: int, patch) -> tuple[str, int, str, int]:
    ours = (pumit_patch[0] // (16 >> aniso_d), pumit_patch[1] // 16, pumit_patch[2] // 16)
    primus = tuple(p // 8 for p in patch)
    return "x".join(map(str, ours)), math.prod(ours), "x".join(map(str, primus)), math.prod(primus)


def main(argv=None) -> int:
    config, stock, ours = common.setup(argv, __doc__.split("\n\n")[0])
    arch = ours["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    print(common.describe(config, arch["patch_size"]))

    lite = lite_plans(stock, config.vit)
    builds = {f"PUMIT ViT-{config.vit}": lambda: common.network_from_plans(ours, True),
              f"PUMIT ViT-{config.vit} lite": lambda: common.network_from_plans(lite, True),
              REFERENCE: lambda: common.network_from_plans(stock, True),
              f"Primus-{config.vit}": lambda: common.primus(config.vit, config.patch_size)}
    train = measure_training(builds, config)
    image, properties = common.load_case(config)
    predict = common.interleaved_median_seconds({name: sliding_window(plans, image, properties, config) for name, plans
                                                 in ((f"PUMIT ViT-{config.vit}", ours), (REFERENCE, stock))}, config)

    print_training(train, predict, config.device.type == "cuda")
    grid, n_ours, primus_grid, n_primus = token_counts(arch["patch_size"], arch["aniso_d"], config.patch_size)
    print(f"tokens per patch: PUMIT {grid} = {n_ours} (aniso_d {arch['aniso_d']}), Primus 8^3 {primus_grid} = {n_primus}; "
          f"ratio {n_ours / n_primus:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
