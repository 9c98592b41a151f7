"""One model per session vs one model per dataset (`model.train_on`): what it costs and gains.

    PYTHONPATH=src .venv/bin/python bench/bench_shared.py           # 3 movies of 20 x 192^2, ~5 min on 2 cores
    PYTHONPATH=src .venv/bin/python bench/bench_shared.py --quick   # 30 epochs, ~1 min

A session: three movies of the same detector (counting mode, 1 e-/px; realistic scenes from
``emdenoise.synthetic.simulate_scene``, other particles in each, the third dynamic).  For
WCVD and WCVD with temporal context (``context`` = (T - 1) // 2), trained with the default
``TrainParams`` on the CPU:

  own        one model per dataset (three trainings)
  shared     one model trained on crops of all three (``train_model([a, b, c])``), applied
             to each with the dataset's own normalisation (``checkpoint.for_stack``)
  held-out   one model trained on the first two, applied to the third (train on some,
             denoise the rest)

Printed: PSNR (dB, against the truth) per dataset and method, and the training seconds,
as ratios measured in this run (shared / own).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from emdenoise.checkpoint import for_stack, model_from_checkpoint  # noqa: E402
from emdenoise.config import TrainParams, WCVDParams  # noqa: E402
from emdenoise.infer import denoise  # noqa: E402
from emdenoise.metrics import psnr  # noqa: E402
from emdenoise.synthetic import simulate_scene  # noqa: E402
from emdenoise.train import train_model  # noqa: E402


def apply(ckpt, noisy):
    return denoise(model_from_checkpoint(ckpt), for_stack(ckpt, noisy), noisy, device="cpu")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--quick", action="store_true", help="30 epochs instead of the default")
    args = ap.parse_args(argv)
    movies = [simulate_scene(args.frames, (args.size, args.size), mode="counting", dose=1.0, dynamic=(i == 2),
                             seed=10 + i) for i in range(3)]
    names = ["a", "b", "c (dynamic)"]
    tp = TrainParams(device="cpu", **({"epochs": 30} if args.quick else {}))
    variants = {"wcvd": WCVDParams(blindspot=1), "wcvd_ctx": WCVDParams(blindspot=1, context=(args.frames - 1) // 2)}
    print(f"{len(movies)} movies of {args.frames} x {args.size}^2, counting 1 e-/px; {tp.epochs} epochs, CPU")
    for label, mp in variants.items():
        own, t_own = [], 0.0
        for m in movies:
            t0 = time.perf_counter()
            ck = train_model(m.noisy, mp, tp)
            t_own += time.perf_counter() - t0
            own.append(psnr(apply(ck, m.noisy), m.clean))
        t0 = time.perf_counter()
        ck = train_model([m.noisy for m in movies], mp, tp, names=names)
        t_shared = time.perf_counter() - t0
        shared = [psnr(apply(ck, m.noisy), m.clean) for m in movies]
        t0 = time.perf_counter()
        ck = train_model([m.noisy for m in movies[:2]], mp, tp, names=names[:2])
        t_held = time.perf_counter() - t0
        held = psnr(apply(ck, movies[2].noisy), movies[2].clean)
        print(f"\n{label}: PSNR dB (raw / own / shared)")
        for n, m, o, s in zip(names, movies, own, shared):
            print(f"  {n:13s} {psnr(m.noisy, m.clean):6.2f} / {o:6.2f} / {s:6.2f}   shared - own {s - o:+.2f}")
        print(f"  held-out: trained on a, b, applied to c: {held:.2f} dB (own model {own[2]:.2f}, {held - own[2]:+.2f})")
        print(f"  training seconds: own {t_own:.1f} (3 runs), shared {t_shared:.1f}, held-out {t_held:.1f}; "
              f"shared / own = {t_shared / t_own:.2f}")
        print(f"  median shared - own: {np.median(np.subtract(shared, own)):+.2f} dB")


if __name__ == "__main__":
    main()
