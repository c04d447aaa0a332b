"""Tokenizer losses: the regulariser's math (property tests), LPIPS (weights files, normalisation), GAN gate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.layers.lpips import (
    LPIPS,
    IMAGENET_MEAN,
    build_vgg16_features,
    imagenet_normalize_from_pm1,
    lpips_lin_shapes,
    select_slices,
    vgg16_feature_shapes,
)
from pumit_nnunet.layers.quantize import entropy, kl_from_uniform, mean_token_entropy, prior_entropy_loss
from pumit_nnunet.pretrain.losses_tokenizer import (
    GanGate,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    prior_regularisation,
)


@st.composite
def distributions(draw):
    k = draw(st.integers(2, 64))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * draw(
        st.floats(0.0, 20.0))
    return logits.softmax(-1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(distributions())
def test_prior_loss_is_kl_from_uniform_minus_log_k(probs):
    mean_probs = probs.mean(0)
    k = probs.shape[-1]
    kl = (mean_probs * (mean_probs * k).log()).sum()  # KL(p̄ || U) computed directly
    torch.testing.assert_close(kl, math.log(k) + prior_entropy_loss(mean_probs))
    torch.testing.assert_close(kl_from_uniform(mean_probs), kl)
    assert -1e-9 <= float(kl) <= math.log(k) + 1e-9


@settings(max_examples=40, deadline=None, derandomize=True)
@given(distributions())
def test_mean_token_entropy_matches_a_direct_computation(probs):
    direct = torch.stack([-(p[p > 0] * p[p > 0].log()).sum() for p in probs]).mean()
    torch.testing.assert_close(mean_token_entropy(probs), direct)
    torch.testing.assert_close(mean_token_entropy(probs, probs.log()), direct)


def test_entropy_extremes():
    k = 16
    assert float(entropy(torch.full((k,), 1 / k))) == pytest.approx(math.log(k))
    assert float(entropy(torch.eye(k)[3])) == 0.0


def test_prior_regularisation_uses_the_batch_mean():
    probs = torch.randn(2, 3, 4, 8).softmax(-1)
    quant, ent, mean_probs = prior_regularisation(probs, probs.log())
    torch.testing.assert_close(mean_probs, probs.reshape(-1, 8).mean(0))
    torch.testing.assert_close(quant, (mean_probs * mean_probs.log()).sum())
    torch.testing.assert_close(ent, mean_token_entropy(probs))


def test_imagenet_mean_maps_to_zero():
    mean_pm1 = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 2 - 1
    torch.testing.assert_close(imagenet_normalize_from_pm1(mean_pm1.expand(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4))
    x01 = torch.rand(2, 3, 5, 5)
    reference = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet_normalize_from_pm1(x01 * 2 - 1), reference)


def test_vgg16_names_equal_torchvision():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # names and shapes only: skip allocating and initialising 138 M weights
        features = torchvision.models.vgg16().features
    expected = {f"features.{k}": tuple(v.shape) for k, v in features.state_dict().items()}
    assert vgg16_feature_shapes() == expected


@pytest.fixture(scope="module")
def lpips(lpips_files):  # lpips_files: conftest's random-weight stand-ins with the real key names and shapes
    return LPIPS(*lpips_files)


def test_lpips_matches_a_reference_computation(lpips, lpips_files):
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    vgg = {k: v for k, v in torch.load(lpips_files[0], weights_only=True).items() if k.startswith("features.")}
    lins = torch.load(lpips_files[1], weights_only=True)
    features = build_vgg16_features()
    features.load_state_dict({k.removeprefix("features."): v for k, v in vgg.items()})
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # 2 * mean - 1
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)  # 2 * std
    fx, fy, total = (x - shift) / scale, (y - shift) / scale, torch.zeros(2)
    for i, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))):
        fx, fy = features[a:b](fx), features[a:b](fy)
        nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        total += ((nx - ny) ** 2 * lins[f"lin{i}.model.1.weight"]).sum(1).mean((1, 2))
    torch.testing.assert_close(lpips.forward_2d(x, y), total, rtol=1e-4, atol=1e-6)
    assert float(lpips(x, x)) == 0.0
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_3d_is_the_mean_over_slices(lpips):
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 3, 16, 16) * 2 - 1
    per_slice = torch.stack([lpips.forward_2d(x[:, :, d], y[:, :, d]) for d in range(3)])
    torch.testing.assert_close(lpips(x, y), per_slice.mean(), rtol=1e-5, atol=1e-6)
    generator = torch.Generator().manual_seed(5)
    xs, ys = select_slices(x, y, 2, generator)
    assert xs.shape == (4, 3, 16, 16)
    # the same slices of x and y are paired
    first = [d for d in range(3) if torch.equal(x[0, :, d], xs[0])]
    assert first and torch.equal(y[0, :, first[0]], ys[0])


def test_lpips_files_are_verified(tmp_path, lpips_files):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        LPIPS(tmp_path / "missing.pth", lpips_files[1])
    bad = {k: v for k, v in torch.load(lpips_files[1], weights_only=True).items() if not k.startswith("lin4")}
    torch.save(bad, tmp_path / "lin_bad.pth")
    with pytest.raises(ValueError, match="lin_bad.pth.*lin4"):
        LPIPS(lpips_files[0], tmp_path / "lin_bad.pth")
    wrong = torch.load(lpips_files[0], weights_only=True)
    wrong["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(wrong, tmp_path / "vgg_wrong.pth")
    with pytest.raises(ValueError, match="vgg_wrong.pth.*features.0.weight"):
        LPIPS(tmp_path / "vgg_wrong.pth", lpips_files[1])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        LPIPS(tmp_path / "junk.pth", lpips_files[1])


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    expected = 0.5 * (torch.tensor([0.0, 0.5, 2.0]).mean() + torch.tensor([0.0, 1.0, 2.0]).mean())
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), expected)
    torch.testing.assert_close(generator_adversarial_loss(fake), -fake.mean())


def test_gan_gate_opens_only_when_the_discriminator_clearly_wins():
    gate = GanGate(threshold=0.025)
    assert not gate.is_open  # starts at 0.1
    steps = 0
    while not gate.is_open:
        gate.update(0.0)
        steps += 1
    # ema = 0.1 * 0.9^n <= 0.025  <=>  n >= log(0.25) / log(0.9) = 13.2
    assert steps == 14
    gate.update(0.03)  # one bad step closes it (max of EMA and last)
    assert not gate.is_open and gate.ema < 0.025
    gate.update(0.0)
    assert gate.is_open
    state = gate.state_dict()
    other = GanGate()
    other.load_state_dict(state)
    assert (other.ema, other.last, other.is_open) == (gate.ema, gate.last, True)


# --- p̄ across processes: both --prior-mean options against their formula, in two real gloo processes --------------
PRIOR_K = 5


def _rank_logits(rank: int) -> torch.Tensor:
    """Rank r holds 2r + 1 tokens (unequal counts make the two options differ)."""
    return torch.randn(2 * rank + 1, PRIOR_K, generator=torch.Generator().manual_seed(100 + rank))


def _prior_terms(logits: torch.Tensor, scale: torch.Tensor, prior_mean: str):
    scaled = logits * scale
    return prior_regularisation(scaled.softmax(-1), scaled.log_softmax(-1), prior_mean)


def _prior_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from pumit_nnunet.pretrain import distributed as D

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    D.init_distributed("cpu")
    result = {}
    for prior_mean in ("tokens", "processes"):
        scale = torch.ones((), requires_grad=True)  # a weight shared by the ranks, as DDP keeps it
        loss, _, mean_probs = _prior_terms(_rank_logits(rank), scale, prior_mean)
        loss.backward()
        grad = scale.grad.clone()
        dist.all_reduce(grad)  # DDP averages the ranks' gradients
        result[prior_mean] = {"loss": loss.detach(), "mean": mean_probs.detach(), "grad": grad / world}
    if rank == 0:
        torch.save(result, out)
    D.cleanup_distributed()


@pytest.mark.distributed
def test_prior_mean_across_two_processes_follows_each_formula(tmp_path, free_port):
    import torch.multiprocessing as mp

    out = str(tmp_path / "prior.pth")
    mp.start_processes(_prior_worker, args=(2, free_port, out), nprocs=2, join=True, start_method="spawn")
    result = torch.load(out, weights_only=True)
    per_rank = [_rank_logits(r) for r in range(2)]

    def reference(mean_of):  # one process computing the formula on every rank's tokens
        scale = torch.ones((), requires_grad=True)
        probs = [(logits * scale).softmax(-1) for logits in per_rank]
        p_bar = mean_of(probs)
        loss = prior_entropy_loss(p_bar)
        loss.backward()
        return loss.detach(), p_bar.detach(), scale.grad

    expected = {
        "tokens": reference(lambda probs: torch.cat(probs).mean(0)),  # ours: every token of the global batch
        "processes": reference(lambda probs: torch.stack([p.mean(0) for p in probs]).mean(0)),  # the authors'
    }
    for option, (loss, p_bar, grad) in expected.items():
        torch.testing.assert_close(result[option]["mean"], p_bar)
        torch.testing.assert_close(result[option]["loss"], loss)
        torch.testing.assert_close(result[option]["grad"], grad)
    # 1 + 3 tokens: the two means really differ, so the test tells the options apart
    assert not torch.allclose(expected["tokens"][1], expected["processes"][1], atol=1e-3)
