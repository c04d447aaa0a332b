"""``pumit-nnunet weights``: inspect, convert, verify, attach (through ``main`` and once through the console script)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
from pumit_nnunet import cli
from pumit_nnunet.cli import main
from pumit_nnunet.models.vit import UniversalViT, ViTConfig

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1), mask_token=True)


@pytest.fixture(autouse=True)
def only_weights_subcommand(monkeypatch):
    """Exercise ``main`` with our registration module alone, independent of other areas' CLI modules."""
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("pumit_nnunet.nnunet.weights_cli",))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "pumit-small.ckpt"
    torch.save(released_pumit_checkpoint(randomise_(UniversalViT(SMALL)).state_dict()), path)
    return path


def test_inspect_json(released, capsys):
    assert main(["weights", "inspect", str(released), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "pumit-released" and info["heads"] == ["mim_head"]
    assert info["inferred_vit"]["embed_dim"] == 64 and info["inferred_vit"]["pos_embed_shape"] == [5, 10, 10]


def test_convert_then_verify(released, tmp_path, capsys):
    out = tmp_path / "converted.pt"
    args = ["weights", "convert", str(released), "--out", str(out), "--in-channels", "1", "--patch-depth", "4",
            "--pos-embed-shape", "2", "4", "4"]
    assert main(args) == 0
    ckpt = load_pumit_checkpoint(out)
    config = ViTConfig.from_dict(ckpt.architecture)
    assert (config.in_channels, config.patch_depth, config.pos_embed_shape, config.mask_token) == (1, 4, (2, 4, 4), True)
    assert ckpt.kind == "vit" and ckpt.pretrain_plan.intensity == "unit-range-imagenet"
    assert ckpt.extra["source_format"] == "pumit-released" and ckpt.state_dict["patch_embed.proj.weight"].shape[1:] == (1, 4, 16, 16)
    capsys.readouterr()
    assert main(args) == 1  # never overwrites without --force: one line on stderr naming the file
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pumit-nnunet weights convert: error: {out} exists; choose another --out or pass --force"]
    assert main(["weights", "verify", str(out)]) == 0
    assert "0 missing, 0 unexpected, 0 mismatched" in capsys.readouterr().out
    assert main(["weights", "verify", str(out), "--vit", "T"]) == 1  # wrong size: the report lists the mismatches
    assert "mismatched cls_token: checkpoint (1, 1, 64) vs model (1, 1, 128)" in capsys.readouterr().out


def test_convert_for_an_nnunet_plan(released, tmp_path):
    plans = {"plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [40, 128, 112], "spacing": [3.0, 0.78, 0.78], "median_image_size_in_voxels": [80, 256, 256],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "resampling_fn_data": "x",
        "resampling_fn_seg": "x", "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
        "resampling_fn_probabilities": "x", "resampling_fn_probabilities_kwargs": {},
        "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}}}
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"}, "labels": {}}))
    out = tmp_path / "for-plan.pt"
    assert main(["weights", "convert", str(released), "--out", str(out), "--plans", str(tmp_path / "nnUNetPlans.json")]) == 0
    config = ViTConfig.from_dict(load_pumit_checkpoint(out).architecture)
    # spacing 3 / 0.78 -> aniso_d 1: token depth 8; two channels; the patch rounds to (48, 128, 128): 6 x 8 x 8 tokens
    assert (config.in_channels, config.patch_depth, config.pos_embed_shape) == (2, 8, (6, 8, 8))


def test_attach_and_errors(released, tmp_path, capsys):
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps({"configurations": {"3d_fullres": {}}}))
    assert main(["weights", "attach", str(plans_file), "3d_fullres", str(released), "--allow-partial"]) == 0
    block = json.loads(plans_file.read_text(encoding="utf-8"))["configurations"]["3d_fullres"]["pumit_pretrained"]
    assert block["allow_partial"] is True and block["path"] == str(released.resolve())
    capsys.readouterr()
    assert main(["weights", "inspect", str(tmp_path / "absent.ckpt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pumit-nnunet weights inspect: error: ") and "absent.ckpt" in err[0] \
        and "does not exist" in err[0]
    before = plans_file.read_bytes()
    for content, problem in (("nnUNetPlans: 3d_fullres\n", "is not a plans JSON file (Expecting value at line 1 column 1)"),
                             ("[1, 2]", "is not a plans file: it holds a JSON list, not an object")):
        bad_plans = tmp_path / "bad_plans.json"
        bad_plans.write_text(content)
        assert main(["weights", "attach", str(bad_plans), "3d_fullres", str(released)]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"pumit-nnunet weights attach: error: {bad_plans}: {problem}"]
        assert bad_plans.read_text() == content and not list(tmp_path.glob("bad_plans.json.*.bak"))
    assert main(["weights", "attach", str(plans_file), "2d", str(released)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pumit-nnunet weights attach: error: {plans_file}: configuration '2d' not in the plans "
                   "(have: ['3d_fullres'])"]
    assert plans_file.read_bytes() == before


def test_console_script(released):
    exe = shutil.which("pumit-nnunet")
    if exe is None:
        pytest.skip("the pumit-nnunet console script is not installed (pip install -e .)")
    result = subprocess.run([exe, "weights", "inspect", str(released)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pumit-released" in result.stdout
