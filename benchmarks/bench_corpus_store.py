"""Corpus store benchmark: random-crop read throughput and disk footprint vs the original's float16 ``.npy``
memmap and nnU-Net's preprocessed blosc2 (float32), plus conversion throughput vs only reading the sources.

Every figure is a ratio against a reference measured in the same run (higher is better for throughput).
Runs on the real demo volumes (``--demo``, default: built by ``pumit_nnunet.data`` in the data cache). One process, one thread each:
this is the per-loader-worker figure.

    python benchmarks/bench_corpus_store.py --quick
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

VOLUMES = ("Dataset902_RealCTLungNodule/imagesTr/lung1_0000.nii.gz", "Dataset903_RealMRBrainLesion/imagesTr/brain2_0000.nii.gz",
           "Dataset901_RealBrainMaskT1/imagesTr/mni152_coronal_0000.nii.gz", "Dataset902_RealCTLungNodule/imagesTr/lung2_0000.nii.gz",
           "Dataset901_RealBrainMaskT1/imagesTr/mni152_2009a_0000.nii.gz", "Dataset903_RealMRBrainLesion/imagesTr/brain1_0000.nii.gz")


def _crop_shape(shape, spacing):
    from pumit_nnunet.anisotropy import aniso_d_from_spacing
    from pumit_nnunet.corpus.sampler import MIM_CROP

    return tuple(min(c, s) for c, s in zip(MIM_CROP.shape(aniso_d_from_spacing(spacing)), shape))


def evict(paths) -> None:
    """Drop the files from the page cache (no root needed), so reads come from disk as for a corpus > memory."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time_crops(open_fn, items, n_crops: int, seed: int = 0, cold_paths=None) -> float:
    """Crops per second: open each image lazily, read ``n_crops`` random MIM-sized crops as float32 [0, 1].
    ``cold_paths``: evicted from the page cache first (the opening of the files is then timed too)."""
    rng = np.random.default_rng(seed)
    if cold_paths is not None:
        evict(cold_paths)
    start = time.perf_counter()
    handles = {key: open_fn(key) for key, _, _ in items}
    for i in range(n_crops):
        key, shape, crop = items[i % len(items)]
        corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
        array, scale = handles[key]
        box = array[(slice(None), *(slice(o, o + c) for o, c in zip(corner, crop)))]
        np.multiply(box, scale, dtype=np.float32)
    return n_crops / (time.perf_counter() - start)


def _write_references(store: Path, frame, work: Path) -> None:
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    from pumit_nnunet.corpus.store import member_path, open_array

    for row in frame.itertuples(index=False):
        x = open_array(member_path(store, row))[...].astype(np.float32) / row.levels
        name = row.key.replace("/", "__")
        np.save(work / f"{name}.npy", x.astype(np.float16))
        blocks, chunks = comp_blosc2_params(x.shape, _crop_shape(x.shape[1:], (row.spacing_d, row.spacing_h, row.spacing_w)), bytes_per_pixel=4)
        cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
        blosc2.asarray(x, urlpath=str(work / f"{name}.b2nd"), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def _sizes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def main(argv=None) -> int:
    import blosc2
    import SimpleITK as sitk

    from pumit_nnunet.corpus.convert import convert
    from pumit_nnunet.corpus.store import member_path, open_array, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=None, help="real-demo folder (default: pumit_nnunet.data.cached_real_demo())")
    parser.add_argument("--quick", action="store_true", help="3 volumes, 60 crops per format")
    args = parser.parse_args(argv)
    blosc2.set_nthreads(1)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    if args.demo is None:
        from pumit_nnunet.data import cached_real_demo

        args.demo = cached_real_demo()
    volumes = [Path(args.demo) / v for v in VOLUMES[: 3 if args.quick else len(VOLUMES)]]
    missing = [str(v) for v in volumes if not v.is_file()]
    if missing:
        raise SystemExit(f"demo volumes not found: {missing} (pass --demo)")
    n_crops = 60 if args.quick else 400

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        raw.mkdir()
        for v in volumes:
            os.symlink(v, raw / v.name)
        start = time.perf_counter()
        for v in volumes:
            sitk.GetArrayFromImage(sitk.ReadImage(str(v)))
        read_seconds = time.perf_counter() - start
        start = time.perf_counter()
        convert([raw], tmp / "store", progress=False)
        convert_seconds = time.perf_counter() - start
        frame = read_manifest(tmp / "store")
        frame = frame[frame["status"] == "ok"]
        (tmp / "ref").mkdir()
        _write_references(tmp / "store", frame, tmp / "ref")

        items = [(r.key, (r.shape_d, r.shape_h, r.shape_w), _crop_shape((r.shape_d, r.shape_h, r.shape_w), (r.spacing_d, r.spacing_h, r.spacing_w)))
                 for r in frame.itertuples(index=False)]
        levels = dict(zip(frame["key"], frame["levels"]))
        files = {r.key: member_path(tmp / "store", r) for r in frame.itertuples(index=False)}
        ref = tmp / "ref"

        def name(key):
            return key.replace("/", "__")

        rates = {
            "npy-f16": _time_crops(lambda k: (np.load(ref / f"{name(k)}.npy", mmap_mode="r"), 1.0), items, n_crops),
            "nnunet-b2": _time_crops(lambda k: (blosc2.open(str(ref / f"{name(k)}.b2nd"), mode="r"), 1.0), items, n_crops),
            "store": _time_crops(lambda k: (open_array(files[k]), 1.0 / levels[k]), items, n_crops),
        }
        cold = {
            "npy-f16": _time_crops(lambda k: (np.load(ref / f"{name(k)}.npy", mmap_mode="r"), 1.0), items, n_crops,
                                   cold_paths=[ref / f"{name(k)}.npy" for k in frame["key"]]),
            "store": _time_crops(lambda k: (open_array(files[k]), 1.0 / levels[k]), items, n_crops,
                                 cold_paths=list(files.values())),
        }
        voxels = int((frame["channels"] * frame["shape_d"] * frame["shape_h"] * frame["shape_w"]).sum())
        store_bytes = _sizes(files.values())
        npy_bytes = _sizes(ref / f"{name(k)}.npy" for k in frame["key"])
        b2_bytes = _sizes(ref / f"{name(k)}.b2nd" for k in frame["key"])

    print(f"images: {len(frame)}, voxels: {voxels:,}, crops per format: {n_crops} (MIM crop sizes by aniso_d)")
    print(f"crop throughput  store / npy-f16 memmap      : {rates['store'] / rates['npy-f16']:.2f}x (page cache warm)")
    print(f"crop throughput  store / npy-f16 memmap      : {cold['store'] / cold['npy-f16']:.2f}x "
          f"(files evicted from the page cache before each pass; target >= 1.0x)")
    print(f"crop throughput  store / nnU-Net blosc2 f32  : {rates['store'] / rates['nnunet-b2']:.2f}x")
    print(f"bytes per voxel  store / npy-f16             : {store_bytes / npy_bytes:.3f}  "
          f"({store_bytes * 8 / voxels:.2f} bits/voxel)")
    print(f"bytes per voxel  nnU-Net blosc2 f32 / npy-f16: {b2_bytes / npy_bytes:.3f}")
    print(f"conversion time  convert / read-only (SimpleITK): {convert_seconds / read_seconds:.2f}x "
          f"({voxels / convert_seconds / 1e6:.1f} Mvoxel/s stored)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
