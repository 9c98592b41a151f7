"""Live denoising throughput (`emdenoise watch`): frames/s and lag on this machine for
WCVD and the CPU-sized SHINE at 512^2 (and 2048^2 with --large), with the detector rates
they can follow.  All frames are written at once, so the watcher runs as fast as it can
and the lag grows with the queue: frames/s is the sustained rate.

    python bench/bench_watch.py [--frames 20] [--large]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from emdenoise import watch
from emdenoise.checkpoint import save_checkpoint
from emdenoise.config import SHINE_SIZES, SHINEParams, WCVDParams
from emdenoise.models import build_any

#: detector -> pixel rate (px/s) to follow: frames/s x pixels per frame
DETECTORS = {"K2 IS 400 fps x 1920 x 1792": 400.0 * 1920 * 1792, "K3 75 fps x 5760 x 4092": 75.0 * 5760 * 4092}


def checkpoint(params, folder: Path) -> Path:
    model = build_any(params, 0)
    name = type(model).name(params)
    path = folder / f"{name}.pt"
    save_checkpoint({"model": name, "state_dict": model.state_dict(), "model_params": params.to_dict(),
                     "normalisation": {"offset": 0.0, "scale": 4.0}, "window": params.kt_eff,
                     "blind_radius": params.blind_radius}, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--large", action="store_true", help="also 2048^2 frames")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"wcvd": WCVDParams(),
                  "shine (cpu size)": SHINEParams(blindspot=3, **SHINE_SIZES["cpu"]["arch"])}
        for n in [512] + ([2048] if args.large else []):
            for name, params in models.items():
                src, out = tmp / f"in_{name[:5]}_{n}", tmp / f"out_{name[:5]}_{n}"
                src.mkdir()
                for i in range(args.frames):
                    tifffile.imwrite(src / f"f{i:04d}.tif", rng.poisson(2.0, (n, n)).astype(np.uint16))
                stats = watch.watch(src, out, checkpoint(params, tmp), poll=0.01, idle=0.3, preview_every=0)
                mpix = stats["frames_per_s"] * n * n / 1e6
                follows = ", ".join(f"{d}: {'yes' if mpix * 1e6 >= rate else f'no, {mpix * 1e6 / rate:.3f} of it'}"
                                    for d, rate in DETECTORS.items())
                print(f"{n}^2 {name:18s} {stats['frames_per_s']:7.2f} frames/s ({mpix:6.2f} Mpix/s), "
                      f"lag mean {stats['lag_mean_s']:.2f} s max {stats['lag_max_s']:.2f} s  [{follows}]", flush=True)


if __name__ == "__main__":
    main()
