"""Ground-truth quality benchmark: every denoiser on realistic synthetic regimes, one table each.

    PYTHONPATH=src .venv/bin/python bench/bench_quality.py --quick           # 8 regimes, ~15-20 min on 2 cores
    PYTHONPATH=src .venv/bin/python bench/bench_quality.py                   # the full grid (hours on a CPU)
    ... --regimes 'count1_*' 'lin1.0_static_T50'  --out bench/out/quality.csv --list

Regimes (``emdenoise.synthetic.simulate_scene`` / ``simulate_tilt_series``): detector x
scene x frames. Detectors: counting at 0.25 / 1 / 4 e-/px (``count0.25`` ...) and linear
mode at 2 e-/px with detector PSF sigma 0.7 / 1.0 / 1.5 px (``lin0.7`` ...). Scenes:
``static``, ``drift`` (stage drift <= 8 px, sub-pixel: ``auto`` and the networks run the
CLI's chain, which aligns by whole pixels and shifts back; the Gaussian, NL-means and BM4D
rows filter the movie as it is) and ``dynamic`` (particles move / rotate / grow / dissolve,
no stage drift).
Frames 10 to 200. Plus one tilt series (41 tilts, -60..60 deg, linear mode).

Methods, all scored against the noise-free truth:
  raw            the noisy input
  g3d_s1         Gaussian 3D, sigma = 1 (t, y, x)
  oracle_g3d     Gaussian 3D with the best (sigma_t, sigma_yx) on a grid, chosen WITH the truth
                 (an upper bound for a tuned Gaussian; ``seconds`` is the whole grid search)
  blind_g3d      ``emdenoise.filters.blind_gaussian3d`` (tuned without the truth, Noise2Self)
  blind_classical  ``emdenoise.pipeline.classical_candidate``, auto's classical candidate: the
                 blind-tuned Gaussian 3D, NL-means of a temporal Gaussian average
                 (``filters.blind_nlm``) or the Gaussian mix (``filters.blind_gaussian_mix``,
                 per structure class or gated per pixel: ``pipeline.gate_mix``), whichever
                 self-supervised loss is lower (on the unaligned movie, as blind_g3d)
  bm4d           BM4D (PyPI ``bm4d``, optional, never a project dependency). Counting mode:
                 Anscombe transform -> white noise of sigma 1 -> BM4D -> closed-form unbiased
                 inverse (Makitalo & Foi 2011). Linear mode: the noise PSD estimated from the
                 data, the mean 2D power spectrum of differences of adjacent frames (/2),
                 constant along t (noise independent between frames).
  wcvd / wcvd_ctx / shine / auto   the candidates of ``model: auto`` (wcvd_ctx: WCVD with
                 temporal context channels) and its choice, from one run of the chain
                 ``emdenoise denoise`` runs (``pipeline.denoise_stack``); other networks via
                 ``emdenoise denoise IN OUT --model M --config cfg.yaml`` in a subprocess
                 (the user-facing path, whatever the library internals), TIFF in and out; SHINE
                 CPU-sized (16/8/16 channels, 4 blocks, 64 px crops) as in the demo config.

PSNR: after the least-squares affine fit ``a * out + b`` of each output to the truth over
the whole stack (intensity scale and offset are not the denoiser's job), data range =
max - min of the truth. SSIM: mean over frames, same fit and data range. The summary
compares the networks with the oracle and the blind-tuned Gaussian, not only with raw.

CSV columns: regime, method, psnr_db, ssim, seconds, detail (chosen sigmas, auto's choice).
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, SRC)

from emdenoise.filters import BLIND_SIGMAS_T, BLIND_SIGMAS_YX, gaussian3d  # noqa: E402
from emdenoise.synthetic import SyntheticMovie, simulate_scene, simulate_tilt_series  # noqa: E402

METHODS = ["raw", "g3d_s1", "oracle_g3d", "blind_g3d", "blind_classical", "bm4d", "wcvd", "wcvd_ctx", "shine", "auto"]
DETECTORS = {"count0.25": ("counting", 0.25, None), "count1": ("counting", 1.0, None),
             "count4": ("counting", 4.0, None), "lin0.7": ("linear", 2.0, 0.7),
             "lin1.0": ("linear", 2.0, 1.0), "lin1.5": ("linear", 2.0, 1.5)}
SCENES = ("static", "drift", "dynamic")
# The oracle's grid holds the blind-tuned one's (filters.BLIND_SIGMAS_T / _YX), so the blind choice
# can never beat the "oracle", and reaches one step past it in space: with sigma_t <= 16 the oracle
# lost 0.9 dB to the blind choice on static 50-frame movies, and with sigma_yx <= 2.5 0.34 dB on the
# 256 px tilt series (blind 3.0; it chooses 6 since the blind grid reaches 6).
SIGMA_T = tuple(sorted({0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0} | set(BLIND_SIGMAS_T)))
SIGMA_YX = tuple(sorted({0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 4.0, 8.0} | set(BLIND_SIGMAS_YX)))


@dataclass(frozen=True)
class Regime:
    name: str
    detector: str       # key of DETECTORS, or 'tilt'
    scene: str          # static | drift | dynamic | tilt
    frames: int
    size: int
    seed: int

    def movie(self) -> SyntheticMovie:
        if self.scene == "tilt":
            return simulate_tilt_series(self.frames, (self.size, self.size), dose=4.0, psf_sigma=1.0, seed=self.seed)
        mode, dose, psf = DETECTORS[self.detector]
        return simulate_scene(self.frames, (self.size, self.size), mode=mode, dose=dose, psf_sigma=psf or 1.0,
                              max_drift=8.0 if self.scene == "drift" else 0.0, dynamic=self.scene == "dynamic",
                              seed=self.seed)


def regimes(quick: bool, frames: int | None = None, size: int | None = None) -> list[Regime]:
    """Quick: 7 movie regimes at 24 frames of 128 px + the tilt series. Full: 6 detectors x 3 scenes at 50 frames
    of 256 px, 10 and 200 frames for count1 / lin1.0, and the tilt series (41 x 256 px)."""
    out = []
    if quick:
        t, n = frames or 24, size or 128
        for det, scene in [("count0.25", "static"), ("count1", "static"), ("count4", "static"),
                           ("count1", "drift"), ("count1", "dynamic"), ("lin0.7", "static"),
                           ("lin1.5", "static")]:
            out.append(Regime(f"{det}_{scene}_T{t}_{n}px", det, scene, t, n, len(out)))
        out.append(Regime(f"tilt_lin1.0_T41_{n}px", "tilt", "tilt", 41, n, len(out)))
        return out
    t, n = frames or 50, size or 256
    for det in DETECTORS:
        for scene in SCENES:
            out.append(Regime(f"{det}_{scene}_T{t}_{n}px", det, scene, t, n, len(out)))
    for tt in (10, 200):
        for det in ("count1", "lin1.0"):
            for scene in SCENES:
                out.append(Regime(f"{det}_{scene}_T{tt}_{n}px", det, scene, tt, n, len(out)))
    out.append(Regime(f"tilt_lin1.0_T41_{n}px", "tilt", "tilt", 41, n, len(out)))
    return out


def all_regimes(frames=None, size=None) -> list[Regime]:
    """Quick and full regimes together (what --regimes patterns select from)."""
    return regimes(True, frames, size) + regimes(False, frames, size)


# ---------------------------------------------------------------------------------- scoring

def affine_fit(est: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """a * est + b with (a, b) minimising ||truth - a est - b||^2 over the whole stack (float64)."""
    e = est.astype(np.float64).ravel()
    g = truth.astype(np.float64).ravel()
    e_c = e - e.mean()
    var = float(e_c @ e_c)
    a = float(e_c @ (g - g.mean())) / var if var > 0 else 0.0
    return (a * (est.astype(np.float64) - e.mean()) + g.mean()).reshape(truth.shape)


def psnr(est: np.ndarray, truth: np.ndarray) -> float:
    fit = affine_fit(est, truth)
    rng = float(truth.max() - truth.min())
    mse = float(np.mean((fit - truth.astype(np.float64)) ** 2))
    return 10 * np.log10(rng ** 2 / mse) if mse > 0 else float("inf")


def ssim(est: np.ndarray, truth: np.ndarray) -> float:
    fit = affine_fit(est, truth)
    g = truth.astype(np.float64)
    rng = float(g.max() - g.min())
    return float(np.mean([structural_similarity(g[i], fit[i], data_range=rng) for i in range(g.shape[0])]))


# ---------------------------------------------------------------------------------- methods

def oracle_g3d(noisy, clean):
    """Best (sigma_t, sigma_yx) by PSNR against the truth; returns (output, detail)."""
    best = None
    for st in SIGMA_T:
        for ss in SIGMA_YX:
            out = gaussian3d(noisy, (st, ss, ss))
            p = psnr(out, clean)
            if best is None or p > best[0]:
                best = (p, out, f"sigma_t={st} sigma_yx={ss}")
    return best[1], best[2]


def blind_g3d(noisy):
    """The Gaussian 3D tuned without ground truth that ``auto`` also considers
    (``emdenoise.filters.blind_gaussian3d``, Noise2Self with the noise stage's blind spot)."""
    from emdenoise.filters import blind_gaussian3d
    from emdenoise.noise import estimate_blindspot

    b = estimate_blindspot(noisy)["blindspot"] // 2
    res = blind_gaussian3d(noisy, b)
    return res.denoised, f"sigma (t, yx) = {res.sigma}, blind radius {b}"


def blind_classical(noisy):
    """``model: auto``'s classical candidate (``emdenoise.pipeline.classical_candidate``):
    the blind-tuned Gaussian 3D, NL-means or the Gaussian mix, whichever self-supervised loss
    is lower."""
    from emdenoise.noise import estimate_blindspot
    from emdenoise.pipeline import classical_candidate

    b = estimate_blindspot(noisy)["blindspot"] // 2
    den, a = classical_candidate(noisy, b)
    n = a["nlm"]
    nlm = (f"nlm loss {n['n2s_loss']:.6g} (sigma_t {n['sigma_t']}, patch {n['patch']}, search {n['distance']}, "
           f"h {n['h']})" if "n2s_loss" in n else f"nlm {n}")
    mix = a["mix"]
    gate = mix.get("gate") or {}
    gate = (f"; gate loss {gate['n2s_loss']:.6g}, z {gate['z'] if gate['z'] is None else round(gate['z'], 1)}, "
            f"{'kept' if gate['chosen'] else 'not kept'}" if "n2s_loss" in gate else f"; gate {gate}")
    mix = (f"mix loss {mix['n2s_loss']:.6g} ({mix['fit']['classes']} classes{gate})" if "n2s_loss" in mix
           else f"mix {mix}")
    return den, (f"chose {a['filter']}; gaussian loss {a['gaussian']['n2s_loss']:.6g} sigma {a['gaussian']['sigma']}; "
                 f"{nlm}; {mix}")


def _anscombe_inverse(d: np.ndarray) -> np.ndarray:
    """Closed-form approximation of the exact unbiased inverse Anscombe (Makitalo & Foi 2011)."""
    d = np.maximum(d, 1e-3)
    s = np.sqrt(1.5)
    return np.maximum(0.25 * d ** 2 + 0.25 * s / d - 1.375 / d ** 2 + 0.625 * s / d ** 3 - 0.125, 0.0)


def linear_noise_psd(noisy: np.ndarray) -> np.ndarray:
    """(Y, X) noise power spectrum in bm4d's convention (E|FFT2(noise)|^2, so white noise of
    variance v gives Y * X * v everywhere) from differences of adjacent frames: the signal
    cancels (static scene), the noise doubles in power."""
    d = np.diff(noisy.astype(np.float64), axis=0)
    d -= d.mean(axis=(1, 2), keepdims=True)
    return np.median(np.abs(np.fft.fft2(d)) ** 2, axis=0) / 2 / np.log(2)   # median of exp(1) = ln 2


def run_bm4d(noisy: np.ndarray, mode: str):
    try:
        import bm4d
    except ImportError:
        return None, "n/a: pip install bm4d (optional)"
    if not hasattr(np, "trapz"):  # bm4d 4.2.5 calls np.trapz, removed in NumPy 2.4
        np.trapz = np.trapezoid
    vol = np.ascontiguousarray(noisy.transpose(1, 2, 0).astype(np.float64))   # bm4d: (Y, X, T)
    if mode == "counting":
        z = 2.0 * np.sqrt(np.maximum(vol, 0) + 0.375)
        return _anscombe_inverse(bm4d.bm4d(z, 1.0)).transpose(2, 0, 1).astype(np.float32), "anscombe, sigma=1"
    psd2 = linear_noise_psd(noisy)
    psd = np.repeat(psd2[:, :, None], vol.shape[2], axis=2) * vol.shape[2]
    sd = float(np.sqrt(psd2.mean() / psd2.size))
    return bm4d.bm4d(vol, psd).transpose(2, 0, 1).astype(np.float32), f"PSD from frame differences (noise sd {sd:.1f})"


def cli_config(path: str, epochs: int) -> None:
    with open(path, "w") as fh:
        # the defaults (shine.size: auto -> CPU-sized here), only the epochs may be shortened
        fh.write(f"""train: {{epochs: {epochs}, device: cpu}}
infer: {{device: cpu}}
""")


def run_cli(model: str, in_tif: str, out_tif: str, cfg: str):
    """``emdenoise denoise`` in a subprocess; returns (output stack or None, detail)."""
    import tifffile

    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "emdenoise.cli", "denoise", in_tif, out_tif, "--model", model, "--config", cfg]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"failed (rc {proc.returncode}): {tail[0][:120]}"
    detail = ""
    for line in proc.stdout.splitlines():
        if line.startswith("auto: chose"):
            detail = line.split("(")[0].replace("auto: ", "").strip()
    return tifffile.imread(out_tif).astype(np.float32), detail


# ---------------------------------------------------------------------------------- driver

def bench_regime(reg: Regime, methods, epochs: int, tmp: str):
    import tifffile

    t0 = time.perf_counter()
    m = reg.movie()
    noisy, clean = m.noisy, m.clean
    mode = "linear" if reg.scene == "tilt" else DETECTORS[reg.detector][0]
    print(f"\n== {reg.name}: {noisy.shape} {mode}, built in {time.perf_counter() - t0:.1f} s ==", flush=True)
    rows = []

    def add(method, fn):
        t = time.perf_counter()
        out, detail = fn()
        sec = time.perf_counter() - t
        if out is None:
            rows.append(dict(regime=reg.name, method=method, psnr_db=float("nan"), ssim=float("nan"),
                             seconds=float("nan"), detail=detail))
        else:
            rows.append(dict(regime=reg.name, method=method, psnr_db=psnr(out, clean), ssim=ssim(out, clean),
                             seconds=sec, detail=detail))
        r = rows[-1]
        print(f"  {method:11s} {r['psnr_db']:7.2f} dB  SSIM {r['ssim']:.4f}  {r['seconds']:7.1f} s  {detail}",
              flush=True)

    in_tif = os.path.join(tmp, f"{reg.name}.tif")
    tifffile.imwrite(in_tif, noisy)
    cfg = os.path.join(tmp, "cfg.yaml")
    cli_config(cfg, epochs)
    table = {
        "raw": lambda: (noisy, ""),
        "g3d_s1": lambda: (gaussian3d(noisy, 1.0), ""),
        "oracle_g3d": lambda: oracle_g3d(noisy, clean),
        "blind_g3d": lambda: blind_g3d(noisy),
        "blind_classical": lambda: blind_classical(noisy),
        "bm4d": lambda: run_bm4d(noisy, mode),
    }
    chain = {}
    for name in methods:
        if name in table:
            add(name, table[name])
        elif name in ("wcvd", "wcvd_ctx", "shine", "auto"):
            # one run of the chain `emdenoise denoise` runs (emdenoise.pipeline.denoise_stack,
            # auto: every candidate) gives every network's output and auto's choice
            if not chain:
                t = time.perf_counter()
                chain.update(run_chain(noisy, epochs, "tilt_series" if reg.scene == "tilt" else "movie"))
                chain["seconds"] = time.perf_counter() - t
            res = chain["result"]
            if name == "auto":
                add(name, lambda: (res["output"], f"chose {res['chosen']}"))
                rows[-1]["seconds"] = chain["seconds"]
            else:
                ck = res["checkpoints"].get(name)
                add(name, lambda name=name: (res["outputs"].get(name), "" if ck is None else
                                             f"{ck['train_seconds']:.0f} s training" + _reach_detail(ck)))
                if ck is not None:
                    rows[-1]["seconds"] = ck["train_seconds"]
        else:
            add(name, lambda name=name: run_cli(name, in_tif, os.path.join(tmp, f"{reg.name}_{name}.tif"), cfg))
    return rows


def _reach_detail(ck: dict) -> str:
    """', reach R' for a context network, with the comparison ``model.context: auto`` made."""
    r = ck["model_params"].get("context", 0)
    if not r:
        return ""
    rc = ck.get("reach_choice")
    return f", reach {r}" + (f" (of {'/'.join(map(str, rc['reaches']))}, z {rc['z'][-1]:+.1f})"
                             if rc and rc.get("z") else "")


def run_chain(noisy, epochs: int, kind: str = "movie") -> dict:
    """emdenoise.pipeline.denoise_stack with the defaults (model: auto; epochs shortened)
    on the CPU -- what `emdenoise denoise IN OUT --epochs N` runs."""
    from emdenoise import config as emcfg
    from emdenoise import pipeline

    ds = emcfg.build({"datasets": {"b": {"path": "b", "kind": kind}}, "defaults": {"train": {"epochs": epochs}}},
                     check_paths=False).datasets["b"]
    return {"result": pipeline.denoise_stack(noisy, ds, device="cpu",
                                             train_overrides={"device": "cpu", "epochs": epochs})}


def print_table(rows) -> None:
    ref = {r["method"]: r["psnr_db"] for r in rows}
    print(f"\n{rows[0]['regime']}")
    print(f"  {'method':11s} {'PSNR dB':>8s} {'SSIM':>7s} {'s':>7s} {'-oracle':>8s} {'-blind':>8s}  detail")
    for r in rows:
        d_o = r["psnr_db"] - ref.get("oracle_g3d", np.nan)
        d_b = r["psnr_db"] - ref.get("blind_g3d", np.nan)
        fmt = lambda v, w=8, p=2: f"{v:{w}.{p}f}" if np.isfinite(v) else f"{'n/a':>{w}s}"  # noqa: E731
        print(f"  {r['method']:11s} {fmt(r['psnr_db'])} {fmt(r['ssim'], 7, 4)} {fmt(r['seconds'], 7, 1)} "
              f"{fmt(d_o)} {fmt(d_b)}  {r['detail']}")


def summary(all_rows) -> None:
    by = {}
    for r in all_rows:
        by.setdefault(r["regime"], {})[r["method"]] = r["psnr_db"]
    print("\n== summary: PSNR differences in dB (median over regimes; worst regime) ==")
    pairs = [("auto", "oracle_g3d"), ("auto", "blind_g3d"), ("auto", "bm4d"), ("wcvd", "oracle_g3d"),
             ("shine", "oracle_g3d"), ("bm4d", "oracle_g3d"), ("blind_g3d", "oracle_g3d"), ("auto", "raw")]
    for a, b in pairs:
        diffs = {reg: v[a] - v[b] for reg, v in by.items()
                 if a in v and b in v and np.isfinite(v[a]) and np.isfinite(v[b])}
        if not diffs:
            print(f"  {a} - {b}: n/a")
            continue
        worst = min(diffs, key=diffs.get)
        wins = sum(d > 0 for d in diffs.values())
        print(f"  {a:6s} - {b:10s}: median {np.median(list(diffs.values())):+6.2f}, worst {diffs[worst]:+6.2f} "
              f"({worst}), {a} ahead in {wins}/{len(diffs)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 regimes of 24 x 128 x 128 (~15 min on 2 cores)")
    ap.add_argument("--regimes", nargs="+", default=None, help="names or glob patterns (see --list)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--frames", type=int, default=None, help="override the frame count of every regime")
    ap.add_argument("--size", type=int, default=None, help="override the frame size (px)")
    ap.add_argument("--epochs", type=int, default=None, help="network training epochs (quick 100, full 300)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "quality.csv"))
    ap.add_argument("--list", action="store_true", help="list the regimes and exit")
    args = ap.parse_args(argv)
    epochs = args.epochs or (100 if args.quick else 300)
    pool = regimes(args.quick, args.frames, args.size)
    if args.regimes:
        cand = all_regimes(args.frames, args.size)
        pool = [r for r in dict((r.name, r) for r in cand).values()
                if any(fnmatch.fnmatch(r.name, pat) for pat in args.regimes)]
    if args.list:
        for r in pool:
            print(r.name)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    import torch

    print(f"bench_quality: {len(pool)} regimes, methods {methods}, network epochs {epochs}; "
          f"torch {torch.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    all_rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for reg in pool:
            rows = bench_regime(reg, methods, epochs, tmp)
            all_rows += rows
            with open(args.out, "w", newline="") as fh:  # rewritten after every regime
                w = csv.DictWriter(fh, fieldnames=["regime", "method", "psnr_db", "ssim", "seconds", "detail"])
                w.writeheader()
                for r in all_rows:
                    w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    print("\n================ tables ================")
    for reg in pool:
        print_table([r for r in all_rows if r["regime"] == reg.name])
    summary(all_rows)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; CSV {args.out}; load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
