"""Trainer classes: nnU-Net's constructor contract, discovery through the hook, optimiser groups and schedule."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pumit_nnunet.nnunet.trainers as trainers
from pumit_nnunet.models.vit import UniversalViT, vit_config
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw, split_decay_groups, warmup_cosine_factor, warmup_poly_factor


def test_every_trainer_keeps_nnunets_constructor_signature() -> None:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    expected = list(inspect.signature(nnUNetTrainer.__init__).parameters)
    for name in trainers.__all__:
        cls = getattr(trainers, name)
        assert issubclass(cls, nnUNetTrainer) and cls.__name__ == name
        # nnU-Net rebuilds ``my_init_kwargs`` from this signature: *args/**kwargs would crash it
        assert list(inspect.signature(cls.__init__).parameters) == expected, name


def test_the_startup_hook_points_nnunet_at_the_trainers() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_extTrainer", "PUMIT_NNUNET_NO_HOOK")}
    probe = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
             "c = f('PumitTrainer_S_smoke'); print(c.__module__, c.__name__)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, encoding="utf-8", errors="replace", check=True).stdout
    assert out.split()[-2:] == ["pumit_nnunet.nnunet.trainers", "PumitTrainer_S_smoke"]


def test_decay_groups_exclude_biases_norms_tokens_and_position_embeddings() -> None:
    vit = UniversalViT(vit_config("T", mask_token=True))
    decay, no_decay = split_decay_groups(vit, 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "pos_embed", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias",
            "blocks.0.norm1.weight", "blocks.0.mlp.ffn_ln.weight", "patch_embed.proj.bias"} <= no_decay_names
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.q_proj.weight", "patch_embed.proj.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


@given(st.integers(0, 20), st.integers(1, 200), st.integers(0, 400))
@settings(max_examples=60, deadline=None)
def test_warmup_factors(warmup: int, span: int, step: int) -> None:
    total = warmup + span
    for factor in (warmup_cosine_factor(step, warmup, total), warmup_poly_factor(step, warmup, total)):
        assert 0.0 <= factor <= 1.0
    if step < warmup:
        assert warmup_poly_factor(step, warmup, total) == pytest.approx((step + 1) / warmup)
    if step >= total:
        assert warmup_cosine_factor(step, warmup, total) == pytest.approx(0.0, abs=1e-12)


def test_schedule_scales_each_group_and_jumps_exactly_after_a_resume() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_adamw(model, 1e-3, 0.05)
    optimizer.param_groups[1]["initial_lr"] = optimizer.param_groups[1]["lr"] = 5e-4  # e.g. a layer-wise scale
    schedule = WarmupDecaySchedule(optimizer, 10, 100, kind="poly")
    schedule.base_lrs = [1e-3, 5e-4]
    for _ in range(37):
        optimizer.step()
        schedule.step()
    stepped = [g["lr"] for g in optimizer.param_groups]
    resumed = WarmupDecaySchedule(build_adamw(model, 1e-3, 0.05), 10, 100, kind="poly")
    resumed.base_lrs = [1e-3, 5e-4]
    resumed.set_step(37)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(stepped)
    assert stepped[1] / stepped[0] == pytest.approx(0.5)
