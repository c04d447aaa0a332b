"""The pre-training loader: bucketed batches of augmented crops from a corpus store, per rank, resumable.

The sampler runs in the main process and hands ``BatchSpec``s to a torch ``DataLoader`` (``batch_size=None``),
whose workers read and augment whole batches. Every random choice of a batch comes from a generator seeded by
``(seed, global batch number)``, so the stream does not depend on the number of workers. The loader remembers
the sampler state after each batch it has handed out; ``state_dict()`` returns the one after the last consumed
batch, which is exactly where a restarted loader continues.

A stored image that cannot be read (truncated, corrupted, deleted) must not end a long run: its crops are
replaced by crops of the other images of the same batch, the loader reports it once on stderr, and counts the
replaced crops in ``PretrainLoader.skipped`` (also ``PretrainBatch.skipped``) for the progress line. Every
worker process finds a broken file on its own (one failed read each); the count is of replaced crops, made
by the main process from what the workers return, so it is the same for any number of workers.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing
from pumit_nnunet.corpus.augment import CropPlan, extract_crop, intensity_augment, plan_crop
from pumit_nnunet.corpus.sampler import (MIM_CROP, NO_SCALE, TOKENIZER_CROP, BatchSpec, BucketBatchSampler, CropGrid,
                                         ScaleAugmentation, quasi_isotropic)
from pumit_nnunet.corpus.store import member_path, open_array, read_manifest
from pumit_nnunet.errors import DataError

__all__ = ["CropGrid", "TOKENIZER_CROP", "MIM_CROP", "PretrainBatch", "PretrainLoader", "build_pretrain_loader",
           "load_validation_images"]
STATE_VERSION = 1
_OPEN_CACHE = 64
#: consecutive batches without one readable crop after which the store is declared unusable
MAX_EMPTY_BATCHES = 100


@dataclass
class PretrainBatch:
    """One homogeneous batch: same aniso_d, same shape, same channel count."""

    image: torch.Tensor  # (B, C, D, H, W) float32 in [0, 1]
    aniso_d: int
    keys: list[str]
    skipped: int = 0  # crops replaced so far in this run because their stored image was unreadable


def select_rows(store: str | os.PathLike, split: str):
    """Manifest rows of converted images in ``split`` ("train", "val" or "all")."""
    frame = read_manifest(store)
    frame = frame[frame["status"] == "ok"]
    if split != "all":
        frame = frame[frame["split"] == split]
    if frame.empty:
        raise DataError(f"no converted images in split {split!r}", store)
    return frame.reset_index(drop=True)


class StoreCropReader:
    """Reads and augments the crops of a ``BatchSpec`` (runs in loader workers; keeps a few arrays open)."""

    def __init__(self, store: str | os.PathLike, frame, seed: int, augment: bool, max_slices: int | None = None
                 ) -> None:
        self.store, self.seed, self.augment, self.max_slices = Path(store), seed, augment, max_slices
        self.keys = frame["key"].tolist()
        self.paths = [member_path(store, row) for row in frame.itertuples(index=False)]
        self._broken: dict[int, str] = {}
        self.levels = frame["levels"].to_numpy()
        self.shapes = frame[["shape_d", "shape_h", "shape_w"]].to_numpy()
        self.quasi = quasi_isotropic(frame[["spacing_d", "spacing_h", "spacing_w"]].to_numpy())
        self._open: OrderedDict[int, object] = OrderedDict()

    def _array(self, image: int):
        if image not in self._open:
            self._open[image] = open_array(self.paths[image])
            if len(self._open) > _OPEN_CACHE:
                self._open.popitem(last=False)
        self._open.move_to_end(image)
        return self._open[image]

    def _plan(self, rng: np.random.Generator, spec: BatchSpec, image: int, scale_z: float, scale_x: float) -> CropPlan:
        scale = (1.0 if spec.crop[0] == 1 else scale_z, scale_x, scale_x)
        return plan_crop(rng, self.shapes[image], spec.crop, scale, quasi_isotropic=bool(self.quasi[image]),
                         augment=self.augment, max_slices=self.max_slices)

    def _try_crop(self, rng, spec: BatchSpec, entry) -> torch.Tensor | None:
        """The augmented crop of one entry, or None when its stored image is unreadable. The crop is planned
        even then, so the random draws of the other crops do not depend on whether this worker process has
        already met the broken file (each worker finds it once on its own): the stream stays the same for
        any number of workers, and so does the count of replaced crops."""
        image = entry[0]
        plan = self._plan(rng, spec, *entry)
        if image in self._broken:
            return None
        try:
            crop = extract_crop(self._array(image), plan, int(self.levels[image]))
        except Exception as error:  # noqa: BLE001 - blosc2/OS errors of a broken member; the run goes on
            self._open.pop(image, None)
            self._broken[image] = " ".join(f"{type(error).__name__}: {error}".split())
            return None
        return intensity_augment(crop, rng) if self.augment else crop

    def __getitem__(self, spec: BatchSpec) -> tuple[torch.Tensor, int, list[str], list[tuple[str, str]]]:
        """(crops, aniso_d, keys, [(file, reason)] of unreadable entries); unreadable entries are replaced by the
        readable ones of the batch, in order, so the batch keeps its size (empty tensor when none is readable)."""
        rng = np.random.default_rng([self.seed, 1, spec.index])
        crops, keys, broken = [], [], []
        for entry in spec.entries:
            crop = self._try_crop(rng, spec, entry)
            if crop is None:
                broken.append((str(self.paths[entry[0]]), self._broken[entry[0]]))
            else:
                crops.append(crop)
                keys.append(self.keys[entry[0]])
        if not crops:
            return torch.empty(0), spec.aniso_d, [], broken
        fill = len(spec.entries) - len(crops)
        return (torch.stack(crops + [crops[i % len(crops)] for i in range(fill)]), spec.aniso_d,
                keys + [keys[i % len(keys)] for i in range(fill)], broken)


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
        #: crops replaced because their stored image was unreadable (print it in the progress line)
        self.skipped = 0
        #: unreadable stored files and why, each reported once on stderr
        self.broken: dict[str, str] = {}

    def _note_broken(self, broken: list[tuple[str, str]]) -> None:
        for path, reason in broken:
            self.skipped += 1
            if path not in self.broken:
                self.broken[path] = reason
                print(f"pumit-nnunet: warning: {path}: unreadable stored image, skipped from now on ({reason}); "
                      f"run `pumit-nnunet corpus validate` on the store", file=sys.stderr, flush=True)

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
        empty = 0
        for image, aniso_d, keys, broken in batches:
            self._consumed = self._issued.popleft()
            self._note_broken(list(broken))
            if image.numel() == 0:
                empty += 1
                if empty >= MAX_EMPTY_BATCHES:
                    raise DataError(f"{empty} batches in a row without one readable stored image", self.reader.store)
                continue
            empty = 0
            yield PretrainBatch(image, int(aniso_d), list(keys), self.skipped)

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
    return PretrainLoader(StoreCropReader(store, frame, seed, augment, crop.max_slices), sampler, num_workers)


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
        array = open_array(member_path(store, row))
        image = torch.from_numpy(np.asarray(array[...], dtype=np.float32)) / int(row.levels)
        image = _center_fit(image, 1, crop.shape(aniso_d, is_2d)[0])
        for axis in (2, 3):
            image = _center_fit(image, axis, -(-image.shape[axis] // crop.stride) * crop.stride)
        out.append((row.key, row.modality, image.contiguous(), aniso_d))
    return out
