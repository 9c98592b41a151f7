"""GPU figures (issue: "a GPU path that has actually run"): inference Mpix/s of WCVD and
the paper-size SHINE, training steps/s of both, at 512^2 and 4096^2 frames, each next to
the same run's Gaussian 3D (scipy, CPU) and an rfft round trip on the GPU, so numbers
from different machines compare as ratios.  Runs on the CPU too (``--device cpu``, small
sizes) as a smoke test; bench/gpu_check.sh runs it on a GPU machine.

    python bench/bench_gpu.py [--device cuda] [--sizes 512 4096] [--frames 16]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage

from emdenoise.config import SHINEParams, TrainParams, WCVDParams
from emdenoise.infer import denoise
from emdenoise.models import build_any
from emdenoise.train import _amp_context, _loss, optimiser_step


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat=2):
    fn()  # warm-up (cuDNN autotuning, allocations)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


def inference_mpix(params, stack, device):
    model = build_any(params, 0).to(device).eval()
    ckpt = {"normalisation": {"offset": 0.0, "scale": 4.0}}
    sec = timed(lambda: denoise(model, ckpt, stack, device=device, batch_frames=4), device, repeat=1)
    return stack.size / sec / 1e6


def train_steps_per_s(params, device, crop, batch):
    tp = TrainParams(device=device)
    model = build_any(params, 0).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp_ctx, scaler = _amp_context(torch.device(device), True)
    h, k = params.halo_s, params.kt_eff
    x = torch.rand(batch, k, crop + 2 * h, crop + 2 * h, device=device)
    tgt = torch.rand(batch, crop, crop, device=device)

    def step():
        optimiser_step(_loss(model, x, tgt, "valid", amp_ctx), opt, scaler)
    del tp
    return 1.0 / timed(step, device, repeat=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args(argv)
    sizes = args.sizes or ([512, 4096] if args.device.startswith("cuda") else [128])
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    for n in sizes:
        stack = np.random.default_rng(0).poisson(2.0, (args.frames, n, n)).astype(np.float32)
        g3d = stack.size / timed(lambda: ndimage.gaussian_filter(stack, 1.0), "cpu", repeat=1) / 1e6
        if args.device.startswith("cuda"):
            gpu = torch.from_numpy(stack).to(args.device)
            fft = gpu.numel() / timed(lambda: torch.fft.irfft2(torch.fft.rfft2(gpu), s=gpu.shape[-2:]),
                                      args.device) / 1e6
        else:
            fft = float("nan")
        print(f"\n{args.frames} x {n}^2: Gaussian 3D (scipy, CPU) {g3d:.1f} Mpix/s, rfft round trip {fft:.1f} Mpix/s")
        for name, params in (("wcvd", WCVDParams()), ("shine-paper", SHINEParams(blindspot=3))):
            mpix = inference_mpix(params, stack, args.device)
            print(f"  {name:12s} inference {mpix:9.1f} Mpix/s  ({mpix / g3d:.2f} x Gaussian 3D)")
    for name, params, crop, batch in (("wcvd", WCVDParams(), 128, 8), ("shine-paper", SHINEParams(blindspot=3), 256, 16)):
        print(f"  {name:12s} training {train_steps_per_s(params, args.device, crop, batch):.2f} steps/s "
              f"(batch {batch}, {crop} px crops, AMP on CUDA)")


if __name__ == "__main__":
    main()
