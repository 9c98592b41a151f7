"""Self-supervised training of WCVD / WCID models (WCVD paper, methods 4.1).

Loss: MSE between the network output for a temporal window centred on frame t and the
noisy frame t itself.  With Kt = 3 and valid temporal padding the outputs are frames
1..T-2 and the targets are input frames 1..T-2.  The blind convolution kernel never sees
pixel (t, y, x), so the best it can do is predict the signal, not the noise.

Why there is NO low-pass filter inside the loss (the released code had one): the FFT
low-pass is a global linear filter, LP(f)(p) = sum_q h(p - q) f(q).  The output f(q) of
every neighbour q != p was computed from a window that *contains* the noisy pixel x(p)
(p lies inside q's kernel).  Comparing LP(f)(p) with x(p) therefore lets the network
route x(p) back to p through its neighbours' outputs: the blind spot leaks and the
training rewards reproducing the noise.  The low-pass belongs after inference only
(``emdenoise.filters.fft_lowpass``).

Budget: the paper trains 300 epochs over full frames on a GPU.  On a 2-core CPU that is
far too slow for 20 x 512 x 512 (60 full-frame epochs took 106 s), so an *epoch* here is
one random 128 x 128 crop of every training window (``steps_per_epoch =
ceil(n_windows / batch_size)``, batch 8: 2 steps per epoch for T = 20).  With ~900
parameters the model converges long before it has seen every pixel: 300 epochs take
~25 s on the shared 2-core CPU and reach the PSNR of the least-squares linear
blind-spot predictor on the benchmark movie; 192 px crops, batch 16 or 600 epochs
measured no better (bench/bench_wcvd.py).  Full-frame training (the paper's setting)
is ``crop=None``.

Crops are trained with *valid* spatial padding: a crop of c px is cut with a halo of
Ks_max // 2 px so every output pixel has its true neighbours; periodic padding on a crop
would wrap the opposite crop edge into the kernel.  Full frames use periodic padding as
in the paper (and as inference does).

SHINE (``SHINEParams``) trains through ``_train_shine`` at the end of this module: same
normalisation, validation split, CSV log, epoch selection and checkpoint layout (key
'model' = 'shine'), with the SHINE paper's RAdam + warm-up + cosine schedule, rot90 /
mirror augmentation and zero-padded crops (its blind spot is exact with zero padding).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .config import SHINEParams, TrainParams
from .errors import InputError
from .models import (SHINE, WCVD, WCVDParams, build_model, build_shine, check_blind_state,
                     check_shine_state, resolve_device)

__all__ = [
    "TrainParams",
    "Normalisation",
    "train_model",
    "save_checkpoint",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "emdenoise-wcvd/1"
SHINE_CHECKPOINT_FORMAT = "emdenoise-shine/1"
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")


@dataclass(frozen=True)
class Normalisation:
    """x_norm = (x - offset) / scale, and back.

    offset: the ``low_pct`` percentile of the data (background / detector offset, e.g.
        0 for counting mode, ~100 for linear-mode data).  Subtracting it puts the data at
        >= 0 (up to the lowest 0.5 % of noisy pixels), where the final ReLU of the
        network can represent it, and lets the bias-free network model an offset.
    scale: ``high_pct`` minus ``low_pct`` percentile (robust to hot pixels); falls back
        to the mean absolute deviation from the offset for very sparse data (where the
        99.5 % percentile is still 0), then to 1.
    Units: the data's own (counts, grey levels, ADU).
    """

    offset: float
    scale: float
    low_pct: float = 0.5
    high_pct: float = 99.5

    @classmethod
    def fit(cls, stack: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
            max_samples: int = 4_000_000) -> "Normalisation":
        flat = np.asarray(stack, dtype=np.float32).ravel()
        if flat.size > max_samples:  # deterministic subsample: percentiles need no more
            flat = flat[:: int(math.ceil(flat.size / max_samples))]
        lo, hi = np.percentile(flat, [low_pct, high_pct])
        scale = float(hi - lo)
        if not scale > 0:
            scale = float(np.mean(np.abs(flat - lo)))
        if not scale > 0:
            scale = 1.0
        return cls(offset=float(lo), scale=scale, low_pct=low_pct, high_pct=high_pct)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., Y, X) data units -> float32 normalised."""
        return ((np.asarray(x, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)).astype(
            np.float32, copy=False)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """float32 normalised -> data units."""
        return (np.asarray(y, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(
            np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"method": "percentile", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(**{k: d[k] for k in ("offset", "scale", "low_pct", "high_pct") if k in d})


# --------------------------------------------------------------------------------------
# data: train / validation split and crop sampling
# --------------------------------------------------------------------------------------
def _check_stack(stack, params: WCVDParams) -> np.ndarray:
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {arr.shape}")
    t, y, x = arr.shape
    if params.dims == 3 and t < params.kt:
        raise InputError(None, f"WCVD needs at least kt={params.kt} frames to train, got {t}")
    if t < 1:
        raise InputError(None, "empty stack")
    if min(y, x) < max(params.ks):
        raise InputError(None, f"frames of {y}x{x} px are smaller than the largest kernel ({max(params.ks)} px)")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(None, "stack contains NaN or Inf values")
    return arr


@dataclass
class _Split:
    """Which target frames / rows train and which validate."""

    mode: str                 # 'temporal' | 'spatial' | 'none'
    train_centres: list[int]
    val_centres: list[int]
    train_rows: tuple[int, int]   # input rows usable by training crops [a, b)
    val_rows: tuple[int, int]     # input rows of the validation band [a, b)


def _split(shape, mp: WCVDParams, tp: TrainParams) -> _Split:
    """Hold out ``val_frames`` target frames; fall back to a band of rows for small T.

    Temporal hold-out (default) needs at least val_frames + 2 target frames (T >= 6 for
    WCVD with val_frames=2), so that >= 2 frames remain to train on; the held-out frames
    are evenly spaced inside the movie.  With fewer frames (e.g. T = 4 or 5 for WCVD)
    the bottom fifth of the rows of *every* target frame is held out instead (at least
    2*halo + 8 rows, training crops stay strictly above it).  If the frames are too small
    for that, or val_frames == 0, there is no validation and the last epoch is kept.
    """
    t, y, _ = shape
    h_t, h_s = mp.halo_t, mp.halo_s
    centres = list(range(h_t, t - h_t))
    full = (0, y)
    if tp.val_frames <= 0:
        return _Split("none", centres, [], full, (0, 0))
    if len(centres) >= tp.val_frames + 2:
        pos = np.linspace(0, len(centres) - 1, tp.val_frames + 2)[1:-1]
        val = sorted({centres[int(round(p))] for p in pos})
        return _Split("temporal", [c for c in centres if c not in val], val, full, full)
    band = max(y // 5, 2 * h_s + 8)
    if y - band >= 2 * h_s + 8:
        return _Split("spatial", centres, centres, (0, y - band), (y - band, y))
    return _Split("none", centres, [], full, (0, 0))


class _Sampler:
    """Random training windows (N, kt, Yc, Xc) with their blind-spot targets."""

    def __init__(self, z: np.ndarray, split: _Split, mp: WCVDParams, tp: TrainParams):
        self.z, self.mp, self.tp = z, mp, tp
        self.rng = np.random.default_rng(tp.seed)
        self.centres = split.train_centres
        self.rows = split.train_rows
        h = mp.halo_s
        ny = self.rows[1] - self.rows[0]
        nx = z.shape[2]
        whole = split.mode != "spatial" and (tp.crop is None or tp.crop + 2 * h > min(ny, nx))
        if whole:  # full frames, periodic padding (paper setting)
            self.padding, self.cy, self.cx = "circular", ny, nx
        else:      # crops with a real-pixel halo, valid padding
            c = tp.crop if tp.crop is not None else max(ny, nx)
            self.padding = "valid"
            self.cy, self.cx = min(c, ny - 2 * h), min(c, nx - 2 * h)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """x: (n, kt, Yin, Xin) float32 windows; target: (n, Yout, Xout) centre frames."""
        ht, hs = self.mp.halo_t, self.mp.halo_s
        halo = hs if self.padding == "valid" else 0
        iy, ix = self.cy + 2 * halo, self.cx + 2 * halo
        r0, r1 = self.rows
        xs = []
        for _ in range(n):
            t = self.centres[self.rng.integers(len(self.centres))]
            y0 = r0 + self.rng.integers(r1 - r0 - iy + 1)
            x0 = self.rng.integers(self.z.shape[2] - ix + 1)
            w = self.z[t - ht:t + ht + 1, y0:y0 + iy, x0:x0 + ix]
            if self.tp.augment:
                if self.rng.random() < 0.5:
                    w = w[:, ::-1]
                if self.rng.random() < 0.5:
                    w = w[:, :, ::-1]
                if iy == ix and self.rng.random() < 0.5:
                    w = w.transpose(0, 2, 1)
            xs.append(w)
        x = np.ascontiguousarray(np.stack(xs))
        tgt = x[:, ht, halo:iy - halo, halo:ix - halo] if halo else x[:, ht]
        return x, np.ascontiguousarray(tgt)


def _validation_set(z: np.ndarray, split: _Split, mp: WCVDParams, tp: TrainParams):
    """Fixed validation windows (N, kt, Y, X), targets and the spatial padding to use."""
    if split.mode == "none":
        return None
    ht, hs = mp.halo_t, mp.halo_s
    r0, r1 = split.val_rows
    ny, nx = r1 - r0, z.shape[2]
    vc = tp.val_crop
    if split.mode == "temporal" and (vc is None or vc + 2 * hs >= min(ny, nx)):
        padding, ys, xs = "circular", slice(r0, r1), slice(0, nx)
    else:
        padding = "valid"
        cy = ny - 2 * hs if vc is None else min(vc, ny - 2 * hs)
        cx = nx - 2 * hs if vc is None else min(vc, nx - 2 * hs)
        y0 = r0 + (ny - cy - 2 * hs) // 2
        x0 = (nx - cx - 2 * hs) // 2
        ys, xs = slice(y0, y0 + cy + 2 * hs), slice(x0, x0 + cx + 2 * hs)
    x = np.stack([z[t - ht:t + ht + 1, ys, xs] for t in split.val_centres])
    tgt = x[:, ht, hs:x.shape[2] - hs, hs:x.shape[3] - hs] if padding == "valid" else x[:, ht]
    return np.ascontiguousarray(x), np.ascontiguousarray(tgt), padding


# --------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic algorithms while training on CPU; previous global setting restored."""
    if not enabled:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _amp_context(device: torch.device, enabled: bool):
    """Autocast on CUDA only (bf16 where supported, else fp16 with a GradScaler)."""
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _loss(model: WCVD, x: torch.Tensor, tgt: torch.Tensor, padding: str, amp_ctx) -> torch.Tensor:
    # Self-supervised MSE: output for window centred on t vs noisy frame t (no low-pass,
    # see the module docstring for why a low-pass here would leak the blind spot).
    with amp_ctx:
        out = model(x, padding)[:, 0]
    return F.mse_loss(out.float(), tgt)


@torch.no_grad()
def _evaluate(model: WCVD, val, device, batch: int, amp_ctx) -> tuple[float, float]:
    """Validation MSE and its standard error (from the spread of per-pixel squared errors)."""
    if val is None:
        return float("nan"), float("nan")
    x, tgt, padding = val
    model.eval()
    s1 = s2 = 0.0
    count = 0
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s:s + batch]).to(device)
        tb = torch.from_numpy(tgt[s:s + batch]).to(device)
        with amp_ctx:
            out = model(xb, padding)[:, 0]
        err = (out.float() - tb).double().pow(2)
        s1 += err.sum().item()
        s2 += err.pow(2).sum().item()
        count += err.numel()
    model.train()
    mean = s1 / count
    var = max(s2 / count - mean * mean, 0.0)
    return mean, math.sqrt(var / count)


def _select_epoch(history: list[tuple[int, float, float]], tolerance: float) -> int:
    """Epoch whose weights go into the checkpoint.

    history: (epoch, val_loss, standard error).  The validation loss of a blind-spot
    model is the noise variance plus a small signal error, so epoch-to-epoch differences
    are often far below the noise of the estimate itself (measured on the synthetic
    counting movie: differences ~2e-5 vs a standard error ~3e-4 on a loss of 0.071).
    Taking the raw minimum then picks whichever epoch fits the noise of the two held-out
    frames best (cost 0.1-0.3 dB PSNR in the benchmark).  Instead: the *latest* epoch whose
    loss is within ``tolerance`` standard errors of the minimum -- the most-trained model
    that validation cannot tell apart from the best, still stopping early when the loss
    really rises.
    """
    e_min, v_min, se_min = min(history, key=lambda h: h[1])
    limit = v_min + tolerance * se_min
    return max(e for e, v, _ in history if v <= limit)


class _CsvLog:
    """Training log written to ``path.part`` while running, renamed when complete."""

    def __init__(self, path):
        self.path = None if path is None else os.fspath(path)
        self.fh = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fh = open(self.path + ".part", "w", newline="")
            self.writer = csv.DictWriter(self.fh, fieldnames=LOG_COLUMNS)
            self.writer.writeheader()

    def row(self, row: dict) -> None:
        if self.fh:
            self.writer.writerow(row)
            self.fh.flush()

    def close(self, ok: bool) -> None:
        if self.fh:
            self.fh.close()
            if ok:
                os.replace(self.path + ".part", self.path)


def train_model(stack: np.ndarray, model_params: WCVDParams = WCVDParams(),
                train_params: TrainParams = TrainParams(), *, log_csv=None,
                progress: Callable[[dict], None] | None = None) -> dict:
    """Train a WCVD (dims=3) or WCID (dims=2) model on one (T, Y, X) movie.

    stack: (T, Y, X) array in data units (any real dtype; used as float32); T >= kt for
        WCVD (InputError otherwise), frames at least Ks_max px wide.
    log_csv: optional path of the CSV log (epoch, train_loss, val_loss, lr, seconds);
        losses are MSE in normalised units, seconds = elapsed wall time since start.
    progress: optional callback called with each log row (a dict) after every epoch.
    Returns the checkpoint dict (see ``save_checkpoint``) holding the weights of the epoch
    chosen by validation (``_select_epoch``; the last epoch when there is no validation).
    Its key 'model' names the architecture: 'wcvd', 'wcid' or 'shine'.

    model_params may be ``SHINEParams``: the SHINE path (``_train_shine``: RAdam, linear
    warm-up + cosine, rot90/flip augmentation of square crops, zero spatial padding)
    with the same normalisation, validation split, CSV log, epoch selection and
    checkpoint layout; see ``config.shine_train_params`` for the paper's settings.
    """
    if isinstance(model_params, SHINEParams):
        return _train_shine(stack, model_params, train_params, log_csv, progress)
    mp, tp = model_params, train_params
    arr = _check_stack(stack, mp)
    device = resolve_device(tp.device)
    norm = Normalisation.fit(arr)
    z = norm.apply(arr)
    split = _split(z.shape, mp, tp)
    if not split.train_centres:
        raise InputError(None, "no frames left to train on")
    sampler = _Sampler(z, split, mp, tp)
    val = _validation_set(z, split, mp, tp)
    steps = tp.steps_per_epoch or max(1, math.ceil(len(split.train_centres) / tp.batch_size))

    t_start = time.perf_counter()
    log = _CsvLog(log_csv)
    ok = False
    with _deterministic(device.type == "cpu"):
        model = build_model(mp, seed=tp.seed).to(device)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=tp.lr)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tp.epochs, eta_min=tp.lr / 100)
                 if tp.lr_schedule == "cosine" else None)
        amp_ctx, scaler = _amp_context(device, tp.amp)
        history, states = [], {}  # (epoch, val, se); epoch -> weights (~1k floats each)
        train_loss = float("nan")
        try:
            for epoch in range(1, tp.epochs + 1):
                losses = []
                for _ in range(steps):
                    xb, tb = sampler.batch(tp.batch_size)
                    xb = torch.from_numpy(xb).to(device, non_blocking=True)
                    tb = torch.from_numpy(tb).to(device, non_blocking=True)
                    loss = _loss(model, xb, tb, sampler.padding, amp_ctx)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    losses.append(loss.detach().item())
                train_loss = float(np.mean(losses))
                val_loss, val_se = _evaluate(model, val, device, tp.batch_size, amp_ctx)
                if val is not None:
                    history.append((epoch, val_loss, val_se))
                    states[epoch] = _cpu_state(model)
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                       "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t_start, 3)}
                log.row(row)
                if progress is not None:
                    progress(row)
                if sched is not None:
                    sched.step()
            ok = True
        finally:
            log.close(ok)
    return _checkpoint(CHECKPOINT_FORMAT, "wcvd" if mp.dims == 3 else "wcid", model, states, history,
                       mp, tp, norm, split, arr, device, train_loss, t_start)


def _checkpoint(fmt: str, name: str, model, states: dict, history: list, mp, tp: TrainParams, norm,
                split, arr: np.ndarray, device, train_loss, t_start: float) -> dict:
    """The checkpoint dict of a finished training run (both models): weights of the
    selected validation epoch (``_select_epoch``; the minimum if that epoch's weights
    were pruned), or of the last epoch when there was no validation."""
    if history:
        best_epoch = _select_epoch(history, tp.val_tolerance)
        e_min, v_min, _ = min(history, key=lambda h: h[1])
        if best_epoch not in states:  # pruned (see _prune_states): fall back to the minimum
            best_epoch = e_min
        _, best_val, best_se = history[best_epoch - 1]
        state = states[best_epoch]
    else:
        best_epoch, best_val, best_se, e_min, v_min = tp.epochs, float("nan"), float("nan"), 0, float("nan")
        state = _cpu_state(model)
    return {
        "format": fmt,
        "model": name,
        "state_dict": state,
        "model_params": mp.to_dict(),
        "train_params": asdict(tp),
        "normalisation": norm.to_dict(),
        "code_version": str(__version__),
        "torch_version": str(torch.__version__),
        "best_epoch": int(best_epoch),
        "best_val_loss": float(best_val),
        "val_loss_se": float(best_se),
        "min_val_epoch": int(e_min),
        "min_val_loss": float(v_min),
        "final_train_loss": train_loss,
        "epochs_run": int(tp.epochs),
        "validation": {"mode": split.mode, "frames": list(split.val_centres),
                       "rows": list(split.val_rows)},
        "input_shape": list(arr.shape),
        "device": str(device),
        "train_seconds": time.perf_counter() - t_start,
    }


def _cpu_state(model: WCVD) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def save_checkpoint(ckpt: dict, path) -> None:
    """torch.save the checkpoint dict atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(ckpt, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_REQUIRED = ("state_dict", "model_params", "normalisation")


def load_checkpoint(path, device: str = "cpu") -> tuple[WCVD | SHINE, dict]:
    """Load a checkpoint written by ``save_checkpoint``; returns (model in eval mode, dict).

    Raises ``InputError(path, ...)`` for a missing / unreadable file, missing keys, a
    weight shape mismatch, or a blind kernel whose centre weight is not exactly zero.
    Uses ``torch.load(weights_only=True)``: a checkpoint cannot execute code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, unsafe pickle ...
        raise InputError(path, f"not a readable emdenoise checkpoint ({exc.__class__.__name__}: {exc})") from None
    return model_from_checkpoint(ckpt, path, device), ckpt


def model_from_checkpoint(ckpt: dict, source=None, device: str = "cpu") -> WCVD | SHINE:
    """The model (eval mode) of an in-memory checkpoint dict, with the same checks as
    :func:`load_checkpoint`; ``source`` names the file in error messages.  Dispatches on
    ``ckpt['model']``: 'shine' -> SHINE, 'wcvd' / 'wcid' / absent -> WCVD."""
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise InputError(source, f"not an emdenoise checkpoint (needs keys {', '.join(_REQUIRED)})")
    # checkpoints written before the 'model' key existed are WCVD / WCID
    if ckpt.get("model", "wcvd") == "shine":
        try:
            params = SHINEParams.from_dict(ckpt["model_params"])
        except TypeError as exc:
            raise InputError(source, f"invalid SHINE model parameters: {exc}") from None
        check_shine_state(ckpt["state_dict"], source)
        model = SHINE(params)
    else:
        params = WCVDParams.from_dict(ckpt["model_params"])
        check_blind_state(ckpt["state_dict"], source)
        model = WCVD(params)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(source, f"weights do not match the model parameters: {exc}") from None
    return model.to(resolve_device(device)).eval()


# --------------------------------------------------------------------------------------
# SHINE training (SHINE paper, "Training details")
# --------------------------------------------------------------------------------------
#: Linear warm-up over this fraction of all optimiser steps (at least one step), then
#: cosine annealing to lr/100 ('cosine') or a constant lr ('constant').  The paper names
#: "warm-up and cosine annealing" without lengths.
SHINE_WARMUP_FRACTION = 0.05
#: Besides the minimum-validation epoch, at most this many of the latest epochs within the
#: selection tolerance keep their weights in memory (a full-size SHINE has ~0.9 M
#: parameters; 2000 epochs of states would not fit).
_SHINE_KEEP = 20


class _ShineSampler:
    """Random training windows (n, frames, c, c) with their noisy centre frames.

    One square crop of ``min(crop, rows, cols)`` px (paper 256; the whole frame when the
    frame is smaller) per window; augmentation: rot90 by k*90 deg (square crops) and
    vertical / horizontal mirroring, all drawn from ``np.random.default_rng(seed)``.
    """

    def __init__(self, z: np.ndarray, split: _Split, mp: SHINEParams, tp: TrainParams):
        self.z, self.mp, self.tp = z, mp, tp
        self.rng = np.random.default_rng(tp.seed)
        self.centres, self.rows = split.train_centres, split.train_rows
        ny, nx = self.rows[1] - self.rows[0], z.shape[2]
        c = tp.crop if tp.crop is not None else max(ny, nx)
        self.cy, self.cx = (min(c, ny, nx),) * 2 if tp.crop is not None else (ny, nx)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        ht = self.mp.halo_t
        r0, r1 = self.rows
        xs = []
        for _ in range(n):
            t = self.centres[self.rng.integers(len(self.centres))]
            y0 = r0 + self.rng.integers(r1 - r0 - self.cy + 1)
            x0 = self.rng.integers(self.z.shape[2] - self.cx + 1)
            w = self.z[t - ht:t + ht + 1, y0:y0 + self.cy, x0:x0 + self.cx]
            if self.tp.augment:
                k = int(self.rng.integers(4)) if self.cy == self.cx else 2 * int(self.rng.integers(2))
                w = np.rot90(w, k, axes=(1, 2))
                if self.rng.random() < 0.5:
                    w = w[:, ::-1]
                if self.rng.random() < 0.5:
                    w = w[:, :, ::-1]
            xs.append(w)
        x = np.ascontiguousarray(np.stack(xs))
        return x, np.ascontiguousarray(x[:, ht])


def _shine_validation_set(z: np.ndarray, split: _Split, mp: SHINEParams, tp: TrainParams):
    """Fixed validation windows (N, frames, Y, X) and noisy centre frames, 'zeros' padding:
    a centre crop of ``val_crop`` px of each held-out frame, or the held-out row band."""
    if split.mode == "none":
        return None
    ht = mp.halo_t
    r0, r1 = split.val_rows
    ny, nx = r1 - r0, z.shape[2]
    cy = ny if tp.val_crop is None else min(tp.val_crop, ny)
    cx = nx if tp.val_crop is None else min(tp.val_crop, nx)
    y0, x0 = r0 + (ny - cy) // 2, (nx - cx) // 2
    x = np.stack([z[t - ht:t + ht + 1, y0:y0 + cy, x0:x0 + cx] for t in split.val_centres])
    return np.ascontiguousarray(x), np.ascontiguousarray(x[:, ht]), "zeros"


def _shine_lr_lambda(total_steps: int, schedule: str):
    warm = max(1, int(round(SHINE_WARMUP_FRACTION * total_steps)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule != "cosine":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return factor


def _train_shine(stack, mp: SHINEParams, tp: TrainParams, log_csv, progress) -> dict:
    """SHINE branch of :func:`train_model` (same normalisation, split, log, selection).

    Loss: plain MSE between the output for the window centred on t and the noisy frame t
    (no low-pass or any other filter of the output: it would leak the blind spot).
    RAdam, linear warm-up + cosine annealing per optimiser step, zero spatial padding on
    crops (the blind spot is exact with zero padding), AMP only on CUDA.
    """
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {arr.shape}")
    t, y, x = arr.shape
    if t < mp.frames:
        raise InputError(None, f"SHINE needs at least frames={mp.frames} frames to train, got {t}")
    if min(y, x) < 2 * mp.blind_radius + 3:
        raise InputError(None, f"frames of {y}x{x} px are too small for a {mp.blindspot}x{mp.blindspot} blind spot")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise InputError(None, "stack contains NaN or Inf values")
    device = resolve_device(tp.device)
    norm = Normalisation.fit(arr)
    z = norm.apply(arr)
    # zero padding needs no spatial halo, so the row split needs none either
    split = _split(z.shape, SimpleNamespace(halo_t=mp.halo_t, halo_s=0), tp)
    if not split.train_centres:
        raise InputError(None, "no frames left to train on")
    sampler = _ShineSampler(z, split, mp, tp)
    val = _shine_validation_set(z, split, mp, tp)
    steps = tp.steps_per_epoch or max(1, math.ceil(len(split.train_centres) / tp.batch_size))

    t_start = time.perf_counter()
    log = _CsvLog(log_csv)
    ok = False
    with _deterministic(device.type == "cpu"):
        model = build_shine(mp, seed=tp.seed).to(device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.RAdam(model.parameters(), lr=tp.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _shine_lr_lambda(tp.epochs * steps, tp.lr_schedule))
        amp_ctx, scaler = _amp_context(device, tp.amp)
        history, states = [], {}
        train_loss = float("nan")
        try:
            for epoch in range(1, tp.epochs + 1):
                losses = []
                for _ in range(steps):
                    xb, tb = sampler.batch(tp.batch_size)
                    xb = torch.from_numpy(xb).to(device, non_blocking=True)
                    tb = torch.from_numpy(tb).to(device, non_blocking=True)
                    loss = _loss(model, xb, tb, "zeros", amp_ctx)
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    sched.step()
                    losses.append(loss.detach().item())
                lr_used = opt.param_groups[0]["lr"]
                train_loss = float(np.mean(losses))
                val_loss, val_se = _evaluate(model, val, device, tp.batch_size, amp_ctx)
                if val is not None:
                    history.append((epoch, val_loss, val_se))
                    states[epoch] = _cpu_state(model)
                    _prune_states(states, history, tp.val_tolerance)
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                       "lr": lr_used, "seconds": round(time.perf_counter() - t_start, 3)}
                log.row(row)
                if progress is not None:
                    progress(row)
            ok = True
        finally:
            log.close(ok)
    return _checkpoint(SHINE_CHECKPOINT_FORMAT, "shine", model, states, history,
                       mp, tp, norm, split, arr, device, train_loss, t_start)


def _prune_states(states: dict, history: list, tolerance: float) -> None:
    """Keep the weights of the minimum-validation epoch and of the latest ``_SHINE_KEEP``
    epochs within the current selection limit (``_select_epoch``); drop the rest."""
    e_min, v_min, se_min = min(history, key=lambda h: h[1])
    limit = v_min + tolerance * se_min
    within = [e for e, v, _ in history if v <= limit and e in states]
    keep = set(within[-_SHINE_KEEP:]) | {e_min}
    for e in list(states):
        if e not in keep:
            del states[e]
