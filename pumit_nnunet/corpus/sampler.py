"""The anisotropy-bucketed weighted batch sampler (the authors' anisotropy buckets), deterministic and exactly resumable.

Images are drawn with replacement, proportionally to ``weight x dataset multiplier``, in blocks that are a pure
function of ``(seed, block number)``. Each draw gets scale-augmentation factors and so an ``aniso_d``; draws go
into buckets keyed by (aniso_d, crop depth, channels) and a full bucket becomes one global batch. Global batch
``g`` belongs to rank ``g % world_size``: every rank runs the same cheap stream and keeps its own batches, so
ranks are disjoint and their union is the single-process stream. The state (block, position, bucket contents,
next batch number) is small and made of plain Python types.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pumit_nnunet.anisotropy import MAX_ANISO_D, aniso_d_from_spacing, token_depth


@dataclass(frozen=True)
class CropGrid:
    """A crop as a token grid: ``tokens x stride`` voxels per axis, depth tokens shrinking with aniso_d."""

    tokens_depth: int  # tokenizer 4, MIM 5
    tokens_inplane: int  # tokenizer 8, MIM 10
    stride: int = 16

    @property
    def inplane(self) -> int:
        return self.tokens_inplane * self.stride

    @property
    def max_slices(self) -> int:
        """Depth of the random slab read before cropping: ``int(1.5 * tz * stride)`` (authors' ``PUMTReader``)."""
        return int(1.5 * self.tokens_depth * self.stride)

    def shape(self, aniso_d: int, is_2d: bool = False) -> tuple[int, int, int]:
        """Crop (D, H, W): depth ``tokens_depth * max(stride >> aniso_d, 1)``; 1 for a 2D image and for any volume at
        ``aniso_d == MAX_ANISO_D`` (as the authors: ``tz = 1`` whenever ``2**aniso_d > stride``)."""
        depth = 1 if is_2d or aniso_d >= MAX_ANISO_D else self.tokens_depth * token_depth(self.stride, aniso_d)
        return depth, self.inplane, self.inplane


TOKENIZER_CROP = CropGrid(4, 8)
MIM_CROP = CropGrid(5, 10)


@dataclass(frozen=True)
class ScaleAugmentation:
    """The authors' scale augmentation: in-plane scale with p 0.5 between 0.75 and min(short side / crop, 2) (below 0.75 for images smaller than
    0.75 crops, as the authors' numpy draw); depth scale with p 0.3 in
    [0.8, 1.25] only for quasi-isotropic images (depth spacing <= 1.5 x in-plane)."""

    scale_x: tuple[float, float] = (0.75, 2.0)
    scale_x_p: float = 0.5
    scale_z: tuple[float, float] = (0.8, 1.25)
    scale_z_p: float = 0.3
    isotropic_th: float = 1.5


NO_SCALE = ScaleAugmentation(scale_x_p=0.0, scale_z_p=0.0)


@dataclass(frozen=True)
class BatchSpec:
    """What the sampler hands the loader: one homogeneous batch of (image index, depth scale, in-plane scale)."""

    index: int  # global batch number
    aniso_d: int
    crop: tuple[int, int, int]
    entries: tuple[tuple[int, float, float], ...]


def quasi_isotropic(spacing: np.ndarray, threshold: float = 1.5) -> np.ndarray:
    """Per row of (depth, h, w) spacings: depth spacing <= threshold x the finer in-plane spacing."""
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1, 3)
    return spacing[:, 0] <= threshold * spacing[:, 1:].min(axis=1)


class BucketBatchSampler:
    """Infinite stream of ``BatchSpec`` for one rank; ``state_dict``/``load_state_dict`` resume it exactly."""

    def __init__(self, shapes: np.ndarray, spacings: np.ndarray, channels: np.ndarray, weights: np.ndarray,
                 grid: CropGrid, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 scale: ScaleAugmentation = ScaleAugmentation(), block_size: int = 16384) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) == 0 or not np.isfinite(weights).all() or weights.min() < 0 or weights.sum() <= 0:
            raise ValueError("the sampler needs at least one image with a positive finite weight")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"bad rank/world_size/batch_size: {rank}/{world_size}/{batch_size}")
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        self.spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
        self.channels = np.asarray(channels, dtype=np.int64)
        self.probabilities = weights / weights.sum()
        self.grid, self.batch_size, self.seed = grid, batch_size, seed
        self.rank, self.world_size, self.scale, self.block_size = rank, world_size, scale, block_size
        self.is_2d = self.shapes[:, 0] == 1
        self._state = {"block": 0, "position": 0, "buckets": {}, "next_batch": 0}
        self._block_cache: tuple[int, tuple[np.ndarray, ...]] | None = None

    def draw_block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image indices, depth scales, in-plane scales) of one block: a pure function of (seed, block)."""
        rng = np.random.default_rng([self.seed, block])
        n, s = self.block_size, self.scale
        index = rng.choice(len(self.probabilities), size=n, p=self.probabilities)
        short_side = self.shapes[index, 1:].min(axis=1) / self.grid.inplane
        # the authors draw U(0.75, min(short / crop, 2)) with numpy's uniform, which for an image smaller than
        # 0.75 crops accepts low > high and returns values in (high, low]: small images are zoomed in below 0.75
        upper = np.minimum(short_side, s.scale_x[1])
        scale_x = np.where(rng.random(n) < s.scale_x_p, s.scale_x[0] + (upper - s.scale_x[0]) * rng.random(n), 1.0)
        quasi = quasi_isotropic(self.spacings[index], s.isotropic_th) & ~self.is_2d[index]
        scale_z = np.where(quasi & (rng.random(n) < s.scale_z_p), rng.uniform(*s.scale_z, size=n), 1.0)
        return index, scale_z, scale_x

    def _current_block(self) -> tuple[np.ndarray, ...]:
        block = self._state["block"]
        if self._block_cache is None or self._block_cache[0] != block:
            self._block_cache = (block, self.draw_block(block))
        return self._block_cache[1]

    def _next_draw(self) -> tuple[int, float, float]:
        if self._state["position"] >= self.block_size:
            self._state["block"] += 1
            self._state["position"] = 0
        index, scale_z, scale_x = self._current_block()
        p = self._state["position"]
        self._state["position"] += 1
        return int(index[p]), float(scale_z[p]), float(scale_x[p])

    def _bucket_of(self, image: int, scale_z: float, scale_x: float) -> tuple[str, int, tuple[int, int, int]]:
        is_2d = bool(self.is_2d[image])
        aniso_d = MAX_ANISO_D if is_2d else aniso_d_from_spacing(self.spacings[image], scale_z, scale_x)
        crop = self.grid.shape(aniso_d, is_2d)
        return f"a{aniso_d}-d{crop[0]}-c{int(self.channels[image])}", aniso_d, crop

    def next_batch(self) -> BatchSpec:
        """The next global batch (of any rank)."""
        state = self._state
        while True:
            entry = self._next_draw()
            name, aniso_d, crop = self._bucket_of(*entry)
            bucket = state["buckets"].setdefault(name, [])
            bucket.append(list(entry))
            if len(bucket) == self.batch_size:
                del state["buckets"][name]
                spec = BatchSpec(state["next_batch"], aniso_d, crop, tuple((int(i), z, x) for i, z, x in bucket))
                state["next_batch"] += 1
                return spec

    def __iter__(self) -> Iterator[BatchSpec]:
        while True:
            spec = self.next_batch()
            if spec.index % self.world_size == self.rank:
                yield spec

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        missing = {"block", "position", "buckets", "next_batch"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}")
        self._state = copy.deepcopy({k: state[k] for k in ("block", "position", "buckets", "next_batch")})
