"""Quality metrics with and without ground truth.

Without ground truth (real data):

- uMSE / uPSNR (WCVD eqs. 1-2, after UDVD): the MSE against the unknown clean movie,
  estimated from other noisy frames of the same (static, aligned) scene.
- SNR from neighbouring frames (SHINE eq. 5): ``10 log10(p / (1 - p))`` with p the
  correlation of two noisy views of the same scene.

With ground truth (synthetic data): PSNR and SSIM (scikit-image).

uMSE frame choice. For output frame t, with r the uMSE radius::

    a = y[t - r - 1]     nearest earlier frame the denoiser did NOT see
    b = y[t + r + 1]     c = y[t + r + 2]     nearest later pair, also unseen
    uMSE = mean_t,px (f(y)[t] - a)^2 - 1/2 mean_t,px (b - c)^2,   t = r+1 .. T-r-3

With independent zero-mean noise and a static scene, E(f - a)^2 = MSE + var(noise) and
E(b - c)^2 / 2 = var(noise), so uMSE is unbiased. ``a`` must be independent of the
denoised value: if the denoiser used frame ``a`` (its temporal *reach*, the frames on
each side of t its output depends on, is >= r + 1) the shared noise makes (f - a)^2 too
small and uMSE too optimistic, even negative - for gaussian3d(sigma=1) with r = 0 the
bias is about half the noise variance. So one radius serves all compared methods,
r = max(wanted, largest reach) (:func:`compute_metrics`; reaches from
``emdenoise.filters.temporal_reach``: raw / gaussian2d 0, gaussian3d ceil(2 sigma_t),
WCVD kt // 2, SHINE frames // 2); every method is then scored on the same frames. ``b``
and ``c`` only measure the noise power, so they may be seen by the denoiser.
Signal changes between the frames (dynamics, the up to 0.5 px sub-pixel drift that
integer alignment leaves) add to both terms and bias uMSE upwards.

Neighbour SNR. SHINE correlates frames t and t + 1; the output frames of a temporal
filter share input frames, so their noise correlates and pure noise scores a positive
SNR. :func:`compute_metrics` correlates output frames t and t + 2r + 1 instead: their
input windows [t - r, t + r] and [t + r + 1, t + 3r + 1] do not overlap for any method
with reach <= r.

Short movies. uMSE at radius r needs T >= 2r + 4. :func:`compute_metrics` (a report)
uses the widest reach that still leaves ``MIN_SCORED_FRAMES`` frames scored and gives NaN
uMSE / uPSNR / SNR to the methods whose reach exceeds it (column ``umse_valid`` False),
instead of scoring them with a bias.

Model choice (:func:`select_model`) does not use uMSE: it compares the self-supervised
(Noise2Self) loss of each candidate's J-invariant output, which is unbiased whatever
the temporal reach and whatever the scene does between frames (see there).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = ["umse", "upsnr", "neighbour_corr", "snr_neighbour", "psnr", "ssim",
           "compute_metrics", "checkable_reach", "reach_sentence", "unscored_sentence", "self_supervised_loss",
           "self_supervised_loss_per_frame", "select_model", "MIN_SCORED_FRAMES"]

#: uMSE in the metrics table must score at least this many frames (T >= 2 r + 3 + this):
#: a method of longer reach gets no uMSE rather than a figure from one or two frames.
MIN_SCORED_FRAMES = 8


#: Frames read at once by the streamed whole-stack reductions (max, PSNR): about this
#: many bytes of float64 per block, at least one frame.
BLOCK_BYTES = 32 * 2**20


def _stack(x, what: str):
    """Checked (T, Y, X) array, dtype kept, not loaded: an array-like with ``shape`` and
    ``__getitem__`` (NumPy, Zarr, ``io.LazyStack``, ``filters.FrameMap``) is read frame
    by frame (or in blocks of ``BLOCK_BYTES``) by the functions here; frames are cast to
    float64 one at a time.  Memory is then a few frames, whatever T."""
    if not (hasattr(x, "shape") and hasattr(x, "__getitem__")):
        x = np.asarray(x)
    if len(x.shape) != 3:
        raise InputError(None, f"{what}: expected a (T, Y, X) stack, got shape {tuple(x.shape)}")
    return x


def _blocks(x):
    """Yield blocks x[a:b] of whole frames, as arrays (~``BLOCK_BYTES`` of float64)."""
    n, frame = int(x.shape[0]), int(np.prod(x.shape[1:]))
    k = max(1, BLOCK_BYTES // (8 * max(1, frame)))
    for a in range(0, n, k):
        yield np.asarray(x[a:a + k])


def stack_max(x) -> float:
    """Maximum of a (T, Y, X) array-like (NumPy or lazy, read block by block)."""
    if isinstance(x, np.ndarray):
        return float(np.max(x))
    return max(float(np.max(b)) for b in _blocks(x))


def stack_min(x) -> float:
    """Minimum of a (T, Y, X) array-like (NumPy or lazy, read block by block)."""
    if isinstance(x, np.ndarray):
        return float(np.min(x))
    return min(float(np.min(b)) for b in _blocks(x))


class _Frames:
    """Frame t of a (T, Y, X) array-like as an array in its own dtype, the last ``keep``
    frames kept: a pass that reads frames t and t + lag (or t - r - 1, ...) in increasing t
    through one cache per stream reads a lazy stack about once.  Kept in the stack's dtype
    (float32: half of float64) and cast by row strips where used (:func:`_row_strips`)."""

    def __init__(self, x, keep: int = 2):
        self.x, self.keep, self.cache = x, int(keep), {}

    def __call__(self, t: int) -> np.ndarray:
        f = self.cache.get(t)
        if f is None:
            f = self.cache[t] = np.asarray(self.x[t])
            if len(self.cache) > self.keep:
                self.cache.pop(next(iter(self.cache)))
        return f


#: Pixels per row strip in the frame-wise sums: their float64 temporaries are ~32 MB each
#: whatever the frame size (a 4096² frame in float64 is 134 MB, and a sum like
#: mean((f - y)²) made several).  Frames up to 2048² are one strip: the very sums of a
#: whole-frame NumPy expression.
STRIP_PX = 2**22


def _row_strips(shape) -> list[slice]:
    """Slices of rows of a (Y, X) frame, each at most ``STRIP_PX`` pixels (>= one row)."""
    ny, nx = int(shape[0]), int(shape[1])
    rows = max(1, STRIP_PX // max(1, nx))
    return [slice(a, min(ny, a + rows)) for a in range(0, ny, rows)]


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _sum_sq_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over pixels of ``(a - b)²`` for two (Y, X) frames, in float64, by row strips."""
    total = 0.0
    for rows in _row_strips(a.shape):
        d = _f64(a[rows]) - _f64(b[rows])
        total += float(np.sum(d * d))
    return total


def _mean_sq_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over pixels of ``(a - b)²`` for two (Y, X) frames (:func:`_sum_sq_diff`)."""
    return _sum_sq_diff(a, b) / a.size


def _frame_mean(a: np.ndarray) -> float:
    """Mean of a (Y, X) frame in float64, by row strips."""
    return sum(float(np.sum(_f64(a[rows]))) for rows in _row_strips(a.shape)) / a.size


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(None, f"{what}: shapes differ, {a.shape} vs {b.shape}")


def umse(denoised, noisy, *, temporal_radius: int = 0) -> float:
    """Unsupervised mean squared error (WCVD eq. 1); frame choice in the module docstring.

    Parameters
    ----------
    denoised : (T, Y, X) array
        Denoised movie f(y), same frames as ``noisy``.
    noisy : (T, Y, X) array
        The noisy (aligned, raw) movie y, same units.
    temporal_radius : int
        Frames on each side of t that the denoiser used (0 for per-frame methods).

    Returns
    -------
    float
        uMSE in squared intensity units, averaged over frames t = r+1 .. T-r-3 and all
        pixels. Can be negative when the denoiser is near perfect (estimation noise).

    Raises
    ------
    InputError
        If T < 2 * temporal_radius + 4 or the shapes differ.
    """
    return float(np.nanmean(umse_per_frame(denoised, noisy, temporal_radius=temporal_radius, what="umse")))


def upsnr(denoised, noisy, peak: float | None = None, *, temporal_radius: int = 0) -> float:
    """Unsupervised PSNR in dB (WCVD eq. 2): ``10 log10(M^2 / uMSE)``.

    ``M`` = ``peak`` or, if None, the maximum of the raw ``noisy`` stack (the "intensity
    peak of the experimental images"; in counting data it is a noisy extreme, so pass
    one fixed peak when comparing datasets). Returns NaN when uMSE <= 0 (the estimate
    is then meaningless - the noise-power term dominated).
    """
    y = _stack(noisy, "upsnr")
    m = stack_max(y) if peak is None else float(peak)
    err = umse(denoised, y, temporal_radius=temporal_radius)
    return float(10.0 * np.log10(m * m / err)) if err > 0 else float("nan")


def neighbour_corr(stack, lag: int = 1) -> float:
    """Mean over t of the Pearson correlation (all pixels) of frames t and t + ``lag``.

    stack: (T, Y, X), any real dtype (frames cast to float64 one at a time); lag >= 1
    frames, T >= lag + 1 (InputError). A flat frame counts as correlation 0.
    """
    y = _stack(stack, "neighbour_corr")
    lag = int(lag)
    if lag < 1:
        raise InputError(None, f"neighbour_corr: lag must be >= 1, got {lag}")
    if y.shape[0] < lag + 1:
        raise InputError(None, f"neighbour_corr: needs at least {lag + 1} frames for lag {lag}, got {y.shape[0]}")
    corrs = []
    first, second = _Frames(y, 1), _Frames(y, 1)  # two streams: each frame read about twice, not per pair
    for t in range(y.shape[0] - lag):
        a, b = first(t), second(t + lag)
        ma, mb = _frame_mean(a), _frame_mean(b)
        saa = sbb = sab = 0.0
        for rows in _row_strips(a.shape):
            da, db = _f64(a[rows]) - ma, _f64(b[rows]) - mb
            saa, sbb, sab = saa + float(np.sum(da * da)), sbb + float(np.sum(db * db)), sab + float(np.sum(da * db))
        denom = np.sqrt(saa * sbb)
        corrs.append(sab / denom if denom > 0 else 0.0)
    return float(np.mean(corrs))


def snr_from_corr(p: float) -> float:
    """SHINE eq. 5: ``10 log10(p / (1 - p))`` dB; NaN if p <= 0, inf if p >= 1."""
    if not p > 0:
        return float("nan")
    if p >= 1:
        return float("inf")
    return float(10.0 * np.log10(p / (1.0 - p)))


def snr_neighbour(stack, lag: int = 1) -> float:
    """SNR in dB from two frames of the same scene (SHINE eq. 5).

    ``p`` = :func:`neighbour_corr` of frames t and t + ``lag``; ``SNR = 10 log10(p / (1 -
    p))``. Averaging p before the log keeps one poorly correlated pair from dominating and
    the log well defined. For signal variance S and independent noise variance N,
    p = S / (S + N), so SNR = 10 log10(S / N). The noise of the two frames must be
    independent: for a denoiser with temporal reach R use lag >= 2R + 1 (lag 1, SHINE's
    choice, is right only for per-frame methods). Returns NaN if p <= 0 and inf if
    p >= 1. Needs T >= lag + 1 (InputError).
    """
    return snr_from_corr(neighbour_corr(_stack(stack, "snr_neighbour"), lag))


def _data_range(truth) -> float:
    rng = stack_max(truth) - stack_min(truth)
    return rng if rng > 0 else 1.0  # a flat truth: any positive range gives finite scores


def psnr(denoised, truth) -> float:
    """PSNR in dB against ground truth over the whole (T, Y, X) stack,
    data range = max - min of ``truth``; 10 log10(range^2 / MSE) as
    ``skimage.metrics.peak_signal_noise_ratio``, the squared error summed frame by frame
    (lazy arrays are read one frame at a time; inf when the MSE is 0)."""
    f, x = _stack(denoised, "psnr"), _stack(truth, "psnr")
    _same_shape(f, x, "psnr")
    sse = 0.0
    for t in range(x.shape[0]):
        sse += _sum_sq_diff(np.asarray(x[t]), np.asarray(f[t]))
    mse = sse / float(np.prod(x.shape))
    rng = _data_range(x)
    return float(10.0 * np.log10(rng * rng / mse)) if mse > 0 else float("inf")


def ssim(denoised, truth) -> float:
    """Mean over frames of the 2D SSIM against ground truth, data range = max - min
    of the whole ``truth`` stack (one range for all frames, as for :func:`psnr`)."""
    from skimage.metrics import structural_similarity  # deferred: scipy.stats costs ~0.3 s at start-up

    f, x = _stack(denoised, "ssim"), _stack(truth, "ssim")
    _same_shape(f, x, "ssim")
    rng = _data_range(x)
    return float(np.mean([structural_similarity(np.asarray(x[t], dtype=np.float64), np.asarray(f[t], dtype=np.float64),
                                                data_range=rng) for t in range(x.shape[0])]))


def feasible_radius(n_frames: int, wanted: int = 2) -> int:
    """Largest uMSE temporal radius <= ``wanted`` that ``n_frames`` allow (T >= 2r + 4)."""
    return max(0, min(int(wanted), (int(n_frames) - 4) // 2))


def _reach_values(reaches) -> list[int]:
    vals = list(reaches.values()) if isinstance(reaches, Mapping) else list(reaches)
    out = []
    for v in vals:
        if v is None or int(v) != v or int(v) < 0:
            raise InputError(None, f"temporal reach must be an integer >= 0 (frames), got {v!r}")
        out.append(int(v))
    return out


#: Columns of :func:`compute_metrics`.
METRIC_COLUMNS = ["method", "reach", "umse", "upsnr_db", "snr_db", "snr_corr", "psnr_db", "ssim",
                  "umse_radius", "snr_lag", "umse_valid"]


def checkable_reach(n_frames: int) -> int:
    """The longest temporal reach (frames each side) whose output :func:`compute_metrics`
    can still score with uMSE on an ``n_frames`` movie: radius r needs T >= 2 r + 3 +
    :data:`MIN_SCORED_FRAMES` frames.  Negative when even reach 0 cannot be scored."""
    return (int(n_frames) - 3 - MIN_SCORED_FRAMES) // 2


def compute_metrics(method_stacks: dict, noisy, truth=None, peak: float | None = None, *,
                    reaches: Mapping[str, int], temporal_radius: int = 2) -> pd.DataFrame:
    """All metrics for several methods on the same movie, at one uMSE radius.

    Parameters
    ----------
    method_stacks : dict of str -> (T, Y, X) array
        E.g. {'raw': noisy, 'gaussian3d': ..., 'model': ...}, all the shape of ``noisy``.
    noisy : (T, Y, X) array
        Aligned raw movie (reference for uMSE; its max is the uPSNR peak unless ``peak``).
    truth : (T, Y, X) array or None
        Ground truth (synthetic data); None gives NaN PSNR / SSIM.
    peak : float or None
        M of uPSNR, the same for all methods.
    reaches : mapping str -> int
        Temporal reach (frames) of every method in ``method_stacks``
        (``emdenoise.filters.temporal_reach``); a missing one is an InputError.
    temporal_radius : int
        Smallest uMSE radius wanted; the radius used is r = max(this, largest reach
        that leaves ``MIN_SCORED_FRAMES`` frames scored), at most (T - 4) // 2; the
        methods with reach > r get NaN uMSE, uPSNR and SNR (``umse_valid`` False).

    Returns
    -------
    pandas.DataFrame
        One row per method, columns ``METRIC_COLUMNS``: method, reach, umse, upsnr_db,
        snr_db (SHINE eq. 5 from output frames t and t + snr_lag), snr_corr (its p),
        psnr_db, ssim, umse_radius (r: frames t-r-1, t+r+1, t+r+2), snr_lag (2r + 1),
        umse_valid.

    Raises
    ------
    InputError
        Shapes differ, a reach is missing, or T < 4.
    """
    y = _stack(noisy, "compute_metrics")
    missing = [name for name in method_stacks if name not in reaches]
    if missing:
        raise InputError(None, f"compute_metrics: no temporal reach given for {missing}")
    n = y.shape[0]
    if n < 4:
        raise InputError(None, f"compute_metrics: uMSE needs at least 4 frames, got {n}")
    own = {name: reaches[name] for name in method_stacks}
    _reach_values(own)
    scorable = [int(v) for v in own.values() if int(v) <= checkable_reach(n)]
    r = min(max([int(temporal_radius)] + scorable), (n - 4) // 2)
    lag = 2 * r + 1
    m = stack_max(y) if peak is None else float(peak)
    rows = []
    for name, stack in method_stacks.items():
        f = _stack(stack, f"compute_metrics[{name}]")
        _same_shape(f, y, f"compute_metrics[{name}]")
        valid = int(own[name]) <= r
        err = umse(f, y, temporal_radius=r) if valid else float("nan")
        p = neighbour_corr(f, lag) if valid else float("nan")
        rows.append({
            "method": name,
            "reach": int(own[name]),
            "umse": err,
            "upsnr_db": float(10.0 * np.log10(m * m / err)) if err > 0 else float("nan"),
            "snr_db": snr_from_corr(p),
            "snr_corr": p,
            "psnr_db": float("nan") if truth is None else psnr(f, truth),
            "ssim": float("nan") if truth is None else ssim(f, truth),
            "umse_radius": r,
            "snr_lag": lag,
            "umse_valid": valid,
        })
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


SELECT_RULE = ("lowest self-supervised (Noise2Self) loss mean (f_J(y) - y)^2 of each candidate's "
               "J-invariant output f_J (blind to its own pixel and the noise-correlated pixels around it) "
               "against the aligned noisy movie y: MSE + the same noise variance for every candidate; "
               "the tuned Gaussian unless another is lower by more than SELECT_MIN_Z standard errors "
               "of the per-frame difference")


def self_supervised_loss_per_frame(blind, noisy, region=None) -> np.ndarray:
    """Noise2Self loss of each frame, mean (f_J(y)[t] - y[t])^2 over its pixels: (T,)
    float64 in squared input units (frame by frame: lazy Zarr arrays are fine).

    ``blind`` must be J-invariant: its value at (t, p) must not depend on y(t, q) for
    the q whose noise correlates with that of p (a blind-spot network's output, the
    masked Gaussian ``filters.normalised_gaussian3d(..., blind_radius=b)``).  Then
    E loss = MSE against the clean movie + mean noise variance (Batson & Royer 2019).
    ``region``: (slice_y, slice_x) of the pixels scored (None: all), cut from each frame.
    """
    f, y = _stack(blind, "self_supervised_loss"), _stack(noisy, "self_supervised_loss")
    _same_shape(f, y, "self_supervised_loss")
    cut = tuple(region) if region is not None else (slice(None), slice(None))
    out = np.empty(y.shape[0])
    for t in range(y.shape[0]):
        d = np.asarray(f[t][cut], np.float64) - np.asarray(y[t][cut], np.float64)
        out[t] = np.mean(d * d)
    return out


def frame_difference_variance(noisy, region=None) -> float:
    """Half the mean squared difference of adjacent frames, (1/2) E (y[t+1] - y[t])^2,
    float64, read frame by frame (``region``: (slice_y, slice_x) of each frame, None: all).
    For noise independent between frames this is the mean noise variance plus half the
    mean squared change of the scene between adjacent frames (an upper bound on the
    noise variance; exact for a still scene).  NaN for fewer than 2 frames."""
    y = _stack(noisy, "frame_difference_variance")
    cut = tuple(region) if region is not None else (slice(None), slice(None))
    if y.shape[0] < 2:
        return float("nan")
    total, prev = 0.0, np.asarray(y[0][cut], np.float64)
    for t in range(1, y.shape[0]):
        cur = np.asarray(y[t][cut], np.float64)
        d = cur - prev
        total += float(np.mean(d * d))
        prev = cur
    return 0.5 * total / (y.shape[0] - 1)


def self_supervised_loss(blind, noisy, region=None) -> float:
    """The Noise2Self loss over the whole movie (or ``region`` of every frame): the mean of
    :func:`self_supervised_loss_per_frame` (every frame has the same pixels)."""
    return float(np.mean(self_supervised_loss_per_frame(blind, noisy, region)))


#: A network replaces the fallback (the tuned Gaussian) only when its loss is lower by
#: more than this many standard errors of the per-frame paired difference.  At low dose the
#: losses of good candidates differ by 1e-4 of their value, below the loss's own noise:
#: measured on a 24 x 128² movie at 0.25 e-/px the context network "won" by 0.3 standard
#: errors and was 0.45 dB below the Gaussian in truth.
SELECT_MIN_Z = 2.0


def select_model(losses: Mapping[str, float], frame_losses: Mapping[str, Sequence[float]] | None = None, *,
                 fallback: str = "classical", min_z: float = SELECT_MIN_Z) -> dict:
    """Choose among denoisers of one movie without ground truth: the lowest Noise2Self loss,
    the ``fallback`` unless another is significantly lower.

    Parameters
    ----------
    losses : mapping name -> float
        :func:`self_supervised_loss` of each candidate's J-invariant output against the
        same aligned noisy movie, on the same pixels (the networks' output before any
        low-pass; the tuned Gaussian's masked version at its chosen sigma).
    frame_losses : mapping name -> (T,) floats, or None
        The same per frame (:func:`self_supervised_loss_per_frame`).  When the lowest
        loss is not the ``fallback``'s and both have them, the winner must beat the
        fallback by ``min_z`` standard errors of the mean per-frame difference (frames
        whose noise is independent: the frame-to-frame spread of the difference holds
        the loss's estimation noise) -- else the fallback is chosen: a coin flip between
        candidates as good as each other should land on the simpler, predictable one.
    fallback, min_z
        Its name (the tuned Gaussian) and the margin (``SELECT_MIN_Z``).

    Returns
    -------
    dict
        {'chosen': name, 'rule': SELECT_RULE, 'loss': {name: loss}, 'excess':
        {name: loss / lowest loss - 1}}, and with the test above 'significance':
        {'versus', 'z' (mean difference / its standard error; negative: the winner is
        lower), 'frames', 'min_z', 'kept' (the name chosen by it)}.

    Why this and not uMSE (as before): for a J-invariant f_J, E (f_J - y)^2 = E (f_J - x)^2
    + E (y - x)^2, so loss differences are MSE differences, whatever the candidate's
    temporal reach (uMSE must score against frames no candidate saw: a 24-frame movie
    could not score a Gaussian averaging more than 6 frames each side, where the best
    one averages all 24) and whatever the scene does between frames (uMSE compares with
    other frames, so motion biases it towards temporal smoothing).  Measured on 24-frame
    synthetic movies: the loss-chosen sigma came within 0.04 dB of the oracle's (count
    1 e/px static and dynamic, linear mode PSF 1.5 px), vs 1.4-2.9 dB below with uMSE.
    It needs the blind region J to cover the noise's spatial correlation (the noise
    stage's blind spot, the same for every candidate): a candidate that sees
    correlated neighbours (a too-small blind spot) scores too low, as it also learns
    to copy that noise in training.
    """
    if not losses:
        raise InputError(None, "select_model: no candidates")
    bad = [name for name, v in losses.items() if v is None or not np.isfinite(v) or v < 0]
    if bad:
        raise InputError(None, f"select_model: no valid self-supervised loss for {bad}")
    scores = {name: float(v) for name, v in losses.items()}
    chosen = min(scores, key=scores.get)
    low = scores[chosen]
    excess = {name: (v / low - 1.0 if low > 0 else 0.0) for name, v in scores.items()}
    out = {"chosen": chosen, "rule": SELECT_RULE, "loss": scores, "excess": excess}
    frame_losses = frame_losses or {}
    if chosen != fallback and fallback in scores and chosen in frame_losses and fallback in frame_losses:
        a, b = (np.asarray(frame_losses[m], dtype=np.float64) for m in (chosen, fallback))
        if a.shape == b.shape:
            d = (a - b)[np.isfinite(a) & np.isfinite(b)]
            if len(d) >= 2:
                se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
                z = float(np.mean(d) / se) if se > 0 else (-np.inf if np.mean(d) < 0 else 0.0)
                kept = chosen if z < -float(min_z) else fallback
                out["significance"] = {"versus": fallback, "z": z, "frames": int(len(d)), "min_z": float(min_z),
                                       "kept": kept}
                out["chosen"] = kept
    return out


# --------------------------------------------------------------------------- per frame
def umse_per_frame(denoised, noisy, *, temporal_radius: int = 0, what: str = "umse_per_frame") -> np.ndarray:
    """uMSE of each output frame (the terms :func:`umse` averages), same reference frames;
    ``what`` names the caller in error messages.

    Parameters
    ----------
    denoised, noisy : (T, Y, X) arrays
        As for :func:`umse`.
    temporal_radius : int
        The uMSE radius r (use the metrics table's ``umse_radius`` so the per-frame
        values average to its uMSE).

    Returns
    -------
    numpy.ndarray
        (T,) float64: for t = r+1 .. T-r-3, ``mean_px (f[t] - y[t-r-1])^2 - 1/2 mean_px
        (y[t+r+1] - y[t+r+2])^2``; NaN for the frames without reference frames.  Their
        mean equals ``umse(denoised, noisy, temporal_radius=r)``.  One frame's value is a
        noisy estimate (it can be negative for a near-perfect denoiser).

    Raises
    ------
    InputError
        Shapes differ, r < 0, or T < 2r + 4.
    """
    f, y = _stack(denoised, what), _stack(noisy, what)
    _same_shape(f, y, what)
    r = int(temporal_radius)
    if r < 0:
        raise InputError(None, f"{what}: temporal_radius must be >= 0, got {r}")
    n = y.shape[0]
    if n < 2 * r + 4:
        raise InputError(None, f"{what}: needs at least {2 * r + 4} frames for temporal_radius={r}, got {n}")
    out = umse_noise_terms(y, r, what)
    before = _Frames(y, 1)
    for t, s in umse_pairs(n, r):
        out[t] = _mean_sq_diff(np.asarray(f[t]), before(s)) - out[t]
    return out


def umse_pairs(n_frames: int, temporal_radius: int) -> list[tuple[int, int]]:
    """(t, s): the output frames t that uMSE scores (r+1 .. T-r-3) and the raw frame s =
    t - r - 1 each is compared with (:func:`umse_per_frame`)."""
    r = int(temporal_radius)
    return [(t, t - r - 1) for t in range(r + 1, int(n_frames) - r - 2)]


def umse_noise_terms(noisy, temporal_radius: int, what: str = "umse_noise_terms") -> np.ndarray:
    """(T,) float64: the noise term uMSE subtracts for each scored frame t, 1/2 mean_px
    (y[t+r+1] - y[t+r+2])^2 (an estimate of the noise variance); NaN elsewhere.  It does
    not depend on the denoiser: :func:`umse_per_frame` = mean_px (f[t] - y[t-r-1])^2 - it."""
    y = _stack(noisy, what)
    out = np.full(y.shape[0], np.nan)
    after = _Frames(y, 2)  # t + r + 1 and t + r + 2
    r = int(temporal_radius)
    for t, _ in umse_pairs(y.shape[0], r):
        out[t] = 0.5 * _mean_sq_diff(after(t + r + 1), after(t + r + 2))
    return out


def upsnr_per_frame(denoised, noisy, peak: float | None = None, *, temporal_radius: int = 0) -> np.ndarray:
    """uPSNR in dB of each output frame, ``10 log10(M^2 / uMSE_t)`` (:func:`umse_per_frame`);
    M as in :func:`upsnr`. NaN where uMSE_t <= 0 or the frame has no reference frames."""
    y = _stack(noisy, "upsnr_per_frame")
    m = stack_max(y) if peak is None else float(peak)
    err = umse_per_frame(denoised, y, temporal_radius=temporal_radius)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(err > 0, 10.0 * np.log10(m * m / np.where(err > 0, err, 1.0)), np.nan)


# --------------------------------------------------------------------------- residual
#: Residual-structure warnings (:func:`residual_structure`): the residual's low-pass power
#: exceeds the noise's by more than this fraction (``spatial``), or more than this share
#: of the movie's persistent signal is in the residual (``signal_share``, when it is also
#: more than 3 standard errors from 0).
RESIDUAL_SPATIAL_WARN = 0.25
RESIDUAL_SHARE_WARN = 0.05


#: The noise-length and residual checks measure frames larger than this many pixels on
#: their central region of about this many (4 M px give these statistics all the precision
#: they need; whole 4096² frames took ~8 float64 frame copies, 1.1 GB, in the residual check).
CHECK_PX = 2**22


class _Central:
    """The central (Y', X') region, Y' X' <= ``CHECK_PX``, of every frame of a (T, Y, X)
    array-like (same aspect ratio); frames are read when indexed (only the region, for
    NumPy and Zarr)."""

    def __init__(self, x, max_px: int):
        ny, nx = (int(v) for v in x.shape[1:])
        scale = float(np.sqrt(max_px / (ny * nx)))
        h, w = max(1, int(ny * scale)), max(1, int(nx * scale))
        self.x, self.y0, self.x0 = x, (ny - h) // 2, (nx - w) // 2
        self.shape = (int(x.shape[0]), h, w)
        self.region = [self.y0, self.y0 + h, self.x0, self.x0 + w]

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, t):
        return np.asarray(self.x[t, self.y0:self.region[1], self.x0:self.region[3]])


def _central(x):
    """``x`` itself when its frames have at most ``CHECK_PX`` pixels, else :class:`_Central`."""
    return x if int(np.prod(x.shape[1:])) <= CHECK_PX else _Central(x, CHECK_PX)


def _frame_indices(n: int, most: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, most)).round().astype(int).tolist()))


def spatial_autocov(frames, max_lag: int = 12) -> np.ndarray:
    """Mean spatial autocovariance of (T, Y, X) ``frames`` at lags -max_lag..max_lag.

    Each frame has its mean removed and is zero-padded (no wrap-around); the sum of
    products at lag d is divided by the number of overlapping pixels. Returns a
    (2L+1, 2L+1) float64 array (centre: the mean variance); divide by the centre for
    the autocorrelation.
    """
    x = _stack(frames, "spatial_autocov")
    ny, nx = x.shape[1:]
    L = int(min(max_lag, ny - 1, nx - 1))
    shape = (ny + L, nx + L)
    # lags -L..L: entries -L..L (mod the padded size) of the circular correlation; only
    # those are kept (whole frame-sized float64 arrays per frame cost GBs at 4096²)
    lags = np.ix_(np.arange(-L, L + 1) % shape[0], np.arange(-L, L + 1) % shape[1])
    overlap = np.maximum(np.fft.irfft2(abs_squared(np.fft.rfft2(np.ones((ny, nx)), shape)), shape)[lags], 1.0)
    acc = np.zeros((2 * L + 1, 2 * L + 1))
    for t in range(x.shape[0]):
        a = np.array(x[t], dtype=np.float64)  # a copy: centred in place
        a -= a.mean()
        fa = np.fft.rfft2(a, shape)
        del a
        acc += np.fft.irfft2(abs_squared(fa), shape)[lags] / overlap
    return acc / x.shape[0]


def abs_squared(spectrum: np.ndarray) -> np.ndarray:
    """|spectrum|² as re² + im² (real, the spectrum's precision): the power of a complex
    spectrum, up to rounding the real part of ``spectrum * conj(spectrum)``, without its
    complex temporaries."""
    p = spectrum.real ** 2
    p += spectrum.imag ** 2
    return p


def _chebyshev(L: int) -> np.ndarray:
    d = np.arange(-L, L + 1)
    return np.maximum(np.abs(d)[:, None], np.abs(d)[None, :])


class _Differences:
    """Differences of adjacent frames / sqrt(2) at up to ``most`` frames spread over the
    movie: noise only (static aligned scene), same variance and spatial correlation as
    one frame's noise.  A lazy (n, Y, X) stack: each difference is made when read
    (float64), so a few frames are in memory, not ``most``."""

    def __init__(self, y, most: int):
        self.y, self.idx = y, _frame_indices(y.shape[0] - 1, most)
        self.shape = (len(self.idx),) + tuple(y.shape[1:])

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        t = self.idx[i]
        return (np.asarray(self.y[t + 1], np.float64) - np.asarray(self.y[t], np.float64)) / np.sqrt(2)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _differences(y, most: int) -> _Differences:
    return _Differences(y, most)


def noise_length(noisy, *, threshold: float = 0.05, max_lag: int = 8, frames: int = 8) -> int:
    """The noise's spatial correlation length in px: the largest Chebyshev distance k at
    which the autocorrelation of differences of adjacent frames (noise only, for an
    aligned static scene), averaged over the ring of lags at distance k, exceeds
    ``threshold``; 0 for white noise or a single frame."""
    y = _central(_stack(noisy, "noise_length"))  # frames above CHECK_PX: their centre
    if y.shape[0] < 2:
        return 0
    cov = spatial_autocov(_differences(y, frames), max_lag)
    L = (cov.shape[0] - 1) // 2
    acf = cov / cov[L, L] if cov[L, L] > 0 else np.zeros_like(cov)
    cheb = _chebyshev(L)
    above = [k for k in range(1, L + 1) if abs(float(np.mean(acf[cheb == k]))) > threshold]
    return int(max(above)) if above else 0


def _lag_cov(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - a.mean()) * (b - b.mean())))


def residual_structure(denoised, noisy, *, lag: int, length: int | None = None, frames: int = 32,
                       window: int = 4, reach: int = 0) -> dict:
    """How much structure the residual ``noisy - denoised`` holds besides noise.

    A denoiser that removes only noise leaves a residual that is noise: spatially
    correlated no further than the noise itself and uncorrelated with any raw frame whose
    noise it did not see. Signal it removed (particles, lattice, an event smeared over
    time) or invented (a ghost from other frames) is neither. Two checks, each
    independent of the dose:

    - ``spatial`` (transient and static structure): the residual's spatial
      autocorrelation beyond the noise's correlation length, measured as its power after
      a Gaussian low-pass of sigma = ``length`` + 2 px (a weighted sum of the
      autocovariance over lags of a few sigma), relative to the same for the noise
      (differences of adjacent raw frames / sqrt 2, which hold the noise with its own
      spatial correlation), minus 1: mean over frames. About 0 or below for noise (a
      denoiser that keeps the low frequencies leaves less low-pass noise than the raw
      frames hold), > 0 when the residual holds blobs, edges or background. Blind to
      structure finer than the low-pass (lattice fringes): see signal_share.
      ``spatial_frames``: the per-frame values (which frames hold the structure).
    - ``signal_share`` (persistent structure, lattice included): covariance of the
      residual of frame t with a template, the mean of the raw frames t +- (lag .. lag +
      ``window`` - 1), over the covariance of raw frame t with the template: the share
      of the movie's persistent signal power in the residual (alpha for a residual
      alpha * signal; negative for a ghost of other frames). The template's noise is
      independent of the residual of frame t when lag > the denoiser's temporal reach,
      so noise gives 0 +- ``signal_share_se`` whatever its spatial correlation. NaN
      where the raw frames share no measurable signal or T <= lag.
    - ``signal_share_ref``: the share an ideal linear (Wiener) filter over the
      2 ``reach`` + 1 frames the denoiser sees would leave in its residual: every
      denoiser shrinks signal that is weak against the noise, and at low dose that is
      most of the fine detail.  Per ring of spatial frequencies, S = the cross power
      of frame t and the template (the persistent signal's power, noise-free), N = the
      frame's power minus S, and that filter keeps S / (S + N / M) of the signal,
      M = 2 ``reach`` + 1.  Only the share *above* this reference is flagged: measured
      on the real Au movie (1 e/px class, K2) every method removed 0.21-0.66 of the
      persistent signal, and less than the reference (0.44-0.94) -- the check without
      it flagged all of them.
    - ``temporal``: Pearson correlation of residual frames t and t + ``lag``
      (reported only; independent noise needs lag > 2 x reach).

    Parameters
    ----------
    denoised, noisy : (T, Y, X) arrays, same shape (aligned raw movie, T >= 2)
    lag : int
        Frame lag > every compared method's temporal reach (the uMSE radius + 1).
    length : int or None
        Noise correlation length (px); None measures it (:func:`noise_length`).
    frames : int
        At most this many frames or frame pairs (spread over the movie) per estimate.
    window : int
        Raw frames on each side in the signal_share template.
    reach : int
        The denoiser's temporal reach (frames each side), for ``signal_share_ref``.

    Returns
    -------
    dict
        ``spatial``, ``spatial_frames`` ({frame: value}), ``signal_share``,
        ``signal_share_se``, ``signal_share_ref``, ``temporal``, ``length``, ``sigma``,
        ``lag``, ``region`` (``[y0, y1, x0, x1]`` measured: frames above ``CHECK_PX``
        pixels are measured on their central region; None = whole frames) and
        ``structure`` (True when spatial > RESIDUAL_SPATIAL_WARN, or
        signal_share exceeds signal_share_ref by more than RESIDUAL_SHARE_WARN and 3
        standard errors, or is below -RESIDUAL_SHARE_WARN (a ghost of other frames)).
    """
    from scipy import ndimage

    f, y = _stack(denoised, "residual_structure"), _stack(noisy, "residual_structure")
    _same_shape(f, y, "residual_structure")
    f, y = _central(f), _central(y)  # frames above CHECK_PX: their central region
    n = y.shape[0]
    lag = int(lag)
    if lag < 1:
        raise InputError(None, f"residual_structure: lag must be >= 1, got {lag}")
    if n < 2:
        raise InputError(None, f"residual_structure: needs at least 2 frames, got {n}")
    L = noise_length(y) if length is None else int(length)
    sigma = float(L + 2)

    def lowpass_var(a: np.ndarray) -> float:
        return float(np.var(ndimage.gaussian_filter(a, sigma, mode="reflect")))

    noise = np.median([lowpass_var(d) for d in _differences(y, frames)])
    per_frame = {}
    for t in _frame_indices(n, frames):
        r = np.asarray(y[t], np.float64) - np.asarray(f[t], np.float64)
        per_frame[int(t)] = lowpass_var(r) / noise - 1.0 if noise > 0 else float("nan")
    spatial = float(np.mean(list(per_frame.values())))

    share = share_se = share_ref = temporal = float("nan")
    if n > lag:
        num = den = var_num = 0.0
        corrs = []
        ny, nx = y.shape[1:]
        ring = np.minimum((np.hypot(np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]) * 64).astype(int), 31)
        cross = np.zeros(32)  # per ring of frequencies: raw x template (the persistent signal's power)
        power = np.zeros(32)  # raw frame's power (signal + noise)
        for t in _frame_indices(n, frames):
            # template: the mean of up to 2 x ``window`` raw frames at distance lag .. lag + window - 1
            # on each side (their noise is independent of the residual; the mean has less of it)
            near = [s for d in range(lag, lag + window) for s in (t - d, t + d) if 0 <= s < n]
            if not near:
                continue
            # in place where it can be (the same values): frames of 4096² are 134 MB in float64
            ya = np.array(y[t], np.float64)  # copies (np.array): changed in place below
            ra = np.array(f[t], np.float64)
            np.subtract(ya, ra, out=ra)
            tmpl = np.zeros(ya.shape)  # the mean of the frames ``near``, summed in order (one frame at a time)
            for s in near:
                tmpl += np.asarray(y[s], np.float64)
            tmpl /= len(near)
            ra -= ra.mean()
            ya -= ya.mean()
            tmpl -= tmpl.mean()
            prod = ra * tmpl
            num += float(prod.mean())
            var_num += float(prod.var()) / prod.size  # its estimation variance (independent pixels)
            np.multiply(ya, tmpl, out=prod)
            den += float(np.mean(prod))
            del prod
            fy, ft = np.fft.rfft2(ya), np.fft.rfft2(tmpl)
            del tmpl
            np.conjugate(ft, out=ft)
            ft *= fy
            cross += np.bincount(ring.ravel(), ft.real.ravel(), 32)
            del ft
            power += np.bincount(ring.ravel(), abs_squared(fy).ravel(), 32)
            del fy
            if t + lag < n:
                rb = np.asarray(y[t + lag], np.float64) - np.asarray(f[t + lag], np.float64)
                rb = rb - rb.mean()
                norm = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
                corrs.append(np.sum(ra * rb) / norm if norm > 0 else 0.0)
        temporal = float(np.mean(corrs)) if corrs else float("nan")
        se = float(np.sqrt(var_num))  # standard error of num
        if den > 3 * se:  # the raw frames share signal beyond the estimation noise
            share, share_se = num / den, se / den
            sig = np.maximum(cross, 0.0)
            noise_m = np.maximum(power - sig, 0.0) / (2 * max(0, int(reach)) + 1)
            kept = np.divide(sig, sig + noise_m, out=np.ones_like(sig), where=sig + noise_m > 0)
            share_ref = float(np.sum(sig * (1.0 - kept)) / np.sum(sig)) if sig.sum() > 0 else 0.0
    excess = share - share_ref if share == share else float("nan")
    structure = bool(spatial > RESIDUAL_SPATIAL_WARN
                     or (excess == excess and excess > RESIDUAL_SHARE_WARN and excess > 3 * share_se)
                     or (share == share and share < -RESIDUAL_SHARE_WARN and -share > 3 * share_se))
    return {"spatial": spatial, "spatial_frames": per_frame, "signal_share": share, "signal_share_se": share_se,
            "signal_share_ref": share_ref, "temporal": temporal, "length": L, "sigma": sigma, "lag": lag,
            "structure": structure, "region": getattr(y, "region", None)}


__all__ += ["abs_squared", "stack_max", "stack_min", "umse_per_frame", "umse_pairs", "umse_noise_terms",
            "upsnr_per_frame", "spatial_autocov", "noise_length", "residual_structure"]

def nlm_sentence(nlm: dict) -> str:
    """One sentence on the classical candidate's NL-means (``classical_candidate``'s 'nlm'
    record): its setting and whether it replaced the tuned Gaussian, or why it was skipped."""
    if "skipped" in nlm:
        return f"NL-means not tried ({nlm['skipped']})"
    z = nlm.get("z")
    test = f", z {z:+.1f} against the tuned Gaussian" if z is not None else ""
    return (f"NL-means of the temporal average (sigma_t {nlm['sigma_t']:g} frames), patch {nlm['patch']} px, "
            f"search {nlm['distance']} px, h {nlm['h']:g} × its noise SD{test}: "
            + ("chosen over the Gaussian" if nlm.get("chosen") else "not chosen"))


def mix_sentence(mix: dict) -> str:
    """One sentence on the classical candidate's Gaussian mix (``classical_candidate``'s
    'mix' record, ``filters.blind_gaussian_mix``): its size, its coefficients (per
    structure class, or per pixel from its gate, ``pipeline.gate_mix``) and whether it
    replaced the tuned Gaussian, or why it was skipped."""
    if "skipped" in mix:
        return f"Gaussian mix not tried ({mix['skipped']})"
    fit = mix.get("fit") or {}
    gate = mix.get("gate") or {}
    size = ""
    if fit:
        how = f" x {fit['classes']} structure classes"
        if "gate" in fit:
            vs = f", z {gate['z']:+.1f} against {fit['classes']} structure classes" if gate.get("z") is not None else ""
            how = f", per-pixel coefficients from a gate (MLP, {fit['gate']['hidden']} hidden units) fitted on the movie{vs}"
        size = f" ({len(fit['sigmas'])} Gaussians{how}, own-pixel weight {fit['own_pixel']['weight']:.3f})"
    z = mix.get("z")
    test = f", z {z:+.1f} against the tuned Gaussian" if z is not None else ""
    return f"Gaussian mix{size}{test}: " + ("chosen over the Gaussian" if mix.get("chosen") else "not chosen")


def ensemble_sentence(ens: dict) -> str:
    """One sentence on ``auto``'s ensemble (the 'ensemble' record of
    ``pipeline.prefer_ensemble``): its members, its kind, its test against the candidate
    it would replace and whether it did, or why it was not fitted."""
    members = ", ".join(ens.get("members", []))
    if "skipped" in ens:
        return f"ensemble of {members} not fitted ({ens['skipped']})"
    how = "per-pixel weights from a gate (MLP)" if ens.get("kind") == "gated" else "linear weights"
    z = ens.get("z")
    test = f", z {z:+.1f} against {ens['versus']}" if z is not None else ""
    verdict = "" if "chosen" not in ens else ": chosen" if ens["chosen"] else ": not chosen"  # before select: none
    return (f"ensemble of {members} ({how} of their blind outputs, fitted on the movie, cross-fitted by frame "
            f"parity){test}{verdict}")


def disagreement_sentence(choice: dict, umse: dict, radius: int | None, versus: str = "classical") -> str | None:
    """The sentence the report gives when the two quality checks disagree about ``auto``'s
    choice: its self-supervised loss is lower than the tuned classical candidate's (the
    choice, ``choice['loss']``) but its uMSE (``umse``: method -> uMSE at ``radius``) is
    higher.  None when they agree, when the classical candidate was chosen or a figure is
    missing.  The loss difference of two J-invariant outputs of the same frames is their
    MSE difference without bias; uMSE compares each output frame with raw frames radius + 1
    and more away, so the change of the scene over that time enters it -- different for
    outputs that average different spans of time."""
    loss, chosen = choice.get("loss", {}), choice.get("chosen")
    if not chosen or chosen == versus or chosen not in loss or versus not in loss:
        return None
    u_c, u_v = umse.get(chosen), umse.get(versus)
    if u_c is None or u_v is None or not (np.isfinite(u_c) and np.isfinite(u_v)):
        return None
    d_loss, d_umse = loss[versus] - loss[chosen], u_c - u_v
    if not (d_loss > 0 and d_umse > 0):
        return None
    return (f"The checks disagree: by the self-supervised loss {chosen}'s error is {d_loss:.4g} (squared units) "
            f"below the {versus} candidate's, by uMSE (radius {radius}) {d_umse:.4g} above it "
            f"({-10 * np.log10(u_c / u_v):+.2f} dB uPSNR). The loss compares each output frame with its own raw "
            f"frame (the blind outputs); uMSE with raw frames {'r + 1' if radius is None else radius + 1} and more "
            "frames away, so how the scene changes over that time enters it, unequally for outputs that average "
            "different spans of time: on a changing scene uMSE is not an unbiased comparison of the two.")


def unscored_sentence(choice: dict, reach: int | None, n_frames: int | None, radius: int | None,
                      versus: str = "classical") -> str | None:
    """Why the report has no gain figure: the tuned classical candidate ``versus`` reaches
    ``reach`` frames each side, more than uMSE can check on ``n_frames`` frames (radius
    ``radius``), so it has no uPSNR to compare the chosen model with.  Gives the
    self-supervised loss difference instead (the selection's own evidence).  None when
    the candidate is chosen, not scored by the selection, or within the radius."""
    chosen, loss = choice.get("chosen"), choice.get("loss", {})
    if not chosen or chosen == versus or versus not in loss or reach is None or radius is None or reach <= radius:
        return None
    text = (f"No gain figure: the {versus} candidate reaches {reach} frames each side, more than uMSE can check on "
            f"{n_frames if n_frames is not None else '?'} frames (radius {radius}), so it has no uPSNR to compare "
            f"{chosen} with.")
    if chosen in loss:
        d = loss[versus] - loss[chosen]
        text += (f" By the self-supervised loss {chosen}'s error is {abs(d):.4g} (squared units) "
                 f"{'below' if d > 0 else 'above'} it.")
    return text + " (model.max_reach: checkable keeps every candidate within what uMSE can check.)"


def reach_sentence(rec: dict) -> str:
    """One sentence on the context reach ``model.context: auto`` chose (``train.compare_reach``)."""
    reaches, z = rec.get("reaches", []), rec.get("z", [])
    if len(z) != len(reaches) or len(reaches) < 2:
        return f"wcvd_ctx reach {rec.get('chosen')} frames each side ({rec.get('note', 'no comparison')})"
    mz = rec.get("min_z", 2.0)
    if rec["chosen"] == reaches[0]:
        why = (f"{reaches[-1]} frames were not significantly better (z {z[-1]:+.1f}; needs <= -{mz:g}), "
               "and at this reach uMSE can still check the output")
    else:
        why = (f"significantly better (z {z[-1]:+.1f}) than {reaches[0]}, the longest reach uMSE could still check: "
               "uMSE cannot check this output")
    return f"wcvd_ctx reach {rec['chosen']} frames each side: {why}"
