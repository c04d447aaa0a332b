"""PumitTrainer's network vs nnU-Net's default network (same plans) and Primus (same patch): training step and
sliding-window prediction, printed as ratios measured in the same run.

* Training step = forward + nnU-Net's loss (Dice + CE, wrapped in its deep-supervision weighting where the
  network has deep supervision) + backward + gradient clipping 1.0 + AdamW step (``build_adamw``, for every
  network), batch 2 of random input. Memory: on CUDA the peak allocated bytes above what was allocated before
  the network was built (``torch.cuda.max_memory_allocated``: parameters, gradients, AdamW state, activations,
  workspace); on the CPU the bytes of the unique storages that autograd saves for backward in one forward + loss
  (``saved_tensors_hooks``, parameters excluded) PLUS parameter + gradient + AdamW-state bytes.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402


def nnunet_loss(deep_supervision_outputs: int) -> nn.Module:
    """nnU-Net's default training loss; deep supervision weights 1/2^i, lowest output 0, normalised."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if deep_supervision_outputs <= 1:
        return loss
    weights = [1 / 2**i for i in range(deep_supervision_outputs)]
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, [w / sum(weights) for w in weights])


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
        self.loss = nnunet_loss(len(outputs))

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
        tensors = list(self.network.parameters()) + [p.grad for p in self.network.parameters() if p.grad is not None]
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def saved_for_backward_bytes(self) -> int:
        """Bytes of the unique non-parameter storages autograd saves in one forward + loss."""
        params = {p.untyped_storage().data_ptr() for p in self.network.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss_value()
        loss.backward()  # frees the graph
        self.optimizer.zero_grad(set_to_none=True)
        return sum(storages.values())


def measure_training(build, config: common.BenchConfig) -> dict:
    """Median step seconds, parameter count and memory bytes (as described in the module docstring)."""
    cuda = config.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(config.device)
        torch.cuda.reset_peak_memory_stats(config.device)
    step = TrainStep(build(), config)
    result = {"s": common.median_seconds(step, config), "params": sum(p.numel() for p in step.network.parameters())}
    if cuda:
        result["memory"] = float(torch.cuda.max_memory_allocated(config.device) - base)
    else:
        result["saved"], result["state"] = float(step.saved_for_backward_bytes()), float(step.state_bytes())
        result["memory"] = result["saved"] + result["state"]
    return result


def print_training(train: dict, predict: dict, cuda: bool) -> None:
    mib = 2.0**20
    headers = ["network", "params (M)", "train step (ms)"]
    headers += ["peak CUDA memory (MiB)"] if cuda else ["saved for backward (MiB)", "params+grads+AdamW (MiB)", "sum (MiB)"]
    rows = []
    for name, r in train.items():
        memory = [r["memory"] / mib] if cuda else [r["saved"] / mib, r["state"] / mib, r["memory"] / mib]
        rows.append([name, f"{r['params'] / 1e6:.1f}", r["s"] * 1e3, *memory, predict.get(name, "-")])
    common.print_table(headers + ["sliding window (s)"], rows)
    ours, ref, primus = train
    for key, label in (("s", "train step time"), ("memory", "train memory")) + (() if cuda else (("saved", "  saved for backward"),)):
        print(f"{label:<20} PUMIT/nnU-Net default: {train[ours][key] / train[ref][key]:.3f}   "
              f"PUMIT/{primus}: {train[ours][key] / train[primus][key]:.3f}")
    print(f"{'sliding window':<20} PUMIT/nnU-Net default: {predict[ours] / predict[ref]:.3f}   (no mirroring)")


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

    builds = {f"PUMIT ViT-{config.vit}": lambda: common.network_from_plans(ours, True),
              "nnU-Net default": lambda: common.network_from_plans(stock, True),
              f"Primus-{config.vit}": lambda: common.primus(config.vit, config.patch_size)}
    train = {name: measure_training(build, config) for name, build in builds.items()}
    image, properties = common.load_case(config)
    predict = common.interleaved_median_seconds({name: sliding_window(plans, image, properties, config) for name, plans
                                                 in ((f"PUMIT ViT-{config.vit}", ours), ("nnU-Net default", stock))}, config)

    print_training(train, predict, config.device.type == "cuda")
    grid, n_ours, primus_grid, n_primus = token_counts(arch["patch_size"], arch["aniso_d"], config.patch_size)
    print(f"tokens per patch: PUMIT {grid} = {n_ours} (aniso_d {arch['aniso_d']}), Primus 8^3 {primus_grid} = {n_primus}; "
          f"ratio {n_ours / n_primus:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
