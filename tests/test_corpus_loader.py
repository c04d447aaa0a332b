"""The pre-training loader on a store converted from real demo images: shapes, determinism, ranks, resume."""

from __future__ import annotations

import io
import itertools
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pumit_nnunet.corpus.augment import plan_crop
from pumit_nnunet.corpus.convert import convert
from pumit_nnunet.corpus.loader import (MIM_CROP, TOKENIZER_CROP, CropGrid, PretrainBatch, StoreCropReader,
                                        build_pretrain_loader, load_validation_images, select_rows)
from pumit_nnunet.corpus.sampler import BatchSpec
from pumit_nnunet.corpus.store import member_path, open_array, read_manifest

sitk.ProcessObject.SetGlobalWarningDisplay(False)
SMALL = CropGrid(2, 4)  # 32 in-plane, depth 32 >> aniso_d: keeps the CPU tests fast


@pytest.fixture(scope="module")
def store(real_demo_dir, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "demo"
    raw.mkdir()
    shrink = {"Dataset901_RealBrainMaskT1/imagesTr/mni152_2009a_0000.nii.gz": (3, 3, 3),
              "Dataset901_RealBrainMaskT1/imagesTr/mni152_coronal_0000.nii.gz": (2, 2, 1),
              "Dataset902_RealCTLungNodule/imagesTr/lung1_0000.nii.gz": (4, 4, 1),
              "Dataset902_RealCTLungNodule/imagesTr/lung2_0000.nii.gz": (4, 4, 1)}
    for relative, factors in shrink.items():
        sitk.WriteImage(sitk.Shrink(sitk.ReadImage(str(real_demo_dir / relative)), factors),
                        str(raw / relative.split("/")[-1]))
    for name in ("retina.jpg", "microaneurysms.png", "693_UNCI.dcm"):
        shutil.copy(real_demo_dir / "extras_2d_demo" / name, raw / name)
    out = tmp_path_factory.mktemp("store") / "corpus"
    report = convert([raw], out, progress=False)
    assert report.converted == 7 and not report.failures
    return out


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _same(a: list[PretrainBatch], b: list[PretrainBatch]) -> bool:
    return all(x.keys == y.keys and x.aniso_d == y.aniso_d and torch.equal(x.image, y.image) for x, y in zip(a, b)) \
        and len(a) == len(b)


def test_batches_are_homogeneous_and_shaped_by_the_crop_grid(store):
    loader = build_pretrain_loader(store, 3, SMALL, seed=0, split="all", block_size=64)
    frame = read_manifest(store).set_index("key")
    seen = set()
    for batch in _take(loader, 30):
        b, c, d, h, w = batch.image.shape
        is_2d = d == 1
        assert (b, d, h, w) == (3, *SMALL.shape(batch.aniso_d, is_2d))
        assert c == (3 if frame.loc[batch.keys[0], "channels"] == 3 else 1)
        assert {int(frame.loc[k, "channels"]) for k in batch.keys} == {c}
        assert batch.image.dtype == torch.float32 and 0.0 <= float(batch.image.min()) <= float(batch.image.max()) <= 1.0
        seen.add(batch.aniso_d)
    assert {0, 5} <= seen and seen & {1, 2}


def test_default_grids_give_the_paper_crop_sizes(store):
    batch = next(iter(build_pretrain_loader(store, 1, MIM_CROP, seed=1, split="all", augment=False)))
    assert batch.image.shape[-2:] == (160, 160) and batch.image.shape[2] == MIM_CROP.shape(batch.aniso_d,
                                                                                          batch.image.shape[2] == 1)[0]


def test_sampling_weights_are_weight_times_multiplier(store):
    loader = build_pretrain_loader(store, 2, SMALL, seed=0, split="all")
    frame = select_rows(store, "all")
    expected = frame["weight"].to_numpy() * frame["multiplier"].to_numpy()
    np.testing.assert_allclose(loader.sampler.probabilities, expected / expected.sum())


def test_unaugmented_crops_are_numpy_slices_of_the_stored_image(store):
    frame = select_rows(store, "all")
    reader = StoreCropReader(store, frame, seed=7, augment=False)
    image = int(frame.index[frame["key"] == "demo/lung1_0000"][0])
    spec = BatchSpec(index=11, aniso_d=2, crop=(8, 32, 32), entries=((image, 1.0, 1.0), (image, 1.0, 1.0)))
    crops, aniso_d, keys, broken = reader[spec]
    rng = np.random.default_rng([7, 1, 11])
    stored = open_array(member_path(store, frame.loc[image]))[...]
    levels = int(frame.loc[image, "levels"])
    for crop in crops:
        plan = plan_crop(rng, stored.shape[1:], (8, 32, 32), (1.0, 1.0, 1.0), quasi_isotropic=False, augment=False)
        (z, y, x), expected = plan.start, np.zeros((1, 8, 32, 32), np.float32)
        part = stored[:, max(z, 0):z + 8, max(y, 0):y + 32, max(x, 0):x + 32] / levels
        expected[:, max(-z, 0):max(-z, 0) + part.shape[1], max(-y, 0):max(-y, 0) + part.shape[2],
                 max(-x, 0):max(-x, 0) + part.shape[3]] = part
        np.testing.assert_allclose(crop.numpy(), expected, rtol=1e-6)
    assert aniso_d == 2 and keys == ["demo/lung1_0000"] * 2


def test_same_seed_same_stream(store):
    a = _take(build_pretrain_loader(store, 2, SMALL, seed=5, split="all", block_size=64), 8)
    b = _take(build_pretrain_loader(store, 2, SMALL, seed=5, split="all", block_size=64), 8)
    c = _take(build_pretrain_loader(store, 2, SMALL, seed=6, split="all", block_size=64), 8)
    assert _same(a, b) and not _same(a, c)


def test_ranks_interleave_the_single_process_stream(store):
    single = _take(build_pretrain_loader(store, 2, SMALL, seed=2, split="all", block_size=64), 8)
    ranks = [_take(build_pretrain_loader(store, 2, SMALL, seed=2, rank=r, world_size=2, split="all", block_size=64), 4)
             for r in range(2)]
    assert _same(ranks[0], single[0::2]) and _same(ranks[1], single[1::2])


def test_resume_continues_the_stream_through_a_saved_state(store):
    def make():
        return build_pretrain_loader(store, 2, SMALL, seed=3, split="all", block_size=64)

    reference = _take(make(), 10)
    first = make()
    head = _take(first, 4)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert _same(head + _take(resumed, 6), reference)
    with pytest.raises(ValueError, match="does not match"):
        build_pretrain_loader(store, 3, SMALL, seed=3, split="all").load_state_dict(first.state_dict())


def test_worker_processes_give_the_same_stream_and_resume(store):
    reference = _take(build_pretrain_loader(store, 2, SMALL, seed=4, split="all", block_size=64), 9)
    workers = build_pretrain_loader(store, 2, SMALL, seed=4, split="all", num_workers=2, block_size=64)
    head = _take(workers, 5)
    state = workers.state_dict()
    resumed = build_pretrain_loader(store, 2, SMALL, seed=4, split="all", num_workers=2, block_size=64)
    resumed.load_state_dict(state)
    assert _same(head + _take(resumed, 4), reference)


def test_validation_images_one_per_dataset_and_modality(store):
    images = load_validation_images(store, TOKENIZER_CROP)
    frame = read_manifest(store)
    val = frame[frame["split"] == "val"]
    assert len(images) == len(val) == val.groupby(["dataset", "modality"]).ngroups >= 1
    for key, modality, image, aniso_d in images:
        assert image.dim() == 4 and image.shape[2] % 16 == 0 and image.shape[3] % 16 == 0
        assert image.shape[1] == TOKENIZER_CROP.shape(aniso_d, image.shape[1] == 1)[0]
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert len(load_validation_images(store, TOKENIZER_CROP, max_images=1)) == 1
