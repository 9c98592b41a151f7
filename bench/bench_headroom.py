"""How much better than the tuned Gaussian can any denoiser be on the quality suite's scenes?

    PYTHONPATH=src .venv/bin/python bench/bench_headroom.py [--regimes count1,count4] [--steps 1000]

A *supervised* upper bound for the static regimes of ``bench_quality.py --quick``: on a
static movie the temporal mean is a sufficient statistic (counting noise), so the best
any denoiser can do is the best 2D denoiser of the mean image.  A CNN (8 layers of 3 x 3,
48 channels, residual) is trained *with the ground truth* on the mean images of 40 other
scenes of the same generator (``emdenoise.synthetic.simulate_scene``, seeds 1000-1039, 64 px
crops, batch 16, Adam) and applied to the regime's own movie; the Gaussian is the best σ
(by the truth) on the same mean image, i.e. the oracle Gaussian 3D with σt = 32.  Same
PSNR as the suite (affine fit to the truth).  A network trained self-supervised on the
movie itself cannot be expected to pass this bound; it tells whether a target such as
"+1 dB over the oracle Gaussian" is within reach of the scenes at all.
Single-threaded; ~5 min per 500 steps on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (the suite's regimes and PSNR)

from emdenoise.synthetic import simulate_scene  # noqa: E402


def mean_image(reg: "bq.Regime", seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(temporal mean of the noisy movie, its static truth) for a scene like ``reg``'s."""
    mode, dose, psf = bq.DETECTORS[reg.detector]
    m = simulate_scene(reg.frames, (reg.size, reg.size), mode=mode, dose=dose, psf_sigma=psf or 1.0,
                       seed=seed)
    return m.noisy.mean(0).astype(np.float32), m.clean[0].astype(np.float32)


def cnn(width: int = 48, depth: int = 8) -> nn.Sequential:
    layers = [nn.Conv2d(1, width, 3, padding=1), nn.LeakyReLU(0.1)]
    for _ in range(depth - 2):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers, nn.Conv2d(width, 1, 3, padding=1))


def bound(reg: "bq.Regime", steps: int, n_scenes: int = 40) -> dict:
    torch.manual_seed(0)
    test_mean, test_truth = mean_image(reg, reg.seed)
    gauss = max((bq.psnr(ndimage.gaussian_filter(test_mean, s), test_truth), s)
                for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5))
    train = [mean_image(reg, 1000 + i) for i in range(n_scenes)]
    mu = float(np.mean([a.mean() for a, _ in train]))
    sd = float(np.mean([a.std() for a, _ in train]))
    x = torch.from_numpy(np.stack([(a - mu) / sd for a, _ in train]))[:, None]
    y = torch.from_numpy(np.stack([(c - mu) / sd for _, c in train]))[:, None]
    net = cnn()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    c = min(64, reg.size)
    for it in range(steps):
        i = torch.randint(0, n_scenes, (16,), generator=g)
        y0, x0 = (int(v) for v in torch.randint(0, reg.size - c + 1, (2,), generator=g))
        xb, yb = x[i, :, y0:y0 + c, x0:x0 + c], y[i, :, y0:y0 + c, x0:x0 + c]
        loss = F.mse_loss(xb + net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it in (int(steps * 0.6), int(steps * 0.85)):
            for pg in opt.param_groups:
                pg["lr"] *= 0.3
    with torch.no_grad():
        z = torch.from_numpy((test_mean - mu) / sd)[None, None]
        out = (z + net(z))[0, 0].numpy() * sd + mu
    sup = bq.psnr(out, test_truth)
    return {"regime": reg.name, "steps": steps, "seconds": round(time.perf_counter() - t0),
            "gaussian_db": round(gauss[0], 2), "gaussian_sigma": gauss[1], "supervised_cnn_db": round(sup, 2),
            "headroom_db": round(sup - gauss[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", default="count1,count4", help="detectors of the quick suite's static regimes")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    wanted = args.regimes.split(",")
    for reg in bq.regimes(True):
        if reg.scene == "static" and reg.detector in wanted:
            print(json.dumps(bound(reg, args.steps)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
