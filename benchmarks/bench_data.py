"""Data rows: how fast volumes decode from compressed NPZ, memory-mapped .npy and the trainer's `--cache_dir`, in
one process and in DataLoader workers, on synthetic chest-CT phantoms written once to `--work_dir`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_core import Context, Measurement, Row, cpus

DATA_FORMAT_VERSION = 1  # bump when the synthetic volumes change, so cached files are rewritten


def _make_volume(job: tuple[int, tuple[int, int, int], int, str, str]) -> dict:
    """Worker: one synthetic chest-CT phantom (smooth anatomy + noise, windowed like real data), written as
    compressed NPZ and as plain .npy; returns sizes and the compression time."""
    from ct_siglip.synthetic import make_case, window

    seed, shape, channels, npz_path, npy_path = job
    hu, _, _ = make_case(np.random.default_rng([seed, 7]), shape)
    vol = window(hu, dtype=np.float16)
    vol = vol[np.arange(channels) % len(vol)]  # C=2: the two windows of the data contract
    t = time.perf_counter()
    np.savez_compressed(npz_path, image=vol)
    compress_s = time.perf_counter() - t
    np.save(npy_path, vol)
    return {"raw_mb": vol.nbytes / 1e6, "npz_mb": os.path.getsize(npz_path) / 1e6, "compress_s": compress_s}


def prepare_data(ctx: Context) -> dict:
    """`--volumes` files per format, copies of `--unique_volumes` distinct phantoms (decode time does not depend
    on which phantom a file holds; generating 32 full-size ones would cost minutes). Reused when present."""
    if ctx.data_files is not None:
        return ctx.data_files
    if ctx.data_error is not None:
        raise RuntimeError(f"preparing the volumes failed: {ctx.data_error}")
    args = ctx.args
    spec = {
        "shape": list(args.shape),
        "channels": args.in_channels,
        "volumes": args.volumes,
        "unique": args.unique_volumes,
        "version": DATA_FORMAT_VERSION,
    }
    folder = args.work_dir / ("data-" + "x".join(map(str, [args.in_channels, *args.shape])))
    marker = folder / "bench_data.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("spec") == spec and all(Path(f).is_file() for fs in info["files"].values() for f in fs):
            ctx.data_files = info
            return info
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    jobs = [(u, args.shape, args.in_channels, str(folder / f"u{u}.npz"), str(folder / f"u{u}.npy"))
            for u in range(args.unique_volumes)]  # fmt: skip
    t = time.perf_counter()
    if math.prod(args.shape) >= 1_000_000 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(len(jobs), cpus())) as pool:
            made = list(pool.map(_make_volume, jobs))
    else:
        made = [_make_volume(j) for j in jobs]
    files: dict[str, list[str]] = {"npz": [], "npy": []}
    for k in range(args.volumes):
        u = k % args.unique_volumes
        for fmt in files:
            dst = folder / f"vol{k:03d}.{fmt}"
            shutil.copyfile(folder / f"u{u}.{fmt}", dst)
            files[fmt].append(str(dst))
    info = {
        "spec": spec,
        "files": files,
        "raw_mb": made[0]["raw_mb"],
        "npz_mb": statistics.mean(m["npz_mb"] for m in made),
        "compress_s": statistics.mean(m["compress_s"] for m in made),
        "prepare_s": time.perf_counter() - t,
    }
    marker.write_text(json.dumps(info))
    ctx.data_files = info
    return info


class VolumeFiles(torch.utils.data.Dataset):
    """What a training data set does per sample to get the image tensor: NPZ through `load_volume` (decompress
    and check the data contract), .npy memory-mapped and copied into a tensor, or NPZ through the trainer's
    `--cache_dir` (`VolumeCache.load`: its .npy entry memory-mapped, copied and checked; filled by the untimed
    warm-up pass)."""

    def __init__(self, paths: list[str], fmt: str, channels: int, cache_dir: Path | None = None):
        from ct_siglip.volume_io import VolumeCache

        self.paths, self.fmt, self.channels = paths, fmt, channels
        self.cache = VolumeCache(cache_dir) if fmt == "cache" else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None:
            arr = self.cache.load(self.paths[i], channels=self.channels)
        elif self.fmt == "npz":
            from ct_siglip.volume_io import load_volume

            arr = load_volume(self.paths[i], channels=self.channels)
        else:
            arr = np.array(np.load(self.paths[i], mmap_mode="r"))  # a real copy: every page is read
        return torch.from_numpy(arr)


def data_row(ctx: Context, fmt: str, workers: int) -> Row:
    args = ctx.args

    def run(ctx: Context) -> Measurement:
        info = prepare_data(ctx)
        npz = info["files"]["npz"]
        # Inside the data folder, which is rebuilt when the volumes change; entries of a previous run are reused.
        cache_dir = Path(npz[0]).parent / "volume_cache"
        ds = VolumeFiles(npz if fmt == "cache" else info["files"][fmt], fmt, args.in_channels, cache_dir)
        extra = {
            "raw_mb": round(info["raw_mb"], 2),
            "npz_mb": round(info["npz_mb"], 2),
            "compress_s_per_volume": round(info["compress_s"], 3),
        }
        if workers == 0:
            n = min(len(ds), 8)
            for i in range(n):  # page cache warm: decode is measured, not the disk
                ds[i]
            t = time.perf_counter()
            for i in range(n):
                ds[i]
            seconds = time.perf_counter() - t
            return Measurement(n / seconds, seconds / n, settings={**extra, "volumes_timed": n})
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            persistent_workers=True,
            timeout=300,  # a wedged worker fails this row instead of hanging the run
            prefetch_factor=2,
            pin_memory=ctx.cuda,
        )
        try:
            for _ in loader:  # worker start-up and page cache warm-up, not timed
                pass
            t = time.perf_counter()
            n = 0
            for _ in range(args.data_passes):
                for _ in loader:
                    n += 1
            seconds = time.perf_counter() - t
        finally:
            del loader  # stops the persistent workers
        return Measurement(n / seconds, seconds / n, settings={**extra, "volumes_timed": n})

    procs = "1 process" if workers == 0 else f"{workers} worker processes"
    what = {"npz": "compressed NPZ (load_volume)", "npy": "uncompressed .npy, memory-mapped",
            "cache": "NPZ through --cache_dir (VolumeCache: .npy entry memory-mapped and checked)"}[fmt]  # fmt: skip
    settings = {
        "format": fmt,
        "workers": workers,
        "shape_cdhw": [args.in_channels, *args.shape],
        "dtype": "float16",
        "volumes": args.volumes,
        "cpus": cpus(),
        "pin_memory": ctx.cuda,
        "page_cache": "warm",
    }
    return Row("data", f"data.{fmt}.{'w' + str(workers) if workers else 'main'}", f"data: {what}, {procs}", None,
               "volumes/s", run, settings)  # fmt: skip
