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

One loop, one sampler, one validation builder serve every registered model
(``emdenoise.models.MODELS``): the model class says which optimiser (WCVD: Adam;
SHINE: the paper's RAdam with a linear warm-up), the parameters say the window and
halo.  SHINE trains on the same real-pixel-halo crops as WCVD: with zero-padded crops
(the paper's code) 47 % (paper network) to 84 % (CPU-sized network) of its training
pixels saw padding that inference never shows it.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, filters, io
from .checkpoint import Normalisation, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import TrainParams, WCVDParams
from .errors import InputError
from .models import BlindSpotModel, MixGate, class_for_params, resolve_device
from .tiling import min_frames_for_windows, window_frames

__all__ = [
    "IN_MEMORY_BYTES",
    "TrainParams",
    "Normalisation",
    "train_model",
    "compare_reach",
    "fit_mix_gate",
    "epoch_line",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "emdenoise-wcvd/1"
#: Stacks up to this many bytes of float32 frames are trained on in memory (fast); larger
#: ones crop by crop from their Zarr stores (same model, bit for bit).  Training in memory
#: holds the stack and its normalised copy, so the bound is ~2x this plus the model.
IN_MEMORY_BYTES = 512 * 2**20
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "lr", "seconds")
#: Besides the minimum-validation epoch, at most this many of the latest epochs within the
#: selection tolerance keep their weights in memory (a full-size SHINE has ~0.9 M
#: parameters; 2000 epochs of states would not fit).
_KEEP_STATES = 20


# --------------------------------------------------------------------------------------
# data: train / validation split and crop sampling
# --------------------------------------------------------------------------------------
def _check_stack(stack, cls, params, source=None):
    """The stack as float32 numpy (in memory) or, for an array-like that is not in memory
    (a Zarr array), the array-like itself, checked frame by frame (shape, finite values)."""
    if not hasattr(stack, "shape") or isinstance(stack, np.ndarray):
        arr = np.asarray(stack)
        cls.check_input(params, arr.shape, source)
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InputError(source, "stack contains NaN or Inf values")
        return arr
    cls.check_input(params, tuple(stack.shape), source)
    for t0 in range(0, stack.shape[0], 8):
        if not np.isfinite(np.asarray(stack[t0:t0 + 8], dtype=np.float32)).all():
            raise InputError(source, f"stack contains NaN or Inf values (frames {t0}-{t0 + 7})")
    return stack


class _Frames:
    """Normalised float32 frames of one training stack (T, Y, X), read on demand.

    A numpy stack is normalised once and kept (fast); any other array-like (a Zarr array
    too large for memory: ``train_model(..., in_memory=False)``) is read and normalised
    per crop, so training memory is ~ a batch of crops.  The values are identical either
    way (the normalisation is elementwise), and so is the trained model.
    """

    def __init__(self, arr, norm: Normalisation):
        self.arr, self.norm, self.shape = arr, norm, tuple(arr.shape)
        self._z = norm.apply(arr) if isinstance(arr, np.ndarray) else None

    def __getitem__(self, index) -> np.ndarray:
        if self._z is not None:
            return self._z[index]
        return self.norm.apply(np.asarray(self.arr[index], dtype=np.float32))


@dataclass
class _Split:
    """Which target frames / rows train and which validate."""

    mode: str                 # 'temporal' | 'spatial' | 'none'
    train_centres: list[int]
    val_centres: list[int]
    train_rows: tuple[int, int]   # input rows usable by training crops [a, b)
    val_rows: tuple[int, int]     # input rows of the validation band [a, b)


def _centres(t: int, halo: int) -> list[int]:
    """Target frames of a ``t``-frame movie: every frame, the frames near the movie's ends
    with the windows inference gives them (mirrored, then periodic:
    ``tiling.window_index``), once the movie has the ``halo + 1`` frames every window
    needs (none before).  Training on full windows only left those frames -- with a
    long temporal context most of a short movie (22 of 24 frames at halo 11) -- to inputs
    the network had never seen, and fitted the least-squares start on 2 frames."""
    return list(range(t)) if t >= min_frames_for_windows(halo) else []


def _split(shape, mp: WCVDParams, tp: TrainParams) -> _Split:
    """Hold out ``val_frames`` target frames; fall back to a band of rows for small T.

    Target frames: :func:`_centres` (edge frames with mirrored windows).  Temporal
    hold-out (default) needs at least val_frames + 2 of them (T >= 4 for WCVD with
    val_frames=2), so that >= 2 frames remain to train on; the held-out frames are evenly
    spaced inside the movie.  With fewer frames
    the bottom fifth of the rows of *every* target frame is held out instead (at least
    2*halo + 8 rows, training crops stay strictly above it).  If the frames are too small
    for that, or val_frames == 0, there is no validation and the last epoch is kept.
    """
    t, y, _ = shape
    h_t, h_s = mp.halo_t, mp.halo_s
    centres = _centres(t, h_t)
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
    """Random training windows (N, kt, Yc, Xc) with their noisy centre frames, for every model.

    Crops of ``crop`` px carry a real-pixel halo of ``halo_s`` px and train with 'valid'
    padding; when a crop plus its halo does not fit (or ``crop`` is None) whole frames
    train with periodic padding, as inference pads them.  Augmentation: the dihedral
    group (flips in y and x, transposes of square crops), drawn from
    ``np.random.default_rng(seed)``.

    Several stacks (one model for several datasets): each window comes from stack i with
    probability proportional to its training windows x frame area (every training pixel
    equally likely); one crop size for all (whole frames only when all are the same size).
    """

    def __init__(self, sources: list[_Frames], splits: list[_Split], mp: WCVDParams, tp: TrainParams):
        self.sources, self.splits, self.mp, self.tp = sources, splits, mp, tp
        self.rng = np.random.default_rng(tp.seed)
        h = mp.halo_s
        dims = [(sp.train_rows[1] - sp.train_rows[0], src.shape[2]) for src, sp in zip(sources, splits)]
        ny, nx = min(d[0] for d in dims), min(d[1] for d in dims)
        whole = (len(set(dims)) == 1 and all(sp.mode != "spatial" for sp in splits)
                 and (tp.crop is None or tp.crop + 2 * h > min(ny, nx)))
        if whole:  # full frames, periodic padding (paper setting)
            self.padding, self.cy, self.cx = "circular", ny, nx
        else:      # crops with a real-pixel halo, valid padding
            c = tp.crop if tp.crop is not None else max(ny, nx)
            self.padding = "valid"
            self.cy, self.cx = min(c, ny - 2 * h), min(c, nx - 2 * h)
        weight = np.array([len(sp.train_centres) * d[0] * d[1] for sp, d in zip(splits, dims)], dtype=np.float64)
        self.p = weight / weight.sum()

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """x: (n, kt, Yin, Xin) float32 windows; target: (n, Yout, Xout) centre frames."""
        ht, hs = self.mp.halo_t, self.mp.halo_s
        halo = hs if self.padding == "valid" else 0
        iy, ix = self.cy + 2 * halo, self.cx + 2 * halo
        xs = []
        for _ in range(n):
            # one stack: no draw, so single-dataset training keeps its random sequence
            i = 0 if len(self.sources) == 1 else int(self.rng.choice(len(self.sources), p=self.p))
            src, (r0, r1), centres = self.sources[i], self.splits[i].train_rows, self.splits[i].train_centres
            t = centres[self.rng.integers(len(centres))]
            y0 = r0 + self.rng.integers(r1 - r0 - iy + 1)
            x0 = self.rng.integers(src.shape[2] - ix + 1)
            w = window_frames(src, t, ht, slice(y0, y0 + iy), slice(x0, x0 + ix))
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


def _validation_set(z: _Frames, split: _Split, mp: WCVDParams, tp: TrainParams):
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
    x = np.stack([window_frames(z, t, ht, ys, xs) for t in split.val_centres])
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


def _loss(model: BlindSpotModel, x: torch.Tensor, tgt: torch.Tensor, padding: str, amp_ctx) -> torch.Tensor:
    # Self-supervised MSE: output for window centred on t vs noisy frame t (no low-pass,
    # see the module docstring for why a low-pass here would leak the blind spot).
    with amp_ctx:
        out = model(x, padding)[:, 0]
    return F.mse_loss(out.float(), tgt)


@torch.no_grad()
def _evaluate(model: BlindSpotModel, val, device, batch: int, amp_ctx) -> tuple[float, float]:
    """Validation MSE and its standard error (from the spread of per-pixel squared errors),
    over every pixel of the validation sets (one per training stack)."""
    if not val:
        return float("nan"), float("nan")
    model.eval()
    s1 = s2 = 0.0
    count = 0
    for x, tgt, padding in val:
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

    def __init__(self, path, rows=()):
        self.path = None if path is None else os.fspath(path)
        self.fh = None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.fh = open(self.path + ".part", "w", newline="")
            self.writer = csv.DictWriter(self.fh, fieldnames=LOG_COLUMNS)
            self.writer.writeheader()
            for row in rows:  # a resumed run keeps the epochs logged before the kill
                self.writer.writerow(row)

    def row(self, row: dict) -> None:
        if self.fh:
            self.writer.writerow(row)
            self.fh.flush()

    def close(self, ok: bool) -> None:
        if self.fh:
            self.fh.close()
            if ok:
                os.replace(self.path + ".part", self.path)


def epoch_line(row: dict) -> str:
    """One readable log line for a training-log row (what ``progress`` receives), e.g.
    ``epoch 12: train 0.02793, val 0.02799, lr 1.0e-03, 41.2 s`` (losses: MSE in
    normalised units; val 'n/a' without validation)."""
    val = row.get("val_loss")
    val = "n/a" if val is None or val != val else f"{val:.5g}"
    return (f"epoch {row['epoch']}: train {row['train_loss']:.5g}, val {val}, lr {row['lr']:.1e}, "
            f"{row['seconds']:.1f} s")


def optimiser_step(loss: torch.Tensor, opt, scaler) -> None:
    """One optimiser step on ``loss``, through the fp16 GradScaler when there is one."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def lr_factor(total_steps: int, schedule: str, warmup_fraction: float = 0.0):
    """Learning-rate factor per optimiser step: linear warm-up over ``warmup_fraction`` of
    the steps (none when 0), then cosine annealing to 1/100 ('cosine') or constant."""
    warm = max(1, int(round(warmup_fraction * total_steps))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule != "cosine":
            return 1.0
        frac = (step - warm) / max(1, total_steps - warm)
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return factor


def _fingerprint(cls, mp, tp: TrainParams, norms: list, arrs: list) -> dict:
    """What a resume state must match: model, settings, normalisation and the data
    (shape and a hash of a strided subsample, cheap for any size), of every stack."""
    digests = []
    for arr in arrs:
        size = int(np.prod(arr.shape))
        digests.append(hashlib.sha1(io.strided_sample(arr, max(1, size // 1_000_000)).tobytes()).hexdigest())
    settings = {k: v for k, v in asdict(tp).items() if k != "checkpoint_minutes"}  # timing only
    if len(arrs) == 1:
        return {"model": cls.name(mp), "model_params": mp.to_dict(), "train_params": settings,
                "normalisation": norms[0].to_dict(), "shape": list(arrs[0].shape), "data": digests[0]}
    return {"model": cls.name(mp), "model_params": mp.to_dict(), "train_params": settings,
            "normalisation": [n.to_dict() for n in norms], "shape": [list(a.shape) for a in arrs],
            "data": digests}


def _save_resume(path, state: dict) -> None:
    """Write the resume state atomically (a kill mid-write leaves the previous one)."""
    save_checkpoint(state, path)


def _load_resume(path, fingerprint: dict):
    """The saved resume state when ``path`` holds one for this very run, else None."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- a corrupt state is ignored: training restarts
        return None
    return state if state.get("fingerprint") == fingerprint else None


def train_model(stack, model_params=WCVDParams(),
                train_params: TrainParams = TrainParams(), *, log_csv=None,
                progress: Callable[[dict], None] | None = None, resume=None,
                checkpoint_every: float = 600.0, names: list[str] | None = None) -> dict:
    """Train a registered blind-spot model (WCVD, WCID, SHINE, ...) on one (T, Y, X) movie,
    or one model on several.

    stack: (T, Y, X) array in data units (any real dtype; used as float32); at least one
        input window of frames, frames wider than the receptive field (InputError).  An
        array-like that is not a numpy array (a Zarr array) is read crop by crop, never
        whole (same result).  A list of such stacks trains one model on crops from all
        of them (``names``: their dataset names, for the checkpoint and error messages);
        each keeps its own normalisation and its own held-out validation frames, and the
        checkpoint says ``normalise: per_dataset`` (``checkpoint.normalisation_for``).
    model_params: the parameters of the model class to train (``WCVDParams``,
        ``SHINEParams``, ...): the registry finds the class.
    log_csv: optional path of the CSV log (epoch, train_loss, val_loss, lr, seconds);
        losses are MSE in normalised units, seconds = elapsed wall time since start.
    progress: optional callback called with each log row (a dict; plus ``of``, the number
        of epochs) after every epoch.
    resume: path of a resume state: written atomically at the end of an epoch at most
        every ``checkpoint_every`` seconds (wall time; 0 = every epoch) and removed when
        training completes.  A run that finds a state of the same model, settings and
        data there continues from its epoch -- model, optimiser, schedule and sampler
        RNG restored, so the result is bit-identical on the CPU to an uninterrupted run
        (a job killed at a cluster's wall time continues when it is resubmitted).
    Returns the checkpoint dict (see ``checkpoint.save_checkpoint``) holding the weights
    of the epoch chosen by validation (``_select_epoch``; the last epoch when there is no
    validation).  Its key 'model' names the architecture ('wcvd', 'wcid', 'shine').

    Loss: plain MSE between the output for the window centred on t and the noisy frame t
    (no low-pass or any other filter of the output: it would leak the blind spot).
    The learning rate follows :func:`lr_factor` per optimiser step; AMP only on CUDA;
    deterministic algorithms on the CPU (same seed -> bit-identical weights).
    """
    mp, tp = model_params, train_params
    cls = class_for_params(mp)
    several = isinstance(stack, (list, tuple))
    stacks = list(stack) if several else [stack]
    names = list(names) if names else [None] * len(stacks)
    if len(names) != len(stacks):
        raise ValueError(f"{len(names)} names for {len(stacks)} stacks")
    arrs = [_check_stack(s, cls, mp, name) for s, name in zip(stacks, names)]
    device = resolve_device(tp.device)
    norms = [Normalisation.fit(a) for a in arrs]
    sources = [_Frames(a, n) for a, n in zip(arrs, norms)]
    splits = [_split(src.shape, mp, tp) for src in sources]
    n_train = sum(len(sp.train_centres) for sp in splits)
    if not n_train:
        raise InputError(None, "no frames left to train on")
    sampler = _Sampler(sources, splits, mp, tp)
    val = [v for v in (_validation_set(src, sp, mp, tp) for src, sp in zip(sources, splits)) if v is not None]
    steps = tp.steps_per_epoch or max(1, min(math.ceil(n_train / tp.batch_size), tp.max_steps_per_epoch))

    t_start = time.perf_counter()
    fingerprint = _fingerprint(cls, mp, tp, norms, arrs) if resume is not None else None
    saved = _load_resume(resume, fingerprint)
    log = _CsvLog(log_csv, rows=saved["log_rows"] if saved else ())
    ok = False
    with _deterministic(device.type == "cpu"):
        model = cls.build(mp, seed=tp.seed)
        if not saved and tp.linear_start:  # data-driven start (WCVD: least squares) before any step
            model.initialise([(src, sp.train_centres) for src, sp in zip(sources, splits) if sp.train_centres],
                             torch.Generator().manual_seed(int(tp.seed)))
        model = model.to(device)
        model.train()
        opt_cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cls.optimiser]
        opt = opt_cls(model.parameters(), lr=tp.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_factor(tp.epochs * steps, tp.lr_schedule, cls.warmup_fraction))
        amp_ctx, scaler = _amp_context(device, tp.amp)
        history, states = [], {}  # (epoch, val, se); epoch -> weights
        train_loss, first, log_rows = float("nan"), 1, []
        if saved:  # continue where the killed run stopped
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimiser"])
            sched.load_state_dict(saved["schedule"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            sampler.rng.bit_generator.state = saved["sampler_rng"]
            history = [tuple(h) for h in saved["history"]]
            states = {int(k): v for k, v in saved["states"].items()}
            train_loss, first, log_rows = saved["train_loss"], saved["epoch"] + 1, list(saved["log_rows"])
            t_start -= saved["elapsed"]
        if not saved and val and tp.linear_start:
            # the data-driven start is a candidate too (epoch 0): on sparse, very noisy
            # targets a few hundred SGD steps can end worse than the least-squares start
            # (count 0.25 e-/px: 19.9 dB start, 19.05 dB after 100 epochs), and validation
            # then keeps the start
            v0, se0 = _evaluate(model, val, device, tp.batch_size, amp_ctx)
            history.append((0, v0, se0))
            states[0] = _cpu_state(model)
        last_save = time.perf_counter()
        try:
            for epoch in range(first, tp.epochs + 1):
                losses = []
                lr_used = opt.param_groups[0]["lr"]
                for _ in range(steps):
                    xb, tb = sampler.batch(tp.batch_size)
                    xb = torch.from_numpy(xb).to(device, non_blocking=True)
                    tb = torch.from_numpy(tb).to(device, non_blocking=True)
                    loss = _loss(model, xb, tb, sampler.padding, amp_ctx)
                    optimiser_step(loss, opt, scaler)
                    sched.step()
                    losses.append(loss.detach().item())
                train_loss = float(np.mean(losses))
                val_loss, val_se = _evaluate(model, val, device, tp.batch_size, amp_ctx)
                if val:
                    history.append((epoch, val_loss, val_se))
                    states[epoch] = _cpu_state(model)
                    _prune_states(states, history, tp.val_tolerance)
                row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                       "lr": lr_used, "seconds": round(time.perf_counter() - t_start, 3)}
                log.row(row)
                log_rows.append(row)
                if resume is not None and epoch < tp.epochs and time.perf_counter() - last_save >= checkpoint_every:
                    _save_resume(resume, {
                        "fingerprint": fingerprint, "epoch": epoch, "model": _cpu_state(model),
                        "optimiser": opt.state_dict(), "schedule": sched.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "sampler_rng": sampler.rng.bit_generator.state, "history": [list(h) for h in history],
                        "states": {str(k): v for k, v in states.items()}, "train_loss": train_loss,
                        "log_rows": log_rows, "elapsed": time.perf_counter() - t_start})
                    last_save = time.perf_counter()
                if progress is not None:
                    progress({**row, "of": tp.epochs})  # the total, for a progress bar
            ok = True
        finally:
            log.close(ok)
    if resume is not None and os.path.isfile(resume):
        os.remove(resume)  # complete: the checkpoint below supersedes it
    ckpt = _checkpoint(cls, model, states, history, mp, tp, norms[0], splits[0], arrs[0], device, train_loss,
                       t_start, steps)
    if several:  # one model for several datasets: each is normalised with its own statistics
        ckpt.update(normalise="per_dataset", train_on=names, normalisations=[n.to_dict() for n in norms],
                    input_shape=[list(a.shape) for a in arrs],
                    validation=[{"mode": sp.mode, "frames": list(sp.val_centres), "rows": list(sp.val_rows)}
                                for sp in splits])
    return ckpt


#: compare_reach pairs the candidates' squared errors in blocks of this many px a side:
#: neighbouring pixels' errors correlate (they share the kernels' inputs), blocks of
#: 16 x 16 px are much wider than the 7 x 7 px kernels, so their means are ~independent.
REACH_BLOCK = 16
REACH_RULE = ("the least-squares starts (WCVD.initialise on the training frames) of the context network at each "
              "reach, scored on the held-out validation frames; a longer reach only when its loss is lower than the "
              "preferred one's by min_z standard errors of the paired difference (block means)")


#: Training of the mix's gate (:func:`fit_mix_gate`): optimiser steps per parity (cosine
#: decay), crops of pixels per step, and how often the held-out loss is measured.  On the
#: quality suite's 50 x 256² movies the held-out loss levels off after 2000-3000 steps
#: and creeps up after 8000 (PSNR vs truth, PSF 1.5 px dynamic: 33.15 dB at 2000-3000,
#: 33.01 at 8000), so the best measured step is kept.
GATE_STEPS = 3000
GATE_BATCH = 8192
GATE_EVAL_EVERY = 250
GATE_HIDDEN = 32
#: ... and training stops early after this many measurements without a new lowest loss.
GATE_PATIENCE = 4
#: Fewer sampled pixels of a parity than this and the gate is not fitted (its ~3000
#: weights would fit the noise).
GATE_MIN_PIXELS = 50_000


def fit_mix_gate(samples: dict, *, seed: int = 0, steps: int = GATE_STEPS, hidden: int = GATE_HIDDEN,
                 batch: int = GATE_BATCH, lr: float = 1e-3, threads: int | None = None,
                 min_pixels: int = GATE_MIN_PIXELS) -> dict:
    """Fit the Gaussian mix's gate (``models.MixGate``) on its sampled pixels, cross-fitted.

    samples: ``filters.blind_gaussian_mix(..., samples=n).samples`` -- 'features' (n, K)
    the blind dictionary outputs, 'structure' (n,), 'target' (n,) the noisy pixels (data
    units), 'frame' (n,).  For each parity p a gate is trained on the pixels of the frames
    of the other parity (Adam, ``steps`` steps of ``batch`` random pixels, cosine decay,
    started from the least-squares linear mix with the MLP's output at zero) and the step
    whose loss on the frames of parity p is lowest (measured every ``GATE_EVAL_EVERY``)
    is kept (training stops after ``GATE_PATIENCE`` measurements without a new lowest
    one): weights[p] then predict frame t of parity p without having been fitted on
    it, so the loss ``filters.gaussian_mix_apply`` reports is a held-out one, as the mix's.
    The loss is Noise2Self's: every input is blind to the predicted pixel.
    Deterministic on the CPU (seeded, deterministic algorithms).  threads: torch's CPU
    threads while fitting (the workflow job's allocation; None: torch's default), restored
    afterwards.

    Returns the JSON-able gate for ``filters.mix_gate_predict``: 'scale' [mean, SD] of
    the targets, 'structure' [mean, SD, eps] of log(structure + eps), 'hidden', 'weights'
    [p0, p1], 'steps' (the kept step of each), 'held_out' (each one's held-out losses,
    data units², one per evaluation; the first is the linear start's), 'pixels' per parity.
    Raises InputError when a parity has fewer than ``min_pixels`` pixels.  ``steps`` 0: the
    least-squares linear mix alone (cross-fitted all the same; ``auto``'s ensemble on small
    movies, ``pipeline.ensemble``).
    """
    feats = np.asarray(samples["features"], dtype=np.float32)
    target = np.asarray(samples["target"], dtype=np.float64)
    parity = np.asarray(samples["frame"]) % 2
    counts = [int(np.sum(parity == p)) for p in (0, 1)]
    if min(counts) < min_pixels:
        raise InputError(None, f"the gate needs {min_pixels} sampled pixels of each frame parity, got {counts}")
    mu, sd = float(target.mean()), float(target.std())
    sd = sd if sd > 0 else 1.0
    structure = np.asarray(samples["structure"], dtype=np.float64)
    eps = 1e-6 * float(np.median(structure)) + 1e-30
    ls = np.log(structure + eps)
    gate = {"scale": [mu, sd], "structure": [float(ls.mean()), float(ls.std()) or 1.0, eps], "hidden": int(hidden)}
    f_np, x_np = filters.mix_gate_inputs(gate, feats, structure)
    f_all, x_all = torch.from_numpy(f_np), torch.from_numpy(x_np)
    y_all = torch.from_numpy(((target - mu) / sd).astype(np.float32))
    weights, kept, held = [], [], []
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with _deterministic(True):
            for p in (0, 1):
                tr = torch.from_numpy(np.flatnonzero(parity != p))
                te = torch.from_numpy(np.flatnonzero(parity == p))
                gen = torch.Generator().manual_seed(int(seed) * 2 + p)
                model = MixGate(f_all.shape[1], hidden, gen)
                with torch.no_grad():  # the least-squares linear mix (float64 normal equations)
                    a = torch.cat([f_all[tr].double(), torch.ones(len(tr), 1, dtype=torch.float64)], 1)
                    g = a.T @ a
                    g += 1e-7 * torch.trace(g) / len(g) * torch.eye(len(g), dtype=torch.float64)
                    sol = torch.linalg.solve(g, a.T @ y_all[tr].double())
                    model.lin.weight.copy_(sol[:-1][None].float())
                    model.lin.bias.fill_(float(sol[-1]))

                def held_out() -> float:
                    with torch.no_grad():
                        return float(sum(torch.sum((model(f_all[i], x_all[i]) - y_all[i]) ** 2).item()
                                         for i in te.split(2**18)) / len(te))

                opt = torch.optim.Adam(model.parameters(), lr=lr)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(steps, "cosine"))
                losses = [held_out()]
                best = (losses[0], 0, model.export())
                for step in range(1, steps + 1):
                    i = tr[torch.randint(0, len(tr), (batch,), generator=gen)]
                    loss = torch.mean((model(f_all[i], x_all[i]) - y_all[i]) ** 2)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    if step % GATE_EVAL_EVERY == 0 or step == steps:
                        losses.append(held_out())
                        if losses[-1] < best[0]:
                            best = (losses[-1], step, model.export())
                        elif step - best[1] >= GATE_PATIENCE * GATE_EVAL_EVERY:
                            break
                weights.append(best[2])
                kept.append(best[1])
                held.append([v * sd * sd for v in losses])
    finally:
        torch.set_num_threads(threads_before)
    return {**gate, "weights": weights, "steps": kept, "held_out": held, "pixels": counts}


@torch.no_grad()
def compare_reach(stack, candidates: list, train_params: TrainParams = TrainParams(), *,
                  min_z: float = 2.0, names: list[str] | None = None) -> dict:
    """Choose the temporal context radius R of a WCVD + context model before training it.

    candidates: ``WCVDParams`` that differ in ``context`` only, the *preferred* reach first
        (the pipeline's: the longest one whose output uMSE can still score, so the report
        can check the model against frames it never saw).
    Each candidate starts as :meth:`WCVD.initialise` starts it in :func:`train_model`
    (same seed, same training frames: the best linear blind-spot predictor on its
    support) and is scored on the validation windows training holds out (same frames,
    same crop): the mean squared error against the noisy centre frame, MSE + the noise
    variance for every candidate alike.  Training changes little of what the start
    already gets from temporal averaging (measured on 50 x 256² movies: the validation
    minimum was the start itself), so the start ranks the reaches for a few seconds of
    least squares instead of a training run each.  A longer reach is chosen only when
    its loss is lower than the preferred one's by ``min_z`` standard errors of the
    paired per-block difference (:data:`REACH_BLOCK`); otherwise the preferred reach
    (a coin flip between equals lands on the checkable one).  Without validation frames
    (``val_frames: 0``, tiny stacks) or a least-squares start there is nothing to
    compare on: the longest reach, as configured before this choice existed.

    Returns {'reaches': [R, ...], 'val_loss': [...], 'z': [...] (vs the preferred; 0 for
    it), 'blocks': n, 'min_z', 'chosen': R, 'rule'} (plain lists: JSON and checkpoint safe).
    """
    tp = train_params
    reaches = [int(p.context) for p in candidates]
    longest = max(reaches)
    record = {"reaches": reaches, "val_loss": [], "z": [], "blocks": 0, "min_z": float(min_z), "rule": REACH_RULE}
    stacks = list(stack) if isinstance(stack, (list, tuple)) else [stack]
    names = list(names) if names else [None] * len(stacks)
    cls = class_for_params(candidates[0])
    arrs = [_check_stack(s, cls, candidates[0], n) for s, n in zip(stacks, names)]
    sources = [_Frames(a, Normalisation.fit(a)) for a in arrs]
    errors = []  # per candidate: per stack (n, Y, X) squared errors of its start
    for mp in candidates:
        if len(candidates) < 2 or not tp.linear_start:
            break
        splits = [_split(src.shape, mp, tp) for src in sources]
        val = [_validation_set(src, sp, mp, tp) for src, sp in zip(sources, splits)]
        if any(v is None for v in val) or not all(sp.train_centres for sp in splits):
            break
        with _deterministic(True):
            model = cls.build(mp, seed=tp.seed)
            model.initialise([(src, sp.train_centres) for src, sp in zip(sources, splits)],
                             torch.Generator().manual_seed(int(tp.seed)))
        model.eval()
        per = []
        for x, tgt, padding in val:
            out = torch.cat([model(torch.from_numpy(x[i:i + 1]), padding)[:, 0] for i in range(len(x))])
            per.append((out.double() - torch.from_numpy(tgt).double()).pow(2).numpy())
        errors.append(per)
    if len(errors) < len(candidates) or len(candidates) < 2:
        return {**record, "chosen": longest, "val_loss": [], "z": [],
                "note": "no validation frames or least-squares start to compare on: the longest reach"}
    b = REACH_BLOCK
    blocks = []
    for per in errors:  # block means, the same blocks for every candidate
        means = []
        for e in per:
            n, yy, xx = e.shape
            ny, nx = max(1, yy // b), max(1, xx // b)
            by, bx = yy // ny, xx // nx
            means.append(e[:, :ny * by, :nx * bx].reshape(n, ny, by, nx, bx).mean((2, 4)).ravel())
        blocks.append(np.concatenate(means))
    losses = [float(np.mean(np.concatenate([e.ravel() for e in per]))) for per in errors]
    zs = [0.0]
    for k in range(1, len(candidates)):
        d = blocks[k] - blocks[0]
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
        zs.append(float(d.mean() / se) if se > 0 else (0.0 if d.mean() == 0 else float(np.sign(d.mean())) * np.inf))
    better = [k for k in range(1, len(candidates)) if zs[k] <= -min_z]
    k_best = min(better, key=lambda k: losses[k]) if better else 0
    return {**record, "val_loss": losses, "z": zs, "blocks": int(len(blocks[0])), "chosen": reaches[k_best]}


def _checkpoint(cls, model, states: dict, history: list, mp, tp: TrainParams, norm,
                split, arr, device, train_loss, t_start: float, steps: int) -> dict:
    """The checkpoint dict of a finished training run (every model): weights of the
    selected validation epoch (``_select_epoch``; the minimum if that epoch's weights
    were pruned), or of the last epoch when there was no validation."""
    if history:
        best_epoch = _select_epoch(history, tp.val_tolerance)
        e_min, v_min, _ = min(history, key=lambda h: h[1])
        if best_epoch not in states:  # pruned (see _prune_states): fall back to the minimum
            best_epoch = e_min
        _, best_val, best_se = next(h for h in history if h[0] == best_epoch)
        state = states[best_epoch]
    else:
        best_epoch, best_val, best_se, e_min, v_min = tp.epochs, float("nan"), float("nan"), 0, float("nan")
        state = _cpu_state(model)
    return {
        "format": cls.checkpoint_format,
        "model": cls.name(mp),
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
        "steps_per_epoch": int(steps),
        "blind_radius": int(mp.blind_radius),
        "window": int(mp.kt_eff),
        "validation": {"mode": split.mode, "frames": list(split.val_centres),
                       "rows": list(split.val_rows)},
        "input_shape": list(arr.shape),
        "device": str(device),
        "train_seconds": time.perf_counter() - t_start,
    }


def _cpu_state(model: BlindSpotModel) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _prune_states(states: dict, history: list, tolerance: float) -> None:
    """Keep the weights of the minimum-validation epoch and of the latest ``_KEEP_STATES``
    epochs within the current selection limit (``_select_epoch``); drop the rest."""
    e_min, v_min, se_min = min(history, key=lambda h: h[1])
    limit = v_min + tolerance * se_min
    within = [e for e, v, _ in history if v <= limit and e in states]
    keep = set(within[-_KEEP_STATES:]) | {e_min}
    for e in list(states):
        if e not in keep:
            del states[e]
