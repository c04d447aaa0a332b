"""Pure parts of the corpus: catalog, preprocessing math, depth-axis rule, sampler statistics, crop geometry."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pumit_nnunet.anisotropy import aniso_d_from_spacing
from pumit_nnunet.corpus.augment import CropPlan, extract_crop, intensity_augment, plan_crop
from pumit_nnunet.corpus.catalog import duplicate_group_weight, glob_match, load_catalog
from pumit_nnunet.corpus.preprocess import (crop_foreground, dequantise, percentiles_above_min, preprocess_image,
                                            quantise)
from pumit_nnunet.corpus.readers import choose_depth_axis
from pumit_nnunet.corpus.sampler import MIM_CROP, TOKENIZER_CROP, BucketBatchSampler


# ------------------------------------------------------------------------------------------------------ catalog
def test_catalog_has_the_55_datasets_with_the_paper_multipliers():
    catalog = load_catalog()
    assert len(catalog) == 55
    assert catalog["CheXpert"].multiplier == 0.007 and catalog["IDRiD"].multiplier == 0.5
    assert catalog["BraTS2023-GLI"].multiplier == 0.4 and catalog["PI-CAI"].multiplier == 0.25
    assert catalog["TotalSegmentator"].multiplier == 1.0
    assert catalog["BraTS2023-SSA"].depth_axis == "S" and catalog["BrainPTM-2021"].depth_axis == "A"
    assert all(spec.citation and spec.licence and spec.modalities for spec in catalog.datasets.values())
    total = catalog["TotalSegmentator"]
    assert total.match("s0001/ct.nii.gz").modality == "CT"
    assert total.match("s0864/ct.nii.gz") is None and total.match("s0001/segmentations/liver.nii.gz") is None


def test_catalog_first_matching_pattern_wins():
    amos = load_catalog()["AMOS22"]
    assert amos.match("imagesTr/amos_0123.nii.gz").modality == "CT"
    assert amos.match("imagesVa/amos_0500.nii.gz").modality == "CT"
    assert amos.match("imagesTr/amos_0507.nii.gz").modality == "MRI"


@pytest.mark.parametrize("pattern, path, expected", [
    ("**/*.png", "a.png", True), ("**/*.png", "x/y/a.png", True), ("*.png", "x/a.png", False),
    ("s[0-9][0-9]/ct.nii.gz", "s01/ct.nii.gz", True), ("imagesTr/[!.]*.nii.gz", "imagesTr/._a.nii.gz", False),
])
def test_glob_match(pattern, path, expected):
    assert glob_match(pattern, path) is expected


@given(st.integers(1, 10_000))
def test_duplicate_group_weight_sums_to_two_minus_one_over_n(n):
    weight = duplicate_group_weight(n)
    assert math.isclose(n * weight, 2 - 1 / n)
    assert weight <= 1.0


# ------------------------------------------------------------------------------------------------ preprocessing
def test_percentiles_ignore_the_minimum_background():
    rng = np.random.default_rng(0)
    values = rng.normal(100, 10, size=1000)
    array = np.concatenate([np.full(5000, -1024.0), values])
    assert np.allclose(percentiles_above_min(array), np.percentile(values, [0.5, 99.5]))


def test_crop_foreground_matches_numpy_bounding_box():
    array = np.zeros((1, 10, 12, 14), dtype=np.int16)
    array[0, 2:7, 3:9, 4:13] = np.arange(5 * 6 * 9).reshape(5, 6, 9) + 10
    cropped = crop_foreground(array, natural=False)
    # the 0.5th percentile of the values above the background is about 10.2: the value-10 corner voxel goes,
    # the box stays the bounding box of the rest
    inside = array[0] > np.percentile(array[0][array[0] > 0], 0.5)
    idx = np.argwhere(inside)
    lo, hi = idx.min(0), idx.max(0) + 1
    np.testing.assert_array_equal(cropped[0], array[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    natural = crop_foreground(np.pad(np.ones((3, 1, 4, 5), np.uint8), ((0, 0), (0, 0), (2, 3), (1, 1))), natural=True)
    assert natural.shape == (3, 1, 4, 5)


@given(st.floats(-2000, 0), st.floats(1, 3000), st.sampled_from([255, 1000, 4095]))
@settings(max_examples=50, deadline=None)
def test_quantise_round_trip_error_is_half_a_level(low, width, levels):
    values = np.linspace(low - width, low + 2 * width, 257)
    x = dequantise(quantise(values, low, low + width, levels), levels)
    expected = np.clip((values - low) / width, 0, 1)
    assert x.min() >= 0 and x.max() <= 1
    # half a level, plus what float32 processing of the input can shift (values near |low| lose ~1 ulp each)
    float32_shift = 2 * float(np.spacing(np.float32(abs(low) + 2 * width))) / width
    np.testing.assert_allclose(x, expected, atol=0.5 / levels + float32_shift + 1e-6)


def test_preprocess_scales_percentiles_to_unit_range():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 3000, size=(1, 8, 16, 16)).astype(np.int16)
    out = preprocess_image(array, (2.0, 1.0, 1.0), natural=False)
    assert out.data.dtype == np.uint16 and out.levels <= 4095
    cropped = crop_foreground(array, natural=False)
    low, high = percentiles_above_min(cropped)
    expected = np.clip((cropped - low) / (high - low), 0, 1)
    np.testing.assert_allclose(dequantise(out.data, out.levels), expected, atol=0.5 / out.levels + 1e-6)
    rgb = preprocess_image(rng.integers(1, 256, size=(3, 1, 6, 7)).astype(np.uint8), (1e8, 1.0, 1.0), natural=True)
    assert rgb.levels == 255 and rgb.data.dtype == np.uint8


# ---------------------------------------------------------------------------------------------------- depth axis
def test_depth_axis_rules():
    eye = np.eye(3)
    assert choose_depth_axis((3.0, 2.0, 2.0), eye) == 0  # slice axis with equal in-plane spacing: metadata
    assert choose_depth_axis((2.0, 3.0, 2.0), eye) == 1  # coronal stack written in another order: anisotropy
    assert choose_depth_axis((0.7, 0.7, 5.0), eye) == 2
    assert choose_depth_axis((1.0, 1.0, 1.0), eye) == 0  # isotropic: keep the file's order
    # numpy axes (k, j, i): direction column a is the physical direction of numpy axis a (LPS)
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=float)  # axis 1 runs along S (z)
    assert choose_depth_axis((1.0, 1.0, 1.0), direction, "S") == 1
    assert choose_depth_axis((1.0, 1.0, 1.0), direction, "A") == 0


# ------------------------------------------------------------------------------------------------------- sampler
def _sampler(weights, *, rank=0, world_size=1, seed=0, batch_size=4, spacings=None, shapes=None, channels=None):
    n = len(weights)
    spacings = spacings if spacings is not None else np.tile([1.0, 1.0, 1.0], (n, 1))
    shapes = shapes if shapes is not None else np.tile([100, 200, 200], (n, 1))
    channels = channels if channels is not None else np.ones(n, dtype=int)
    return BucketBatchSampler(shapes, spacings, channels, np.asarray(weights, float), TOKENIZER_CROP, batch_size,
                              seed=seed, rank=rank, world_size=world_size, block_size=512)


def _mixed_sampler(**kwargs):
    spacings = np.array([[1.0, 1.0, 1.0], [5.0, 0.7, 0.7], [3.0, 1.0, 1.0], [1e8, 1.0, 1.0], [1e8, 1.0, 1.0]])
    shapes = np.array([[100, 200, 200], [40, 512, 512], [30, 200, 180], [1, 300, 400], [1, 600, 600]])
    return _sampler([1.0, 2.0, 1.0, 0.5, 0.5], spacings=spacings, shapes=shapes, channels=np.array([1, 1, 1, 1, 3]), **kwargs)


def test_sampler_honours_weights():
    weights = np.array([1.0, 2.0, 4.0, 0.5])
    sampler = _sampler(weights, batch_size=8)
    counts = np.zeros(len(weights))
    for spec in itertools.islice(sampler, 1500):
        for image, _, _ in spec.entries:
            counts[image] += 1
    np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.01)


def test_every_batch_is_one_aniso_d_one_shape_one_channel_count():
    sampler = _mixed_sampler()
    seen = set()
    for spec in itertools.islice(sampler, 300):
        aniso = {aniso_d_from_spacing(sampler.spacings[i], z, x) if sampler.shapes[i, 0] > 1 else 5
                 for i, z, x in spec.entries}
        assert aniso == {spec.aniso_d}
        assert len({int(sampler.channels[i]) for i, _, _ in spec.entries}) == 1
        assert spec.crop == TOKENIZER_CROP.shape(spec.aniso_d, spec.crop[0] == 1)
        seen.add(spec.aniso_d)
    assert {0, 2, 5} <= seen  # isotropic, 5 mm CT (ratio ~7), 2D


def test_crop_grid_depths_match_the_paper_table():
    # as the authors: depth tokens collapse to 1 once 2**aniso_d > 16, for volumes as for 2D images
    assert [TOKENIZER_CROP.shape(a)[0] for a in range(6)] == [64, 32, 16, 8, 4, 1]
    assert [MIM_CROP.shape(a)[0] for a in range(6)] == [80, 40, 20, 10, 5, 1]
    assert TOKENIZER_CROP.shape(5, is_2d=True) == (1, 128, 128) and MIM_CROP.shape(5, True) == (1, 160, 160)


def test_same_seed_same_stream_other_seed_other_stream():
    a = list(itertools.islice(_mixed_sampler(seed=3), 50))
    b = list(itertools.islice(_mixed_sampler(seed=3), 50))
    c = list(itertools.islice(_mixed_sampler(seed=4), 50))
    assert a == b and a != c


def test_ranks_are_disjoint_and_their_union_is_the_single_process_stream():
    single = list(itertools.islice(_mixed_sampler(), 60))
    world = 3
    per_rank = [list(itertools.islice(_mixed_sampler(rank=r, world_size=world), 20)) for r in range(world)]
    for r, stream in enumerate(per_rank):
        assert stream == single[r::world]
    indices = [spec.index for stream in per_rank for spec in stream]
    assert sorted(indices) == list(range(60))


def test_sampler_resume_continues_the_stream():
    reference = list(itertools.islice(_mixed_sampler(rank=1, world_size=2), 40))
    first = _mixed_sampler(rank=1, world_size=2)
    head = list(itertools.islice(first, 17))
    resumed = _mixed_sampler(rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    assert head + list(itertools.islice(resumed, 23)) == reference


# -------------------------------------------------------------------------------------------------- crop geometry
def _volume(shape=(12, 20, 24), channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, size=(channels, *shape)).astype(np.uint16)


def test_unscaled_crop_is_a_numpy_slice_with_zero_padding():
    array = _volume()
    plan = CropPlan(start=(-2, 5, 20), scale=(1.0, 1.0, 1.0), out_shape=(6, 8, 8))
    crop = extract_crop(array, plan, levels=1000).numpy()
    expected = np.zeros((1, 6, 8, 8), np.float32)
    expected[:, 2:, :, :4] = array[:, 0:4, 5:13, 20:24] / 1000
    np.testing.assert_allclose(crop, expected, rtol=1e-6)


def test_scale_two_crop_is_the_2x2x2_block_mean():
    array = _volume(shape=(16, 32, 32))
    plan = CropPlan(start=(2, 4, 6), scale=(2.0, 2.0, 2.0), out_shape=(6, 12, 12))
    crop = extract_crop(array, plan, levels=1000).numpy()
    box = array[:, 2:14, 4:28, 6:30].astype(np.float64) / 1000
    expected = box.reshape(1, 6, 2, 12, 2, 12, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(crop, expected, atol=1e-5)


def test_rotation_by_a_right_angle_about_depth_is_rot90_in_plane():
    array = _volume(shape=(4, 10, 10))
    plan = CropPlan(start=(0, 1, 1), scale=(1.0, 1.0, 1.0), out_shape=(4, 8, 8), rotation=(math.pi / 2, 0.0, 0.0))
    crop = extract_crop(array, plan, levels=1000).numpy()
    straight = array[:, :, 1:9, 1:9] / 1000
    np.testing.assert_allclose(crop, np.rot90(straight, k=-1, axes=(2, 3)), atol=1e-5)


def test_planned_crops_stay_inside_and_rotate_only_quasi_isotropic_off_plane():
    rng = np.random.default_rng(0)
    plans = [plan_crop(rng, (10, 300, 300), (8, 128, 128), (1.0, 1.5, 1.5), quasi_isotropic=False, augment=True)
             for _ in range(200)]
    assert all(p.rotation[1:] == (0.0, 0.0) for p in plans)
    assert any(p.rotation[0] != 0.0 for p in plans) and all(abs(p.rotation[0]) <= math.pi / 2 for p in plans)
    assert all(0 <= p.start[1] <= 300 - 192 and 0 <= p.start[0] <= 2 for p in plans)
    iso = [plan_crop(rng, (64, 64, 64), (64, 128, 128), (1.0, 1.0, 1.0), quasi_isotropic=True, augment=True)
           for _ in range(200)]
    assert any(p.rotation[1] != 0.0 for p in iso) and all(abs(p.rotation[1]) <= math.pi / 6 for p in iso)
    assert all(-64 <= p.start[1] <= 0 for p in iso)  # smaller image: padded, then cropped


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_intensity_augmentation_stays_in_unit_range(seed):
    x = torch.from_numpy(np.random.default_rng(seed).random((1, 4, 8, 8), dtype=np.float32))
    y = intensity_augment(x, np.random.default_rng(seed))
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
