"""Prediction time per case with and without test-time augmentation (nnU-Net's mirroring over the three axes,
8 flips), PumitTrainer's network vs nnU-Net's default network from the same plans, on the same real case.

Per case = nnU-Net's ``nnUNetPredictor.predict_single_npy_array`` (set up with ``manual_initialization``):
preprocessing (resampling to 3 x 0.75 x 0.75 mm, CT window), the sliding window (Gaussian blending) and the
resampling of the logits back to the case's geometry. Printed as ratios measured in the same run: with/without
TTA for each network, and PUMIT/default for each setting, for the authors' decoder widths (the trainers' default)
and the ``lite`` decoder. Then the profile of one tile's forward pass (no grad), part by part, as a fraction of
nnU-Net's whole forward: where PUMIT's extra time goes. Randomly initialised weights (time does not depend
on them). Default: ViT-B, patch 48x192x192, the whole ``lung1`` CT, CUDA when available (nnU-Net's own
autocast); ``--quick``: ViT-S, patch 16x64x64, the case cropped, a few CPU minutes.
Run: ``python benchmarks/bench_prediction_tta.py [--quick] [--device cpu] [--repeats N]``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402


def case_predictions(plans: dict, image, properties, config: common.BenchConfig) -> dict:
    """One prediction call per TTA setting (the same network)."""
    torch.manual_seed(0)
    network = common.network_from_plans(plans, False)
    return {tta: (lambda p=common.make_predictor(plans, network, config, tta): p.predict_single_npy_array(image, properties))
            for tta in (False, True)}


def forward_parts(network: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One tile's forward split into its parts (each call runs its part on inputs computed once beforehand)."""
    if hasattr(network, "backbone_maps"):  # PumitSegNet: backbone, neck, decoder
        features = network.backbone_maps(x)
        pyramid = network.neck(features)
        return {"ViT backbone": lambda: network.backbone_maps(x), "neck": lambda: network.neck(features),
                "decoder": lambda: network.decoder(x, pyramid)}
    skips = network.encoder(x)  # dynamic_network_architectures' UNet: encoder, decoder
    return {"encoder": lambda: network.encoder(x), "decoder": lambda: network.decoder(skips)}


#: timed rounds of the per-part profile at least (the parts are short: two rounds are too noisy to split)
PROFILE_REPEATS = 7


def profile_rows(networks: dict[str, dict], reference: str, config: common.BenchConfig) -> list[tuple]:
    """Per network and part: median seconds of one tile's forward and its fraction of the whole forward of
    ``networks[reference]``."""
    calls: dict[tuple[str, str], Callable[[], object]] = {}
    for name, plans in networks.items():
        torch.manual_seed(0)
        network = common.network_from_plans(plans, False).to(config.device).eval()
        x = torch.randn(1, 1, *plans["configurations"]["3d_fullres"]["patch_size"], device=config.device)
        with torch.no_grad():
            calls[name, "whole forward"] = lambda n=network, x=x: n(x)
            calls.update({(name, part): fn for part, fn in forward_parts(network, x).items()})
    with torch.no_grad(), config.autocast:
        repeats = max(config.repeats, PROFILE_REPEATS)
        seconds = common.interleaved_median_seconds(calls, dataclasses.replace(config, repeats=repeats))
    whole = seconds[reference, "whole forward"]
    return [(name, part, s * 1e3, s / whole) for (name, part), s in seconds.items()]


def main(argv=None) -> int:
    config, stock, ours = common.setup(argv, __doc__.split("\n\n")[0])
    print(common.describe(config, ours["configurations"]["3d_fullres"]["patch_size"]))
    image, properties = common.load_case(config)
    print(f"case: {image.shape[1:]} voxels at {[round(s, 3) for s in properties['spacing']]} mm; tile step {config.step}")

    lite = common.pumit_plans(stock, config.vit, "lite")
    networks = {f"PUMIT ViT-{config.vit}": ours, f"PUMIT ViT-{config.vit} lite decoder": lite, "nnU-Net default": stock}
    calls = {(name, tta): fn for name, plans in networks.items()
             for tta, fn in case_predictions(plans, image, properties, config).items()}
    seconds = common.interleaved_median_seconds(calls, config)
    rows = [(name, seconds[name, False], seconds[name, True], seconds[name, True] / seconds[name, False])
            for name in networks]
    common.print_table(["network", "no TTA (s/case)", "8-flip TTA (s/case)", "with/without TTA"], rows)
    *ours_names, ref_name = networks
    for name in ours_names:
        for tta, label in ((False, "no TTA"), (True, "8-flip TTA")):
            print(f"{label:<10}  {name} / nnU-Net default: {seconds[name, tta] / seconds[ref_name, tta]:.3f}")
    print(f"\none tile's forward, no grad (fraction: of {ref_name}'s whole forward)")
    common.print_table(["network", "part", "ms", "fraction"], profile_rows(networks, ref_name, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
