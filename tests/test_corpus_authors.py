"""The corpus follows the authors: natural crop, anti-aliased resize, b0 weight, scale range,
per-channel contrast, random depth slab. Each compared with an independent reference computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d
from scipy.special import erf

from pumit_nnunet.corpus.augment import intensity_augment, plan_crop
from pumit_nnunet.corpus.catalog import duplicate_group_weight, load_catalog, sequence_weights
from pumit_nnunet.corpus.discover import discover_layout
from pumit_nnunet.corpus.preprocess import crop_foreground, resize_inplane
from pumit_nnunet.corpus.sampler import MIM_CROP, BucketBatchSampler


def _erf_kernel(sigma: float, truncated: float = 4.0) -> np.ndarray:
    tail = int(max(sigma * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=np.float64)
    k = 0.5 * (erf((x + 0.5) / (sigma * np.sqrt(2))) - erf((x - 0.5) / (sigma * np.sqrt(2))))
    return k / k.sum()


def test_resize_is_gaussian_antialiasing_then_area():
    rng = np.random.default_rng(0)
    array = rng.random((1, 2, 1024, 1536)).astype(np.float32)
    resized, spacing = resize_inplane(array, (3.0, 0.5, 0.5))
    assert resized.shape == (1, 2, 512, 768) and spacing == (3.0, 1.0, 1.0)
    sigma = (1024 / 512 - 1) / 2  # skimage's default, as MONAI Resize(anti_aliasing=True)
    smooth = correlate1d(correlate1d(array.astype(np.float64), _erf_kernel(sigma), axis=2, mode="constant"),
                         _erf_kernel(sigma), axis=3, mode="constant")
    expected = smooth.reshape(1, 2, 512, 2, 768, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(resized, expected, atol=2e-5)
    plain = array.reshape(1, 2, 512, 2, 768, 2).mean(axis=(3, 5))
    assert np.abs(resized - plain).mean() > 1e-3  # the smoothing is really applied


def test_natural_crop_keeps_pixels_where_all_channels_are_positive():
    image = np.zeros((3, 1, 20, 30), np.uint8)
    image[0, 0, 2:18, 3:27] = 200  # red only: "any" would keep this box
    image[:, 0, 5:12, 8:20] = 100  # all three channels
    assert crop_foreground(image, natural=True).shape == (3, 1, 7, 12)


def test_b0_volume_keeps_weight_one():
    assert sequence_weights(7, b0_first=True) == [1.0] + [duplicate_group_weight(6)] * 6
    assert sequence_weights(7) == [duplicate_group_weight(7)] * 7
    catalog = load_catalog()
    assert catalog["BrainPTM-2021"].sequence_4d == "b0+duplicates"


def test_ixi_dti_b0_file_keeps_weight_one(tmp_path):
    folder = tmp_path / "IXI-DTI"
    folder.mkdir()
    for i in range(4):
        (folder / f"IXI002-Guys-0828-DTI-{i:02d}.nii.gz").write_bytes(b"x")
    items = {i.key.rsplit("-", 1)[-1]: i.weight for i in discover_layout(tmp_path, load_catalog()["IXI"])}
    assert items == {"00": 1.0, "01": duplicate_group_weight(3), "02": duplicate_group_weight(3),
                     "03": duplicate_group_weight(3)}


def test_inplane_scale_of_small_images_is_the_authors_numpy_draw():
    shapes = np.array([[40, 96, 100], [40, 400, 400]])
    sampler = BucketBatchSampler(shapes, np.ones((2, 3)), np.ones(2, int), np.ones(2), MIM_CROP, 4, seed=3,
                                 block_size=4000)
    index, _, scale_x = sampler.draw_block(0)
    small = scale_x[(index == 0) & (scale_x != 1.0)]
    # numpy's uniform(0.75, 0.6) returns values in (0.6, 0.75]: below the 0.75 floor, never above it
    assert small.min() > 0.6 - 1e-9 and small.max() <= 0.75 and small.min() < 0.65
    large = scale_x[(index == 1) & (scale_x != 1.0)]
    assert large.min() >= 0.75 and large.max() <= 400 / 160


def test_contrast_uses_each_channels_mean():
    x = torch.stack([torch.full((2, 4, 4), 0.2), torch.linspace(0.5, 0.9, 32).reshape(2, 4, 4)])
    for seed in range(200):
        rng = np.random.default_rng(seed)
        u = np.random.default_rng(seed).random(7)
        if u[2] < 0.15 and u[0] >= 0.15 and u[4] >= 0.3:  # contrast only
            factor = 0.75 + 0.5 * u[3]
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            expected = ((x - mean) * factor + mean).clamp(0, 1)
            torch.testing.assert_close(intensity_augment(x.clone(), rng), expected)
            assert torch.allclose(intensity_augment(x.clone(), np.random.default_rng(seed))[0], x[0])
            return
    pytest.fail("no seed drew the contrast branch alone")


def test_random_slab_changes_where_depth_crops_fall():
    depth, crop, slab = 300, 80, MIM_CROP.max_slices
    assert slab == 120
    starts = np.array([plan_crop(np.random.default_rng(s), (depth, 200, 200), (crop, 160, 160), (1, 1, 1),
                                 quasi_isotropic=False, augment=False, max_slices=slab).start[0] for s in range(4000)])
    # slab first slice ~ randint(300 - 120), crop inside it ~ U[0, 40]: starts stay in [0, 219] (not [0, 220])
    assert starts.min() >= 0 and starts.max() <= depth - slab - 1 + slab - crop
    edges, middle = np.mean(starts < 20), np.mean((starts >= 100) & (starts < 120))
    assert middle > 1.5 * edges  # trapezoid: the first slices are rarer than under a uniform start
    plan = plan_crop(np.random.default_rng(0), (60, 200, 200), (crop, 160, 160), (1, 1, 1), quasi_isotropic=False,
                     augment=False, max_slices=slab)
    assert plan.slab is None  # shallower than the slab: the whole depth
