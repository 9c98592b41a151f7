"""Scale benchmark for chunked inference (``emdenoise.infer.infer_zarr``).

Writes a (T, Y, X) float32 stack to a Zarr on disk frame by frame (never whole in RAM;
default 200 x 2048 x 2048 = 3.4 GB), then denoises it Zarr -> Zarr with an untrained
WCVD once per worker count, each run in a fresh child process so that its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own.

Targets (issue): peak RSS < 2 GB; 2 workers >= 1.6x the throughput of 1 worker.
The machine's cores are shared with other users: the 1-minute load average before and
after every run is reported so that the throughput can be judged.

    .venv/bin/python bench/bench_scale.py            # full size (~3 min on 2 cores)
    .venv/bin/python bench/bench_scale.py --small    # 24 x 1024 x 1024, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_input(path: Path, shape, chunks, seed: int = 0) -> float:
    """Poisson(2) counts as float32, written one frame at a time; returns seconds."""
    from emdenoise.io import ZarrStackWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    with ZarrStackWriter(path, shape, pixel_size=1.0, chunks=chunks) as w:
        for i in range(shape[0]):
            w[i] = rng.poisson(2.0, shape[1:]).astype(np.float32)
    return time.perf_counter() - t0


def child(args) -> None:
    """One configuration in this (fresh) process; prints a JSON line."""
    import torch

    from emdenoise import infer
    from emdenoise.models import WCVDParams, build_model

    workers = args.workers[0]
    torch.set_num_threads(workers)
    model = build_model(WCVDParams(), seed=0).eval()
    ckpt = {"normalisation": {"offset": 0.0, "scale": 4.0}}
    tile = tuple(args.tile) if args.tile else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = infer.infer_zarr(model, ckpt, args.src, args.dst, device="cpu", workers=workers,
                             tile=tile, progress=False)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # cpu_s: CPU time of the inference alone (not the torch import), all threads
    stats.update(peak_rss_gb=ru.ru_maxrss * 1024 / 1e9,
                 cpu_s=ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime)
    print("RESULT " + json.dumps(stats), flush=True)


def run_config(src: Path, dst: Path, workers: int, tile) -> dict:
    cmd = [sys.executable, __file__, "--child", "--src", str(src), "--dst", str(dst), "--workers", str(workers)]
    if tile:
        cmd += ["--tile", *map(str, tile)]
    load0 = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    load1 = os.getloadavg()[0]
    if proc.returncode:
        raise RuntimeError(f"child failed:\n{proc.stderr[-4000:]}")
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    stats = json.loads(line[len("RESULT "):])
    stats.update(load_before=load0, load_after=load1)
    shutil.rmtree(dst, ignore_errors=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="24 x 1024 x 1024 instead of 200 x 2048 x 2048")
    ap.add_argument("--dir", default="/tmp/emdenoise_bench_scale", help="scratch folder (deleted after)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tile", type=int, nargs=3, default=None, help="override (nt, ty, tx)")
    ap.add_argument("--chunks", type=int, nargs=3, default=None,
                    help="source Zarr chunks (default whole frames, as io.ingest writes)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    shape = (24, 1024, 1024) if args.small else (200, 2048, 2048)
    chunks = tuple(args.chunks) if args.chunks else (1,) + shape[1:]
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        src = root / "src.zarr"
        gen_s = make_input(src, shape, chunks)
        print(f"input {shape} float32 ({np.prod(shape) * 4 / 1e9:.2f} GB), chunks {chunks}, "
              f"written in {gen_s:.1f} s; cpus {os.cpu_count()}", flush=True)
        results = []
        for n in args.workers:
            r = run_config(src, root / f"dst{n}.zarr", n, args.tile)
            results.append(r)
            print(f"workers={n}: tile {r['tile']}, {r['blocks']} blocks, {r['seconds']:.1f} s, "
                  f"{r['mpix_per_s']:.1f} Mpix/s, peak RSS {r['peak_rss_gb']:.2f} GB, cpu {r['cpu_s']:.0f} s "
                  f"(~{r['cpu_s'] / r['seconds']:.2f} cores busy), "
                  f"load avg {r['load_before']:.2f} -> {r['load_after']:.2f}", flush=True)
        by = {r["workers"]: r for r in results}
        rss_ok = all(r["peak_rss_gb"] < 2.0 for r in results)
        print(f"target peak RSS < 2 GB: {'met' if rss_ok else 'NOT met'} "
              f"(max {max(r['peak_rss_gb'] for r in results):.2f} GB)")
        if 1 in by and 2 in by:
            speedup = by[2]["mpix_per_s"] / by[1]["mpix_per_s"]
            print(f"target 2 workers >= 1.6x 1 worker: {'met' if speedup >= 1.6 else 'NOT met'} "
                  f"({speedup:.2f}x)")
        if args.json:
            Path(args.json).write_text(json.dumps({"shape": shape, "chunks": chunks, "results": results}, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
