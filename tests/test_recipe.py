"""Fine-tuning recipes: every head trained, and the authors' loss, intensity, crops, augmentation
and decoder equal to their code (function2-llx/PUMIT ``downstream/btcv``, ``downstream/chaos``, ``mylib``)."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pumit_nnunet.nnunet.recipe import AUTHORS, NNUNET, RecipeSettings, head_weights, recipe_arch_overrides, recipe_settings

monai = pytest.importorskip("monai")


# -- helpers ----------------------------------------------------------------------------------------------------
def _stock_plans(protocol: dict | None = None) -> dict:
    """Stock nnU-Net 3d_fullres plans of a small anisotropic CT (5 x 0.6 x 0.6 mm), optionally with a protocol."""
    configuration = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [16, 64, 64], "median_image_size_in_voxels": [16, 96, 96], "spacing": [5.0, 0.6, 0.6],
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "batch_dice": False,
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": {"strides": [[1, 1, 1]]}, "_kw_requires_import": []},
    }
    if protocol is not None:
        configuration["pumit_protocol"] = protocol
    return {
        "dataset_name": "Dataset999_RecipeTest", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [5, 0.6, 0.6],
        "original_median_shape_after_transp": [16, 96, 96], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "continue_training": False,
        "foreground_intensity_properties_per_channel": {"0": {"mean": -175.0, "std": 425.0, "percentile_00_5": -175.0,
                                                              "percentile_99_5": 250.0, "min": -1000.0, "max": 1000.0,
                                                              "median": 0.0}},
        "configurations": {"3d_fullres": configuration},
    }


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
                "file_ending": ".nii.gz"}


def _trainer(trainer_name: str, tmp_path, monkeypatch, protocol: dict | None = None):
    """A real PUMIT trainer on in-memory stock plans, initialised on the CPU (network, optimiser, loss)."""
    from pumit_nnunet.nnunet import trainers

    for name in ("raw", "preprocessed", "results"):  # nnU-Net 2.8 reads its paths from the environment lazily
        monkeypatch.setenv(f"nnUNet_{name}", str(tmp_path / name))
    data = tmp_path / "preprocessed" / "Dataset999_RecipeTest" / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.npz").touch()  # initialize() infers the dataset format from the file endings; nothing is read
    monkeypatch.setenv("nnUNet_compile", "f")
    cls = getattr(trainers, trainer_name)
    trainer = cls(_stock_plans(protocol), "3d_fullres", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.initialize()
    return trainer


def _labels(shape, seed: int = 0) -> torch.Tensor:
    """Blocky labels 0/1/2 (every class present) of ``shape`` (N, 1, D, H, W)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (shape[0], 1, max(shape[2] // 4, 1), shape[3] // 8, shape[4] // 8), generator=g)
    return F.interpolate(coarse.float(), size=tuple(shape[2:]), mode="nearest")


def _ds_targets(label: torch.Tensor, scales) -> list[torch.Tensor]:
    return [F.interpolate(label, size=[round(s * f) for s, f in zip(label.shape[2:], scale)], mode="nearest")
            for scale in scales]


AUTHORS_PROTOCOL = {"recipe": "authors", "crop_weights": [1, 3], "affine_scale_range": [-0.3, 0.4], "input_affine": [2, -1]}


# -- no head left untrained ---------------------------------------------------------------------------------------
def test_head_weights_are_the_authors() -> None:
    np.testing.assert_allclose(head_weights(4), np.array([8, 4, 2, 1]) / 15)
    assert head_weights(1).tolist() == [1.0]
    with pytest.raises(ValueError):
        head_weights(0)


@pytest.mark.parametrize("trainer_name,protocol", [("PumitTrainer_T_smoke", None),
                                                   ("PumitTrainer_T_paper_smoke", None),
                                                   ("PumitTrainer_T_smoke", AUTHORS_PROTOCOL)])
def test_every_head_receives_gradient(trainer_name: str, protocol, tmp_path, monkeypatch) -> None:
    """The trainer's own loss (nnU-Net's Dice + CE, or the authors' DiceCE) sends gradient into all four heads; with
    nnU-Net's weights [4, 2, 1, 0]/7 the 1/8-resolution head would get exactly none."""
    from pumit_nnunet.nnunet.recipe_loss import UpsampledDeepSupervisionLoss

    torch.manual_seed(0)
    trainer = _trainer(trainer_name, tmp_path, monkeypatch, protocol)
    authors = trainer_name.endswith("paper_smoke") or protocol is not None
    assert trainer.recipe_settings.name == (AUTHORS if authors else NNUNET)
    if authors:
        assert isinstance(trainer.loss, UpsampledDeepSupervisionLoss)
        assert trainer.loss.weights == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    else:
        assert trainer.loss.weight_factors == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 1, *patch)
    label = _labels((2, 1, *patch))
    outputs = trainer.network(data)
    assert len(outputs) == 4
    trainer.loss(outputs, _ds_targets(label, trainer._get_deep_supervision_scales())).backward()
    heads = trainer.network.decoder.heads
    for i, head in enumerate(heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, f"head {i} got no gradient"


# -- the authors' loss -------------------------------------------------------------------------------------------
def test_authors_loss_equals_monai_dicece_on_upsampled_logits() -> None:
    """sum_i w_i DiceCELoss(trilinear(logits_i -> label size), label), w = [8, 4, 2, 1]/15: MONAI's loss itself,
    computed here independently of our module, to float tolerance."""
    from monai.losses import DiceCELoss

    from pumit_nnunet.nnunet.recipe_loss import UpsampledDeepSupervisionLoss

    torch.manual_seed(1)
    size = (8, 32, 32)
    label = _labels((2, 1, *size), seed=3)
    logits = [torch.randn(2, 3, 8, 32 // 2 ** i, 32 // 2 ** i, requires_grad=True) for i in range(4)]
    ours = UpsampledDeepSupervisionLoss(4)(logits, _ds_targets(label, [[1, 1 / 2 ** i, 1 / 2 ** i] for i in range(4)]))
    reference = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True)
    expected = sum(w * reference(F.interpolate(x, size=size, mode="trilinear"), label)
                   for w, x in zip([8 / 15, 4 / 15, 2 / 15, 1 / 15], logits))
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    ours.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in logits)


def test_authors_loss_refuses_regions_and_wrong_head_count() -> None:
    from pumit_nnunet.nnunet.recipe_loss import UpsampledDeepSupervisionLoss

    with pytest.raises(ValueError, match="expected 4 head outputs"):
        UpsampledDeepSupervisionLoss(4)([torch.randn(1, 2, 4, 8, 8)], torch.zeros(1, 1, 4, 8, 8))


@pytest.mark.parametrize("labels, regions", [({"background": 0, "a": [1, 2], "b": 2}, [1, 2]),
                                             ({"background": 0, "a": 1, "ignore": 2}, None)],
                         ids=["regions", "ignore-label"])
def test_authors_loss_on_regions_or_an_ignore_label_is_a_one_line_trainer_refusal(tmp_path, labels, regions) -> None:
    """Inside nnUNetv2_train a TrainerRefusal (a SystemExit) ends the run with one line naming dataset.json."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from pumit_nnunet.nnunet.checkpointing import TrainerRefusal
    from pumit_nnunet.nnunet.recipe_trainer import RecipeHooks

    hooks = RecipeHooks()
    hooks.label_manager = LabelManager(labels, regions_class_order=regions)
    hooks.preprocessed_dataset_folder_base = str(tmp_path)
    with pytest.raises(TrainerRefusal) as refused:
        hooks._authors_loss()
    assert isinstance(refused.value, SystemExit)
    assert refused.value.code.startswith(f"PUMIT trainer: error: {tmp_path / 'dataset.json'}: the authors' recipe ")
    assert "\n" not in refused.value.code


# -- intensity ----------------------------------------------------------------------------------------------------
def test_btcv_first_layer_input_equals_the_authors_2x_minus_1() -> None:
    """nnU-Net's CTNormalization with the BTCV preset's window, then the network's input map from the BTCV
    protocol, feed the patch embedding (and the decoder's full-resolution branch) exactly the authors'
    ``2 * ScaleIntensityRange(-175, 250 -> 0, 1, clip) - 1``."""
    from monai.transforms import ScaleIntensityRange
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    from pumit_nnunet.models.segmentation import PumitSegNet
    from pumit_nnunet.nnunet.presets import ct_window_intensity_properties, load_preset

    preset = load_preset("btcv")
    settings = recipe_settings(preset.protocol)
    assert settings.is_authors and settings.input_affine == (2.0, -1.0)
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1024, 1500, size=(16, 64, 64)).astype(np.float32)
    normalized = CTNormalization(False, ct_window_intensity_properties(*preset.normalization.window)).run(hu.copy())
    kwargs = recipe_arch_overrides(settings, {"decoder": "lite"})
    net = PumitSegNet(1, 3, False, patch_size=[16, 64, 64], aniso_d=2, vit="T", **kwargs).eval()
    seen = {}

    def record(name):
        def hook(module, args) -> None:  # returns None: the input is left as it is
            seen[name] = args[0].detach().clone()
        return hook

    net.backbone.patch_embed.register_forward_pre_hook(record("embed"))
    net.decoder.fullres[0].register_forward_pre_hook(record("fullres"))
    with torch.no_grad():
        net(torch.from_numpy(normalized)[None, None])
    authors = 2 * ScaleIntensityRange(-175, 250, 0.0, 1.0, clip=True)(torch.from_numpy(hu)[None]) - 1
    for name in ("embed", "fullres"):
        torch.testing.assert_close(seen[name][0].float(), torch.as_tensor(authors).float(), rtol=0, atol=1e-5)
    assert seen["embed"].min() >= -1 and seen["embed"].max() <= 1


def test_chaos_normalization_equals_the_authors() -> None:
    """Per channel: MONAI ScaleIntensityRangePercentiles(0.5, 99.5 -> [0, 1], clip), then (x - mean) / std of the
    voxels > 0 (the authors' CleverStats, torch's unbiased std), through the scheme nnU-Net's preprocessor uses."""
    from monai.transforms import ScaleIntensityRangePercentiles

    from pumit_nnunet.nnunet.recipe_normalization import register

    scheme = register()(use_mask_for_norm=False, intensityproperties={})
    rng = np.random.default_rng(1)
    image = np.concatenate([rng.gamma(2.0, 150.0, size=(1, 12, 40, 40)), rng.normal(300, 90, size=(1, 12, 40, 40))])
    image[:, :, :5] = 0  # background outside the body
    ours = np.stack([scheme.run(channel.copy()) for channel in image])
    scaled = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)(torch.from_numpy(image))
    scaled = torch.as_tensor(scaled).double()
    expected = torch.stack([(v - v[v > 0].mean()) / v[v > 0].std() for v in scaled])
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert ours.dtype == np.float32


def test_normalization_scheme_is_found_by_nnunet_in_a_fresh_interpreter() -> None:
    """nnU-Net resolves plans' scheme names only in its own module: the start-up hook adds ours there in every
    interpreter (the preprocessing/prediction workers are fresh ``spawn`` interpreters)."""
    code = ("from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme\n"
            "from nnunetv2.utilities.find_class_by_name import recursive_find_python_class\n"
            "import nnunetv2, os\n"
            "cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], 'preprocessing', 'normalization'), "
            "'PumitPercentileZScoreNormalization', 'nnunetv2.preprocessing.normalization')\n"
            "print(cls.__name__ if cls else None)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "PumitPercentileZScoreNormalization"


# -- crop sampling ------------------------------------------------------------------------------------------------
def _crop_dataset(tmp_path):
    """One preprocessed case (nnU-Net's numpy format): 1 x 24 x 64 x 64, two small organs in opposite corners."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    seg = np.zeros((1, 24, 64, 64), dtype=np.int8)
    seg[0, 2:5, 2:7, 2:7] = 1
    seg[0, 18:22, 50:60, 50:60] = 2
    data = np.random.default_rng(0).normal(size=(1, 24, 64, 64)).astype(np.float32)
    locations = {k: np.argwhere(seg == k) for k in (1, 2)}  # rows (channel, d, h, w), as nnU-Net's preprocessor
    properties = {"class_locations": locations, "spacing": [3.0, 0.75, 0.75], "shape_before_cropping": seg.shape[1:],
                  "bbox_used_for_cropping": [[0, 24], [0, 64], [0, 64]], "shape_after_cropping_and_before_resampling": seg.shape[1:]}
    nnUNetDatasetNumpy.save_case(data, seg, properties, str(tmp_path / "case0"))
    return nnUNetDatasetNumpy(str(tmp_path)), seg[0]


def _loader(dataset, probability: float, patch=(8, 16, 16), initial=(8, 24, 24)):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from pumit_nnunet.nnunet.recipe_crops import AuthorsCropDataLoader

    labels = LabelManager({"background": 0, "a": 1, "b": 2}, regions_class_order=None)
    return AuthorsCropDataLoader(dataset, 1, list(initial), list(patch), labels, transforms=None,
                                 balanced_probability=probability)


@pytest.mark.parametrize("probability", [0.75, 0.0])
def test_crop_sampler_draws_class_balanced_crops_at_the_stated_odds(tmp_path, probability: float) -> None:
    """BTCV odds uniform:class-balanced 1:3 (CHAOS 1:0). A balanced crop centres the final patch on a voxel of a
    class drawn uniformly among the present foreground classes (shifted inside the image); uniform crops are
    nnU-Net's random boxes, which here almost never reach the two small organs."""
    from pumit_nnunet.nnunet.recipe_crops import inside_center

    dataset, seg = _crop_dataset(tmp_path)
    loader = _loader(dataset, probability)
    properties = dataset.load_case("case0")[3]
    np.random.seed(1234)
    n, final = 4000, np.array([8, 16, 16])
    draws = {True: [], False: []}  # per crop kind: which organs the final patch contains
    for _ in range(n):
        force = loader.get_do_oversample(0)
        lbs, ubs = loader.get_bbox(seg.shape, force, properties["class_locations"])
        centre = (np.array(lbs) + np.array(ubs)) // 2
        assert centre.tolist() == inside_center(centre, seg.shape, final)  # the final patch lies inside the image
        start = centre - final // 2
        crop = seg[tuple(slice(s, s + p) for s, p in zip(start, final))]
        draws[bool(force)].append(((crop == 1).any(), (crop == 2).any()))
    balanced = np.array(draws[True], dtype=bool).reshape(-1, 2)
    assert abs(len(balanced) / n - probability) <= 4 * np.sqrt(probability * (1 - probability) / n) + 1e-12
    if probability > 0:  # each balanced crop holds the organ drawn; the two organs are drawn 1:1
        assert (balanced.sum(axis=1) == 1).all()
        assert abs(balanced[:, 0].mean() - 0.5) <= 4 * np.sqrt(0.25 / len(balanced))
    uniform = np.array(draws[False], dtype=bool).reshape(-1, 2)
    assert uniform.any(axis=1).mean() < 0.15  # random boxes rarely reach two small corner organs


def test_crop_loader_yields_full_batches(tmp_path) -> None:
    dataset, _ = _crop_dataset(tmp_path)
    loader = _loader(dataset, 0.75, patch=(8, 16, 16), initial=(8, 16, 16))
    np.random.seed(0)
    batch = loader.generate_train_batch()
    assert tuple(batch["data"].shape) == (1, 1, 8, 16, 16) and tuple(batch["target"].shape) == (1, 1, 8, 16, 16)
    with pytest.raises(ValueError):
        _loader(dataset, 1.5)


def test_recipe_settings_validate_and_resolve() -> None:
    assert RecipeSettings(AUTHORS, crop_weights=(1, 3)).balanced_crop_probability == 0.75
    assert RecipeSettings(AUTHORS, crop_weights=(1, 0)).balanced_crop_probability == 0.0
    with pytest.raises(ValueError):
        RecipeSettings("monai")
    with pytest.raises(ValueError):
        RecipeSettings(AUTHORS, crop_weights=(0, 0))
    assert recipe_settings(None).name == NNUNET and recipe_settings(None, AUTHORS).name == AUTHORS


# -- augmentation -------------------------------------------------------------------------------------------------
def test_authors_augmentation_is_deterministic_picklable_and_keeps_labels() -> None:
    """The MONAI/batchgeneratorsv2 pipeline: final patch from the larger crop, labels stay labels, rotation only
    about the depth axis, seeded by numpy (nnU-Net seeds its workers), and picklable for nnU-Net's DA workers."""
    from pumit_nnunet.nnunet.recipe_augment import authors_augmentation, first_axis_rotation
    from pumit_nnunet.nnunet.recipe_trainer import authors_initial_patch

    final = [8, 32, 32]
    initial = authors_initial_patch(final, (-0.3, 0.4))
    assert initial == [8, 64, 64]  # ceil(sqrt(2) * 32 * 1.4)
    image = torch.linspace(0, 1, int(np.prod(initial))).reshape(1, *initial)
    seg = _labels((1, 1, *initial))[0].to(torch.int16)
    pipeline = pickle.loads(pickle.dumps(authors_augmentation(final, (-0.3, 0.4))))

    def run(seed: int):
        np.random.seed(seed)
        out = pipeline(image=image.clone(), segmentation=seg.clone())
        return out["image"], out["segmentation"]

    outputs = [run(s) for s in range(12)]
    for img, lab in outputs:
        assert tuple(img.shape) == (1, *final) and tuple(lab.shape) == (1, *final)
        assert set(torch.unique(lab).tolist()) <= {0, 1, 2} and lab.dtype == torch.int16
        assert torch.isfinite(img).all()
    again = run(5)
    torch.testing.assert_close(again[0], outputs[5][0])
    assert torch.equal(again[1], outputs[5][1])
    assert len({round(float(img.sum()), 3) for img, _ in outputs}) > 6  # random, not constant
    np.random.seed(0)
    assert first_axis_rotation(dim=1) == first_axis_rotation(dim=2) == 0.0
    assert all(abs(first_axis_rotation(dim=0)) <= np.pi / 2 for _ in range(100))


# -- decoder ------------------------------------------------------------------------------------------------------
def test_authors_decoder_norm_init_and_bias() -> None:
    """Authors' recipe: InstanceNorm without affine, transposed convs with bias, Kaiming-normal fan-out init of the
    laterals and inner stages; nnU-Net's recipe keeps the default (affine norms, no up bias)."""
    from pumit_nnunet.models.segmentation import PumitSegNet

    torch.manual_seed(0)
    authors = recipe_arch_overrides(RecipeSettings(AUTHORS), None)
    assert recipe_arch_overrides(RecipeSettings(NNUNET), {"decoder": "lite"}) == {"decoder": "lite"}
    nets = {name: PumitSegNet(1, 3, True, patch_size=[16, 64, 64], aniso_d=2, vit="T", **kwargs)
            for name, kwargs in (("authors", authors), ("nnunet", {}))}
    norms = {n: [m for m in net.decoder.modules() if isinstance(m, torch.nn.InstanceNorm3d)] for n, net in nets.items()}
    ups = {n: [m for m in net.decoder.modules() if isinstance(m, torch.nn.ConvTranspose3d)] for n, net in nets.items()}
    assert norms["authors"] and not any(m.affine for m in norms["authors"]) and all(m.affine for m in norms["nnunet"])
    assert all(m.bias is not None for m in ups["authors"]) and all(m.bias is None for m in ups["nnunet"])
    conv = nets["authors"].decoder.stages[0].convs[0][0]  # a 512-channel 3x3x3 conv of the inner decoder
    fan_out = int(np.prod(conv.kernel_size)) * conv.out_channels
    assert float(conv.weight.detach().std()) == pytest.approx(np.sqrt(2 / fan_out), rel=0.02)
    assert float(nets["nnunet"].decoder.stages[0].convs[0][0].weight.detach().std()) != pytest.approx(np.sqrt(2 / fan_out), rel=0.1)


# -- presets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["btcv", "chaos"])
def test_presets_state_their_recipe_and_what_differs(name: str) -> None:
    from pumit_nnunet.nnunet.presets import load_preset

    preset = load_preset(name)
    assert preset.protocol.recipe == AUTHORS
    assert "authors' fine-tuning recipe" in preset.description and "Still differs from the paper" in preset.description
    assert "PumitTrainer_nnunet" in preset.description
    assert preset.protocol.crop_weights == ((1.0, 3.0) if name == "btcv" else (1.0, 0.0))


def test_plan_help_lists_each_preset_with_its_recipe(cli_main, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plan", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps; compare unwrapped
    assert "btcv [recipe: authors]" in text and "chaos [recipe: authors]" in text
    assert "pretraining-match [recipe: nnunet]" in text and text.count("Still differs from the paper") == 2
