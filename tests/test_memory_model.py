"""Activation checkpointing of PumitSegNet and the memory model against measurement (CPU, fp32).

The measurement is the benchmarks' own counting (:mod:`pumit_nnunet.nnunet.memory_count`): unique storages
saved for backward in one forward + nnU-Net's loss, plus parameters, gradients and AdamW state after a step.
"""

from __future__ import annotations

import pytest
import torch

from pumit_nnunet.models.segmentation import CHECKPOINTING_MODES, PumitSegNet
from pumit_nnunet.nnunet import memory
from pumit_nnunet.nnunet.memory_count import forward_loss, saved_tensor_bytes, training_state_bytes
from pumit_nnunet.nnunet.planner import network_shape
from pumit_nnunet.optim import build_adamw

SLIM = dict(vit="T", lateral_channels=(16, 16, 32, 32), fullres_channels=(8, 8))
TOLERANCE = 0.15


def _slim_net(mode: str, dtype=torch.float64) -> PumitSegNet:
    torch.manual_seed(0)
    return PumitSegNet(1, 3, True, patch_size=(8, 64, 64), aniso_d=2, activation_checkpointing=mode, **SLIM).to(dtype)


@pytest.mark.parametrize("mode", ["backbone", "all"])
def test_checkpointing_keeps_outputs_and_gradients(mode: str) -> None:
    reference, checkpointed = _slim_net("none"), _slim_net(mode)
    x = torch.randn(2, 1, 8, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (reference, checkpointed):
        outputs = net(x)
        sum(o.square().mean() * (i + 1) for i, o in enumerate(outputs)).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
        with torch.no_grad():  # prediction path: no checkpoint wrappers at all
            grads[-1]["no_grad_output"] = net(x)[0]
        grads[-1]["outputs"] = torch.cat([o.flatten() for o in outputs]).detach()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_mode_is_validated_and_switchable() -> None:
    net = _slim_net("none", torch.float32)
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        net.set_activation_checkpointing("decoder")
    net.set_activation_checkpointing("all")
    assert net.backbone.grad_checkpointing and net.neck.checkpointing and net.decoder.checkpointing
    assert CHECKPOINTING_MODES == ("none", "backbone", "all")


def test_checkpointed_network_compiles_to_one_graph() -> None:
    """``fullgraph=True`` fails on any graph break (the checkpoint flags must be plain attributes dynamo guards)."""
    net = _slim_net("all", torch.float32)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 1, 8, 64, 64)
    out = compiled(x)
    sum(o.mean() for o in out).backward()
    torch.testing.assert_close(out[0], net(x)[0], rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None for p in net.parameters())


#: three patches per ViT preset (aniso_d 2: multiples of 8 x 32 x 32); B kept small for CPU cost
CASES = [(vit, patch) for vit, patches in {
    "T": [(8, 64, 64), (16, 64, 64), (16, 96, 96)],
    "S": [(8, 64, 64), (16, 64, 64), (16, 64, 96)],
    "B": [(8, 64, 64), (16, 64, 64), (8, 96, 96)],
}.items() for patch in patches]


def _measure(vit: str, patch: tuple[int, ...], mode: str) -> tuple[float, float]:
    """(saved-for-backward bytes, training-state bytes) of a batch of one, counted as the benchmarks do."""
    torch.manual_seed(0)
    net = PumitSegNet(1, 2, True, patch_size=patch, aniso_d=2, vit=vit, activation_checkpointing=mode)
    saved = saved_tensor_bytes(forward_loss(net, torch.randn(1, 1, *patch)), exclude=net.parameters())
    optimizer = build_adamw(net, 1e-4, 0.05)
    for p in net.parameters():  # AdamW allocates its state on the first step; zero gradients need no backward
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return float(saved), float(training_state_bytes(net, optimizer))


@pytest.mark.parametrize("mode", ["none", "all"])
@pytest.mark.parametrize("vit, patch", CASES)
def test_memory_model_matches_measurement(vit: str, patch: tuple[int, ...], mode: str) -> None:
    saved, state = _measure(vit, patch, mode)
    net = network_shape(vit, 1, 2, 2, 3, {"activation_checkpointing": mode})
    predicted_saved = memory.saved_bytes(patch, 1, 2, net)
    predicted = memory.training_memory_bytes(patch, 1, 2, net)
    assert abs(predicted_saved / saved - 1) <= TOLERANCE, f"saved for backward: {predicted_saved:.0f} vs {saved:.0f}"
    assert abs(predicted / (saved + state) - 1) <= TOLERANCE, f"training memory: {predicted:.0f} vs {saved + state:.0f}"
    assert memory.state_bytes(patch, 2, net) == state  # parameters, gradients and AdamW state are exact


@pytest.mark.parametrize("vit", ["T", "B"])
def test_backbone_checkpointing_matches_measurement(vit: str) -> None:
    saved, _ = _measure(vit, (16, 64, 64), "backbone")
    predicted = memory.saved_bytes((16, 64, 64), 1, 2, network_shape(vit, 1, 2, 2, 3, {"activation_checkpointing": "backbone"}))
    assert abs(predicted / saved - 1) <= TOLERANCE


def test_checkpointing_saves_memory_monotonically() -> None:
    """Each mode keeps less than the previous one, and the bf16 estimate is the same formula at 2 bytes."""
    shapes = [network_shape("B", 1, 14, 2, 3, {"activation_checkpointing": m}) for m in CHECKPOINTING_MODES]
    sizes = [memory.saved_bytes((48, 192, 192), 2, 2, s) for s in shapes]
    assert sizes[0] > sizes[1] > sizes[2]
    bf16 = [memory.saved_bytes((48, 192, 192), 2, 2, s, memory.BF16_AUTOCAST) for s in shapes]
    assert all(0.4 * f < b < f for f, b in zip(sizes, bf16))
