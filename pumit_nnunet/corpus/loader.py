"""The pre-training loader: bucketed batches of augmented crops from a corpus store, per rank, resumable.

The sampler runs in the main process and hands ``BatchSpec``s to a torch ``DataLoader`` (``batch_size=None``),
whose workers read and augment whole batches. Every random choice of a batch comes from a generator seeded by
``(seed, global batch number)``, so the stream does not depend on the number of workers. The loader remembers
the sampler state after each batch it has handed out; ``state_dict()`` returns the one after the last consumed
batch, which is exactly where a restarted loader continues.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing
from pumit_nnunet.corpus.augment import extract_crop, intensity_augment, plan_crop
from pumit_nnunet.corpus.sampler import (MIM_CROP, NO_SCALE, TOKENIZER_CROP, BatchSpec, BucketBatchSampler, CropGrid,
                                         ScaleAugmentation, quasi_isotropic)
from pumit_nnunet.corpus.store import array_path, open_array, read_manifest

__all__ = ["CropGrid", "TOKENIZER_CROP", "MIM_CROP", "PretrainBatch", "PretrainLoader", "build_pretrain_loader",
           "load_validation_images"]
STATE_VERSION = 1
_OPEN_CACHE = 64


@dataclass
class PretrainBatch:
    """One homogeneous batch: same aniso_d, same shape, same channel count."""

    image: torch.Tensor  # (B, C, D, H, W) float32 in [0, 1]
    aniso_d: int
    keys: list[str]


def select_rows(store: str | os.PathLike, split: str):
    """Manifest rows of converted images in ``split`` ("train", "val" or "all")."""
    frame = read_manifest(store)
    frame = frame[frame["status"] == "ok"]
    if split != "all":
        frame = frame[frame["split"] == split]
    if frame.empty:
        raise ValueError(f"store {store} has no converted images in split {split!r}")
    return frame.reset_index(drop=True)


class StoreCropReader:
    """Reads and augments the crops of a ``BatchSpec`` (runs in loader workers; keeps a few arrays open)."""

    def __init__(self, store: str | os.PathLike, frame, seed: int, augment: bool) -> None:
        self.store, self.seed, self.augment = Path(store), seed, augment
        self.keys = frame["key"].tolist()
        self.levels = frame["levels"].to_numpy()
        self.shapes = frame[["shape_d", "shape_h", "shape_w"]].to_numpy()
        self.quasi = quasi_isotropic(frame[["spacing_d", "spacing_h", "spacing_w"]].to_numpy())
        self._open: OrderedDict[int, object] = OrderedDict()

    def _array(self, image: int):
        if image not in self._open:
            self._open[image] = open_array(array_path(self.store, self.keys[image]))
            if len(self._open) > _OPEN_CACHE:
                self._open.popitem(last=False)
        self._open.move_to_end(image)
        return self._open[image]

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, int, list[str]]:
        rng = np.random.default_rng([self.seed, 1, spec.index])
        crops = []
        for image, scale_z, scale_x in spec.entries:
            scale = (1.0 if spec.crop[0] == 1 else scale_z, scale_x, scale_x)
            plan = plan_crop(rng, self.shapes[image], spec.crop, scale, quasi_isotropic=bool(self.quasi[image]),
                             augment=self.augment)
            crop = extract_crop(self._array(image), plan, int(self.levels[image]))
            crops.append(intensity_augment(crop, rng) if self.augment else crop)
        return torch.stack(crops), spec.aniso_d, [self.keys[i] for i, _, _ in spec.entries]


class _SpecStream:
    """The DataLoader's sampler: the loader's spec generator (re-created per epoch, which never ends)."""

    def __init__(self, loader: "PretrainLoader") -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[BatchSpec]:
        return self.loader._specs()


def _worker_init(_: int) -> None:
    import blosc2

    blosc2.set_nthreads(1)  # workers are the parallelism; blosc2 threads would oversubscribe the cores
    torch.set_num_threads(1)


class PretrainLoader:
    """Infinite iterator of ``PretrainBatch`` for one rank; exact resume through ``state_dict``."""

    def __init__(self, reader: StoreCropReader, sampler: BucketBatchSampler, num_workers: int = 0) -> None:
        self.reader, self.sampler, self.num_workers = reader, sampler, num_workers
        self._consumed = sampler.state_dict()
        self._issued: deque[dict] = deque()

    def _specs(self) -> Iterator[BatchSpec]:
        for spec in self.sampler:
            self._issued.append(self.sampler.state_dict())
            yield spec

    def __iter__(self) -> Iterator[PretrainBatch]:
        from torch.utils.data import DataLoader

        self.sampler.load_state_dict(self._consumed)
        self._issued.clear()
        if self.num_workers > 0:
            batches = iter(DataLoader(self.reader, batch_size=None, sampler=_SpecStream(self), num_workers=self.num_workers,
                                      worker_init_fn=_worker_init, prefetch_factor=2))
        else:
            batches = map(self.reader.__getitem__, self._specs())
        for image, aniso_d, keys in batches:
            self._consumed = self._issued.popleft()
            yield PretrainBatch(image, int(aniso_d), list(keys))

    def state_dict(self) -> dict:
        s = self.sampler
        return {"version": STATE_VERSION, "seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                "batch_size": s.batch_size, "num_images": len(s.probabilities), "sampler": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        expected = {"version": STATE_VERSION, "seed": s.seed, "rank": s.rank, "world_size": s.world_size,
                    "batch_size": s.batch_size, "num_images": len(s.probabilities)}
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"loader state does not match this loader (saved, current): {mismatched}")
        self._consumed = dict(state["sampler"])


def build_pretrain_loader(store: str | os.PathLike, batch_size: int, crop: CropGrid, *, seed: int, rank: int = 0,
                          world_size: int = 1, num_workers: int = 0, augment: bool = True, split: str = "train",
                          scale: ScaleAugmentation | None = None, block_size: int = 16384) -> PretrainLoader:
    """The loader of one rank. ``augment=False`` also switches the scale augmentation off (unless ``scale``)."""
    frame = select_rows(store, split)
    sampler = BucketBatchSampler(
        frame[["shape_d", "shape_h", "shape_w"]].to_numpy(), frame[["spacing_d", "spacing_h", "spacing_w"]].to_numpy(),
        frame["channels"].to_numpy(), frame["weight"].to_numpy() * frame["multiplier"].to_numpy(), crop, batch_size,
        seed=seed, rank=rank, world_size=world_size, block_size=block_size,
        scale=scale if scale is not None else (ScaleAugmentation() if augment else NO_SCALE))
    return PretrainLoader(StoreCropReader(store, frame, seed, augment), sampler, num_workers)


def _center_fit(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Centre-crop or zero-pad ``x`` along ``axis`` to ``size``."""
    current = x.shape[axis]
    if current > size:
        start = (current - size) // 2
        return x.narrow(axis, start, size)
    pad = [0, 0] * (x.dim() - axis - 1) + [(size - current) // 2, size - current - (size - current) // 2]
    return torch.nn.functional.pad(x, pad) if current < size else x


def load_validation_images(store: str | os.PathLike, crop: CropGrid, max_images: int | None = None
                           ) -> list[tuple[str, str, torch.Tensor, int]]:
    """The held-out images (one per dataset and modality): depth fitted to ``crop`` at their aniso_d, in-plane
    zero-padded to a multiple of the stride. Returns (key, modality, image (C, D, H, W) in [0, 1], aniso_d)."""
    frame = select_rows(store, "val").sort_values("key")
    if max_images is not None:
        frame = frame.head(max_images)
    out = []
    for row in frame.itertuples(index=False):
        is_2d = row.shape_d == 1
        aniso_d = MAX_ANISO_D if is_2d else aniso_d_from_spacing((row.spacing_d, row.spacing_h, row.spacing_w))
        array = open_array(array_path(Path(store), row.key))
        image = torch.from_numpy(np.asarray(array[...], dtype=np.float32)) / int(row.levels)
        image = _center_fit(image, 1, crop.shape(aniso_d, is_2d)[0])
        for axis in (2, 3):
            image = _center_fit(image, axis, -(-image.shape[axis] // crop.stride) * crop.stride)
        out.append((row.key, row.modality, image.contiguous(), aniso_d))
    return out
