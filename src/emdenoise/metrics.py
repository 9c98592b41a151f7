"""Quality metrics with and without ground truth.

Without ground truth (real data):

- uMSE / uPSNR (WCVD eqs. 1-2, after UDVD): the MSE against the unknown clean movie,
  estimated from other noisy frames of the same (static, aligned) scene.
- SNR from neighbouring frames (SHINE eq. 5): ``10 log10(p / (1 - p))`` with p the
  correlation of two noisy views of the same scene.

With ground truth (synthetic data): PSNR and SSIM (scikit-image).

uMSE frame choice. For output frame t, with r = ``temporal_radius`` (how many frames
on each side the denoiser looked at)::

    a = y[t - r - 1]     nearest earlier frame the denoiser did NOT see
    b = y[t + r + 1]     c = y[t + r + 2]     nearest later pair, also unseen
    uMSE = mean_t,px (f(y)[t] - a)^2 - 1/2 mean_t,px (b - c)^2,   t = r+1 .. T-r-3

With independent zero-mean noise and a static scene, E(f - a)^2 = MSE + var(noise) and
E(b - c)^2 / 2 = var(noise), so uMSE is unbiased. ``a`` must be independent of the
denoised value: if the denoiser used frame ``a`` (a temporal filter, a video network
such as WCVD with Kt = 3, or SHINE with 5 frames) the shared noise makes (f - a)^2 too
small and uMSE too optimistic - for gaussian3d(sigma=1) with r = 0 the bias is about
half the noise variance (uMSE turns negative). So pass the largest temporal radius of
all compared methods (one value for all, so every method is scored on the same frames
and gaps); :func:`compute_metrics` defaults to 2, :func:`umse` to 0 (per-frame methods). ``b`` and
``c`` only measure the noise power, so they may be seen by the denoiser.
Signal changes between the frames (dynamics, the up to 0.5 px sub-pixel drift that
integer alignment leaves) add to both terms and bias uMSE upwards.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .errors import InputError

__all__ = ["umse", "upsnr", "snr_neighbour", "psnr", "ssim", "compute_metrics"]


def _stack(x, what: str) -> np.ndarray:
    """Checked (T, Y, X) array, dtype kept: frames are cast to float64 one at a time."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise InputError(None, f"{what}: expected a (T, Y, X) stack, got shape {x.shape}")
    return x


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
    f, y = _stack(denoised, "umse"), _stack(noisy, "umse")
    _same_shape(f, y, "umse")
    r = int(temporal_radius)
    if r < 0:
        raise InputError(None, f"umse: temporal_radius must be >= 0, got {r}")
    n = y.shape[0]
    if n < 2 * r + 4:
        raise InputError(None, f"umse: needs at least {2 * r + 4} frames for temporal_radius={r}, got {n}")
    err = noise = 0.0
    frames = range(r + 1, n - r - 2)
    for t in frames:  # frame by frame: float64 sums without float64 copies of the movies
        a, b, c = (np.asarray(y[i], dtype=np.float64) for i in (t - r - 1, t + r + 1, t + r + 2))
        err += np.mean((np.asarray(f[t], dtype=np.float64) - a) ** 2)
        noise += np.mean((b - c) ** 2)
    return float((err - 0.5 * noise) / len(frames))


def upsnr(denoised, noisy, peak: float | None = None, *, temporal_radius: int = 0) -> float:
    """Unsupervised PSNR in dB (WCVD eq. 2): ``10 log10(M^2 / uMSE)``.

    ``M`` = ``peak`` or, if None, the maximum of the raw ``noisy`` stack (the "intensity
    peak of the experimental images"; in counting data it is a noisy extreme, so pass
    one fixed peak when comparing datasets). Returns NaN when uMSE <= 0 (the estimate
    is then meaningless - the noise-power term dominated).
    """
    y = _stack(noisy, "upsnr")
    m = float(np.max(y)) if peak is None else float(peak)
    err = umse(denoised, y, temporal_radius=temporal_radius)
    return float(10.0 * np.log10(m * m / err)) if err > 0 else float("nan")


def snr_neighbour(stack) -> float:
    """SNR in dB from neighbouring frames (SHINE eq. 5).

    ``p`` = mean over t of the Pearson correlation of frames t and t+1 (all pixels);
    ``SNR = 10 log10(p / (1 - p))``. Averaging p before the log keeps one poorly
    correlated pair from dominating and the log well defined. For signal variance S and
    independent noise variance N, p = S / (S + N), so SNR = 10 log10(S / N).
    Returns NaN if p <= 0 and inf if p >= 1. Needs T >= 2 (InputError).
    """
    y = _stack(stack, "snr_neighbour")
    if y.shape[0] < 2:
        raise InputError(None, f"snr_neighbour: needs at least 2 frames, got {y.shape[0]}")
    corrs = []
    for t in range(y.shape[0] - 1):
        a = np.asarray(y[t], dtype=np.float64)
        b = np.asarray(y[t + 1], dtype=np.float64)
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
        corrs.append(np.sum(a * b) / denom if denom > 0 else 0.0)
    p = float(np.mean(corrs))
    if p <= 0:
        return float("nan")
    if p >= 1:
        return float("inf")
    return float(10.0 * np.log10(p / (1.0 - p)))


def _data_range(truth: np.ndarray) -> float:
    rng = float(np.max(truth)) - float(np.min(truth))
    return rng if rng > 0 else 1.0  # a flat truth: any positive range gives finite scores


def psnr(denoised, truth) -> float:
    """PSNR in dB against ground truth over the whole (T, Y, X) stack,
    data range = max - min of ``truth``."""
    f = _stack(denoised, "psnr").astype(np.float64)
    x = _stack(truth, "psnr").astype(np.float64)
    _same_shape(f, x, "psnr")
    return float(peak_signal_noise_ratio(x, f, data_range=_data_range(x)))


def ssim(denoised, truth) -> float:
    """Mean over frames of the 2D SSIM against ground truth, data range = max - min
    of the whole ``truth`` stack (one range for all frames, as for :func:`psnr`)."""
    f, x = _stack(denoised, "ssim"), _stack(truth, "ssim")
    _same_shape(f, x, "ssim")
    rng = _data_range(x)
    return float(np.mean([structural_similarity(np.asarray(x[t], dtype=np.float64), np.asarray(f[t], dtype=np.float64),
                                                data_range=rng) for t in range(x.shape[0])]))


def feasible_radius(n_frames: int, wanted: int = 2) -> int:
    """Largest uMSE temporal radius <= ``wanted`` that ``n_frames`` allow (T >= 2r + 4)."""
    return max(0, min(int(wanted), (int(n_frames) - 4) // 2))


def compute_metrics(method_stacks: dict, noisy, truth=None, peak: float | None = None, *,
                    temporal_radius: int = 2) -> pd.DataFrame:
    """All metrics for several methods on the same movie.

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
    temporal_radius : int
        Largest temporal radius of the compared methods, used for every method. The
        default 2 covers WCVD (Kt = 3, radius 1), SHINE (5 frames, radius 2) and
        gaussian3d with sigma_t <= 1 (weight beyond 2 frames < 0.5 %); needs T >= 8.

    Returns
    -------
    pandas.DataFrame
        One row per method: method, umse, upsnr_db, snr_db (SHINE eq. 5 on the method's
        own frames), psnr_db, ssim.
    """
    y = _stack(noisy, "compute_metrics")
    m = float(np.max(y)) if peak is None else float(peak)
    rows = []
    for name, stack in method_stacks.items():
        f = _stack(stack, f"compute_metrics[{name}]")
        _same_shape(f, y, f"compute_metrics[{name}]")
        err = umse(f, y, temporal_radius=temporal_radius)
        rows.append({
            "method": name,
            "umse": err,
            "upsnr_db": float(10.0 * np.log10(m * m / err)) if err > 0 else float("nan"),
            "snr_db": snr_neighbour(f),
            "psnr_db": float("nan") if truth is None else psnr(f, truth),
            "ssim": float("nan") if truth is None else ssim(f, truth),
        })
    return pd.DataFrame(rows, columns=["method", "umse", "upsnr_db", "snr_db", "psnr_db", "ssim"])


SELECT_RULE = ("lowest uMSE against the noisy movie at temporal radius r >= 2 (frames t-r-1, "
               "t+r+1, t+r+2, outside every candidate's input window)")


def select_model(denoised: dict, noisy, *, temporal_radius: int = 2) -> dict:
    """Choose among denoised versions of one movie without ground truth.

    Parameters
    ----------
    denoised : dict of str -> (T, Y, X) array
        Candidate outputs (e.g. {'wcvd': ..., 'shine': ...}), same shape and units as
        ``noisy``.
    noisy : (T, Y, X) array
        The noisy movie the candidates were computed from.
    temporal_radius : int
        r >= 2; must be at least the temporal radius of every candidate (SHINE: 2).

    Returns
    -------
    dict
        {'chosen': name, 'rule': SELECT_RULE, 'umse': {name: uMSE}, 'temporal_radius': r}.

    Why uMSE at r >= 2 and not the training validation loss: the noise of frames outside
    every candidate's input window is independent of its output, so uMSE is unbiased
    there even when the noise is spatially (PSF-)correlated.  The validation loss of a
    blind-spot network compares with the *same* noisy frame, which rewards a too-small
    blind spot for copying correlated noise from its neighbours.
    """
    r = int(temporal_radius)
    if r < 2:
        raise InputError(None, f"select_model: temporal_radius must be >= 2, got {r}")
    if not denoised:
        raise InputError(None, "select_model: no candidates")
    scores = {name: umse(stack, noisy, temporal_radius=r) for name, stack in denoised.items()}
    chosen = min(scores, key=scores.get)
    return {"chosen": chosen, "rule": SELECT_RULE, "umse": scores, "temporal_radius": r}
