"""Checkpoints that cannot run code or poison a run: weights-only loading, finiteness, clear one-line errors,
``check-model-folder``, the non-finite-loss guard (unit level; the nnU-Net runs are in test_safety_e2e.py)."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pumit_nnunet import cli
from pumit_nnunet.checkpoints.format import CheckpointError
from pumit_nnunet.checkpoints.readers import read_weights, torch_load_checked
from pumit_nnunet.checkpoints.layout import storable
from pumit_nnunet.checkpoints.safety import NonFiniteWeightsError, first_nonfinite, load_weights_only, require_finite
from pumit_nnunet.checkpoints.samples import randomise_, released_pumit_checkpoint
from pumit_nnunet.errors import DataError
from pumit_nnunet.models.vit import UniversalViT, ViTConfig
from pumit_nnunet.nnunet.checkpointing import (TrainerRefusal, read_results_checkpoint, restore_results_checkpoint,
                                               results_checkpoint)
from pumit_nnunet.nnunet.loss_guard import NonFiniteLossGuard
from safety_payloads import write_malicious_checkpoint

SMALL = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1), mask_token=True)


@pytest.fixture(autouse=True)
def weights_commands_only(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("pumit_nnunet.nnunet.weights_cli",))


def _poisoned(state: dict[str, torch.Tensor], keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) if (keys is None or k in keys) and v.is_floating_point() else v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomise_(UniversalViT(SMALL)).state_dict()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_malicious_pickle_never_runs(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = write_malicious_checkpoint(tmp_path / "evil.pth", marker, legacy=legacy)
    with pytest.raises(CheckpointError, match="refused: the file holds pickled objects") as error:
        load_weights_only(path)
    # the first global torch refuses: the payload's function, or (a bare pickle) torch's legacy storage loader
    first = "torch.storage._load_from_bytes" if legacy else "open"
    assert str(error.value).startswith(f"{path}: refused") and f"(first: {first}" in str(error.value).replace("io.open", "open")
    with pytest.raises(CheckpointError):  # the general reader too (foreign classes become inert stubs, no call)
        read_weights(path)
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # a bare pickle then fails torch's magic-number check: too late
        torch.load(path, weights_only=False)  # the payload is real: the unsafe loader (nnU-Net's) runs it
    assert marker.exists()


def test_text_and_empty_files_give_one_clear_line(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("epoch 3: loss 0.2\n")
    with pytest.raises(CheckpointError, match=r"is not a torch checkpoint \(18 bytes of a text file"):
        torch_load_checked(text)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_weights_only(tmp_path / "empty.pth")
    truncated = tmp_path / "truncated.pth"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        torch_load_checked(truncated)
    assert cli.main(["weights", "verify", str(text)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pumit-nnunet weights verify: error: {text}: is not a torch checkpoint (18 bytes of a "
                   "text file, starting b'epoch 3: los')"]


def test_first_nonfinite_names_the_bad_tensors(vit_state):
    assert first_nonfinite(vit_state) == []
    bad = dict(vit_state)
    bad["blocks.1.mlp.w1.weight"] = bad["blocks.1.mlp.w1.weight"].clone()
    bad["blocks.1.mlp.w1.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    assert first_nonfinite(bad) == [f"blocks.1.mlp.w1.weight (3 of {bad['blocks.1.mlp.w1.weight'].numel()} values non-finite)"]
    with pytest.raises(NonFiniteWeightsError, match=r"^f\.pt: weights hold NaN/Inf values: blocks\.1\.mlp\.w1\.weight"):
        require_finite(bad, "f.pt")
    nested = {"a": {"b": torch.tensor([1.0, float("nan")])}, "i": torch.tensor([1, 2])}
    assert first_nonfinite(nested) == ["a.b (1 of 2 values non-finite)"]


def test_all_nan_weights_are_refused_by_every_reader_and_command(tmp_path, vit_state, capsys):
    released = tmp_path / "nan.ckpt"
    torch.save(released_pumit_checkpoint(_poisoned(vit_state)), released)
    results = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {f"backbone.{k}": v for k, v in _poisoned(vit_state).items()}}, results)
    bare = tmp_path / "bare.pt"
    torch.save(_poisoned(vit_state, ("pos_embed",)), bare)
    for path in (released, results, bare):
        with pytest.raises(NonFiniteWeightsError, match="NaN/Inf"):
            read_weights(path)
    for command in (["verify", str(released)], ["convert", str(released), "--out", str(tmp_path / "out.pt")],
                    ["inspect", str(bare)]):
        assert cli.main(["weights", *command]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "weights hold NaN/Inf values" in err[0]
    assert "pos_embed (" in err[0] and not (tmp_path / "out.pt").exists()


def test_wrong_shape_weights_name_the_file(tmp_path, vit_state, capsys):
    path = tmp_path / "wrong.ckpt"
    torch.save(released_pumit_checkpoint(vit_state), path)
    assert cli.main(["weights", "verify", str(path), "--vit", "T"]) == 1
    out = capsys.readouterr().out
    assert f"weights from {path}" in out and "mismatched cls_token: checkpoint (1, 1, 64) vs model (1, 1, 128)" in out
    odd = dict(vit_state)  # 66 channels: no head split of 64-channel heads works; the error names the file
    odd["patch_embed.proj.weight"] = torch.zeros(66, 3, 16, 16, 16)
    torch.save(odd, tmp_path / "odd.pt")
    assert cli.main(["weights", "verify", str(tmp_path / "odd.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pumit-nnunet weights verify: error: {tmp_path / 'odd.pt'}: no target ViT can be built for these "
                   "weights: embed_dim 66 / num_heads 1 must give a head dim divisible by 4"]
    assert cli.main(["weights", "verify", str(path), "--patch-depth", "5"]) == 1
    assert f"{path}: no target ViT can be built" in capsys.readouterr().err


def test_storable_makes_nnunet_entries_weights_only_safe(tmp_path):
    entry = {"ema_fg_dice": [np.float64(0.5), np.float32(0.25)], "train_losses": [np.array(1.5)],
             "axes": (0, 1, 2), "device": torch.device("cpu"), "arr": np.arange(3), "p": tmp_path}
    plain = storable(entry)
    torch.save(plain, tmp_path / "x.pt")
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)
    assert loaded["ema_fg_dice"] == [0.5, 0.25] and loaded["train_losses"] == [1.5] and loaded["axes"] == (0, 1, 2)
    assert loaded["device"] == torch.device("cpu") and loaded["p"] == str(tmp_path)
    assert torch.equal(loaded["arr"], torch.arange(3))
    with pytest.raises(TypeError, match="cannot store a object"):
        storable(object())


def _fake_trainer(network: torch.nn.Module) -> SimpleNamespace:
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    logger = MetaLogger(None, False)
    for name, value in (("mean_fg_dice", np.float64(0.4)), ("ema_fg_dice", np.float64(0.4)),
                        ("dice_per_class_or_region", [np.float64(0.4)]), ("train_losses", np.array(0.7)),
                        ("val_losses", np.float32(0.8)), ("lrs", 1e-4), ("epoch_start_timestamps", 1.0),
                        ("epoch_end_timestamps", 2.0)):
        logger.log(name, value, 0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    network(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return SimpleNamespace(network=network, optimizer=optimizer, grad_scaler=None, logger=logger,
                           _best_ema=np.float64(0.4), current_epoch=0, inference_allowed_mirroring_axes=(0, 1, 2),
                           my_init_kwargs={"plans": {"a": 1}, "configuration": "3d_fullres", "fold": 0,
                                           "dataset_json": {}, "device": torch.device("cpu")})


def test_results_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    trainer = _fake_trainer(torch.nn.Linear(4, 3))
    path = tmp_path / "fold_0" / "checkpoint_latest.pth"
    path.parent.mkdir()
    torch.save(results_checkpoint(trainer), path)
    checkpoint = read_results_checkpoint(path)  # weights-only, complete, finite
    assert checkpoint["trainer_name"] == "SimpleNamespace" and checkpoint["current_epoch"] == 1
    assert checkpoint["logging"]["ema_fg_dice"] == [0.4] and isinstance(checkpoint["_best_ema"], float)
    fresh = _fake_trainer(torch.nn.Linear(4, 3))
    restore_results_checkpoint(fresh, checkpoint)
    assert fresh.current_epoch == 1 and fresh.inference_allowed_mirroring_axes == (0, 1, 2)
    torch.testing.assert_close(fresh.network.weight, trainer.network.weight)
    torch.testing.assert_close(fresh.optimizer.state_dict()["state"][0]["exp_avg"],
                               trainer.optimizer.state_dict()["state"][0]["exp_avg"])


def test_trainer_refusal_is_one_line_and_a_data_error(tmp_path):
    marker = tmp_path / "PWNED"
    evil = write_malicious_checkpoint(tmp_path / "checkpoint_final.pth", marker)
    with pytest.raises(TrainerRefusal) as error:
        read_results_checkpoint(evil)
    assert isinstance(error.value, DataError) and isinstance(error.value, SystemExit)
    assert error.value.code.startswith(f"PUMIT trainer: error: {evil}: refused: the file holds pickled objects")
    assert "\n" not in error.value.code and not marker.exists()
    with pytest.raises(TrainerRefusal, match="does not exist"):
        read_results_checkpoint(tmp_path / "absent.pth")
    torch.save({"network_weights": {"w": torch.tensor([float("nan")])}, "optimizer_state": {}, "logging": {},
                "_best_ema": None, "current_epoch": 1, "init_args": {}}, tmp_path / "nan.pth")
    with pytest.raises(TrainerRefusal, match=r"weights hold NaN/Inf values: w \(1 of 1"):
        read_results_checkpoint(tmp_path / "nan.pth")


def _model_folder(root: Path) -> Path:
    trainer = _fake_trainer(torch.nn.Linear(4, 3))
    folder = root / "Dataset950_X" / "PumitTrainer_T__nnUNetPlans__3d_fullres"
    for fold in ("fold_0", "fold_1"):
        (folder / fold).mkdir(parents=True)
        torch.save(results_checkpoint(trainer), folder / fold / "checkpoint_final.pth")
    return folder


def test_check_model_folder_certifies_and_refuses(tmp_path, capsys):
    folder = _model_folder(tmp_path / "results")
    assert cli.main(["check-model-folder", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 2 and "2 checkpoints load weights-only and are finite" in out
    marker = tmp_path / "PWNED"
    evil = write_malicious_checkpoint(folder / "fold_1" / "checkpoint_latest.pth", marker, legacy=True)
    assert cli.main(["check-model-folder", str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"BAD {evil}: refused" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pumit-nnunet check-model-folder: error: {evil}: refused")
    evil.unlink()
    nan = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    nan["network_weights"]["bias"] = torch.full((3,), float("inf"))
    torch.save(nan, folder / "fold_0" / "checkpoint_final.pth")
    assert cli.main(["check-model-folder", str(folder)]) == 1
    assert "bias (3 of 3 values non-finite)" in capsys.readouterr().err
    assert cli.main(["check-model-folder", str(tmp_path)]) == 1  # both of the folder's files: only one is bad
    assert cli.main(["check-model-folder", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["check-model-folder", str(tmp_path / "empty")]) == 1
    assert "no fold_*/checkpoint_*.pth" in capsys.readouterr().err
    assert not marker.exists()


def test_nonfinite_loss_guard_skips_then_stops(monkeypatch):
    lines: list[str] = []
    guard = NonFiniteLossGuard(limit=3, log=lines.append)
    nan, ok = torch.tensor(float("nan")), torch.tensor(0.5)
    assert [guard.skip(nan, 0), guard.skip(nan, 1), guard.skip(ok, 2)] == [True, True, False]
    assert guard.consecutive == 0 and guard.total == 2 and "iteration 1; step skipped (2 in a row, stop at 3)" in lines[-1]
    guard.skip(torch.tensor(float("inf")), 3)
    guard.skip(nan, 4)
    with pytest.raises(TrainerRefusal, match="non-finite for 3 consecutive iterations .up to iteration 5.") as error:
        guard.skip(nan, 5)
    assert "last good checkpoint_latest.pth" in str(error.value)
    monkeypatch.setenv("PUMIT_MAX_NONFINITE_STEPS", "2")
    assert NonFiniteLossGuard(log=lines.append).limit == 2
    monkeypatch.setenv("PUMIT_MAX_NONFINITE_STEPS", "zero")
    with pytest.raises(TrainerRefusal, match="must be a whole number"):
        NonFiniteLossGuard()


def test_nan_pretrained_weights_are_refused_by_the_trainer_routes(tmp_path, vit_state):
    from pumit_nnunet.models.segmentation import PumitSegNet
    from pumit_nnunet.nnunet.pretrained import pumit_load_pretrained_weights

    four_blocks = ViTConfig(embed_dim=64, depth=4, num_heads=2, mlp_hidden_dim=170, out_indices=(0, 1, 2, 3))
    network = PumitSegNet(1, 2, patch_size=[16, 64, 64], aniso_d=2, vit=four_blocks.to_dict(),
                          lateral_channels=(8, 8, 8, 8), fullres_channels=(4, 4))
    path = tmp_path / "nan.ckpt"
    state = randomise_(UniversalViT(four_blocks)).state_dict()
    torch.save(released_pumit_checkpoint(_poisoned(state, ("blocks.0.attn.proj.weight",))), path)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.0\.attn\.proj\.weight"):
        pumit_load_pretrained_weights(network, str(path), log=lambda _: None)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


def test_legacy_pickle_of_plain_values_still_loads(tmp_path):
    path = tmp_path / "plain.pth"
    with open(path, "wb") as handle:
        pickle.dump({"a": 1}, handle, protocol=2)
    with pytest.raises(CheckpointError):  # a bare pickle is not torch's legacy format (no magic number)
        load_weights_only(path)
    torch.save({"a": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights_only(path)["a"], torch.ones(2))


def _loaders(tmp_path: Path) -> dict[str, object]:
    """Every function through which a checkpoint file enters the library (the trainers' routes included)."""
    from pumit_nnunet.checkpoints.format import load_pumit_checkpoint
    from pumit_nnunet.checkpoints.tokenizer import read_tokenizer_weights
    from pumit_nnunet.models.segmentation import PumitSegNet
    from pumit_nnunet.nnunet.model_folder import check_results_checkpoint
    from pumit_nnunet.nnunet.pretrained import pumit_load_pretrained_weights, record_pretrained_in_plans
    from pumit_nnunet.pretrain.checkpoint import load_checkpoint as load_pretrain_state

    plans = tmp_path / "plans.json"
    plans.write_text('{"configurations": {"3d_fullres": {}}}')
    seg = dict(patch_size=[16, 64, 64], aniso_d=2, lateral_channels=(8, 8, 8, 8), fullres_channels=(4, 4),
               vit=ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden_dim=85, out_indices=(0, 1, 2, 3)).to_dict())

    def verdict(path):
        problem = check_results_checkpoint(path).problem
        if problem is not None:
            raise CheckpointError(problem, path)

    return {
        "load_weights_only": load_weights_only, "torch_load_checked": torch_load_checked, "read_weights": read_weights,
        "load_pumit_checkpoint": load_pumit_checkpoint, "read_tokenizer_weights": read_tokenizer_weights,
        "pretrain --resume": load_pretrain_state, "trainer --c/--val": read_results_checkpoint,
        "check-model-folder": verdict, "weights attach": lambda p: record_pretrained_in_plans(str(plans), "3d_fullres", str(p)),
        "-pretrained_weights": lambda p: pumit_load_pretrained_weights(PumitSegNet(1, 2, **seg), str(p), log=print),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_every_loader_refuses_a_malicious_results_checkpoint(tmp_path, legacy):
    """A real results checkpoint with the payload in ``init_args``: each loader refuses it with a :class:`DataError`
    and none runs the payload."""
    marker = tmp_path / "PWNED"
    trainer = _fake_trainer(torch.nn.Linear(4, 3))
    evil = write_malicious_checkpoint(tmp_path / "checkpoint_final.pth", marker, like=results_checkpoint(trainer),
                                      legacy=legacy)
    refused = []
    for name, loader in _loaders(tmp_path).items():
        with pytest.raises(DataError) as error:
            loader(evil)
        refused.append(name)
        assert "\n" not in str(error.value) and ("pickled objects" in str(error.value) or legacy), (name, error.value)
        assert not marker.exists(), name
    assert len(refused) == 10


def test_no_checkpoint_is_written_from_nonfinite_weights(tmp_path):
    """The last line of defence (``PumitTrainerBase.save_checkpoint``): a NaN network is never saved, not even as
    ``checkpoint_final.pth``; the refusal names the file that was not written and the bad tensors."""
    from pumit_nnunet.nnunet.checkpointing import require_finite_network

    network = torch.nn.Sequential(torch.nn.Linear(4, 3))
    require_finite_network(torch.compile(network), tmp_path / "checkpoint_final.pth")  # finite: no error
    with torch.no_grad():
        network[0].bias[1] = float("nan")
    with pytest.raises(TrainerRefusal, match=r"checkpoint_final\.pth: not written: the network's weights are no "
                                             r"longer finite \(0\.bias \(1 of 3 values non-finite\)\)"):
        require_finite_network(torch.compile(network), tmp_path / "checkpoint_final.pth")
    assert not (tmp_path / "checkpoint_final.pth").exists()
