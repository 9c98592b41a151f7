"""Classical filters: Gaussian baselines (WCVD paper, section 4.3).

All functions take and return ``(T, Y, X)`` float32 stacks; sigmas are in pixels
(spatial) and frames (temporal).

Temporal reach. Every method that the metrics compare has a known *reach*: the number
of frames on each side of t whose input can change output frame t (raw and per-frame
filters 0, :func:`gaussian3d` ``ceil(2 sigma_t)``, a blind-spot network its
``params.halo_t``). :func:`temporal_reach` gives it; ``emdenoise.metrics`` places the
uMSE reference frames and the SNR frame pair outside the widest reach.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .errors import InputError

#: Spatial Gaussian kernels are truncated at scipy's default 4 sigma.
SPATIAL_TRUNCATE = 4.0


def gaussian_reach(sigma_t: float) -> int:
    """Temporal reach of :func:`gaussian3d` in frames: ``ceil(2 sigma_t)`` (0 for 0).

    The temporal kernel is truncated there (weights renormalised to sum 1); beyond
    2 sigma the Gaussian keeps < 5 % of its weight, so the filter barely changes, but its
    reach stays small enough for the uMSE reference frames of short movies.
    """
    s = float(sigma_t)
    if not s >= 0:
        raise InputError(None, f"gaussian sigma_t must be >= 0, got {sigma_t}")
    return int(math.ceil(2.0 * s - 1e-9)) if s > 0 else 0


def _spatial_radius(sigma: float) -> int:
    """scipy's default truncation: int(4 sigma + 0.5) px."""
    return int(SPATIAL_TRUNCATE * float(sigma) + 0.5)


def _sigma3(sigma) -> tuple[float, float, float]:
    sig = (float(sigma),) * 3 if np.isscalar(sigma) else tuple(float(s) for s in sigma)
    if len(sig) != 3 or not all(s >= 0 for s in sig):
        raise InputError(None, f"gaussian3d: sigma must be one value or (t, y, x), all >= 0; got {sigma}")
    return sig


def temporal_reach(method: str, *, sigma=None, params=None) -> int:
    """Frames on each side of t that a method's output frame t depends on.

    method: 'raw', 'gaussian2d' (0); 'gaussian3d' or 'classical' (``sigma`` = one value
    or (t, y, x); ``ceil(2 sigma_t)``, see :func:`gaussian_reach`); anything else is a
    model and needs ``params`` with a ``halo_t`` (WCVDParams: kt // 2, 0 for WCID;
    SHINEParams: frames // 2).  Returns an int >= 0.
    """
    if method in ("raw", "gaussian2d"):
        return 0
    if method in ("gaussian3d", "classical"):
        if sigma is None:
            raise InputError(None, f"temporal_reach({method!r}) needs sigma")
        return gaussian_reach(_sigma3(sigma)[0])
    if params is None or not hasattr(params, "halo_t"):
        raise InputError(None, f"temporal_reach({method!r}): a model needs params with halo_t")
    return int(params.halo_t)


def gaussian2d(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian filter of each frame on its own (no temporal mixing; reach 0).

    stack: (T, Y, X) array; sigma in pixels. Returns float32 (T, Y, X).
    Borders are reflected, so no wrap-around from the opposite edge.
    """
    stack = np.asarray(stack, dtype=np.float32)
    return ndimage.gaussian_filter(stack, sigma=(0.0, sigma, sigma), mode="reflect").astype(np.float32)


def gaussian3d(stack: np.ndarray, sigma: float | tuple[float, float, float] = 1.0) -> np.ndarray:
    """Gaussian filter over time and space, sigma = (t, y, x) or one value for all.

    stack: (T, Y, X) array; sigma in frames / pixels. Returns float32 (T, Y, X).
    The temporal kernel is truncated at ``reach = ceil(2 sigma_t)`` frames
    (:func:`gaussian_reach`; output frame t depends on frames t - reach .. t + reach
    only), the spatial ones at scipy's default 4 sigma. Borders are reflected.
    """
    stack = np.asarray(stack, dtype=np.float32)
    sig = _sigma3(sigma)
    radius = (gaussian_reach(sig[0]), _spatial_radius(sig[1]), _spatial_radius(sig[2]))
    radius = tuple(max(r, 1) for r in radius)  # scipy wants >= 1; an axis with sigma 0 is skipped anyway
    return ndimage.gaussian_filter(stack, sigma=sig, mode="reflect", radius=radius).astype(np.float32)


def prefilter(stack: np.ndarray, method: str = "wcid", sigma: float = 1.5, *,
              wcid_params=None, train_params=None) -> np.ndarray:
    """Pre-denoise a (T, Y, X) stack for drift measurement only (never for the output).

    method: 'wcid' (a WCID model, WCVD paper section 2.1, trained on this very stack
    with ``wcid_params`` / ``train_params``), 'gaussian2d' (per frame, sigma px) or
    'none'. Per-frame filters on purpose: a temporal filter would smear the very motion
    that drift correction measures.
    """
    if method == "gaussian2d":
        return gaussian2d(stack, sigma)
    if method == "none":
        return np.asarray(stack, dtype=np.float32)
    if method == "wcid":
        from .config import ModelConfig, TrainParams
        from .infer import denoise
        from .train import model_from_checkpoint, train_model

        params = wcid_params or ModelConfig().wcvd_params(dims=2)
        ckpt = train_model(np.asarray(stack, dtype=np.float32), params, train_params or TrainParams())
        model = model_from_checkpoint(ckpt, device=ckpt["device"])
        return denoise(model, ckpt, stack, device=ckpt["device"])
    raise ValueError(f"unknown prefilter method {method!r}")


def _lowpass_mask(shape: tuple[int, int], cutoff: float, edge_width: float, dct: bool) -> np.ndarray:
    """Radial mask over (Y, X) spectrum bins; cutoff radius in cycles per pixel.

    Frequencies are normalised per axis (bin k of an axis of n px is k/n cycles/px for the
    FFT, k/(2n) for the DCT), so the mask is a circle in cycles/pixel and an ellipse in
    index space when Y != X: the same physical resolution is kept along both axes.
    """
    ny, nx = shape
    if dct:
        fy, fx = np.arange(ny) / (2.0 * ny), np.arange(nx) / (2.0 * nx)
    else:
        fy, fx = np.fft.fftfreq(ny), np.fft.rfftfreq(nx)
    r = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    if edge_width <= 0:
        return (r <= cutoff).astype(np.float32)
    # raised-cosine roll-off from cutoff*(1 - w/2) to cutoff*(1 + w/2): half-amplitude at
    # the cutoff, smaller side lobes (less Gibbs ringing) than a hard edge.
    lo, hi = cutoff * (1 - edge_width / 2), cutoff * (1 + edge_width / 2)
    ramp = np.clip((r - lo) / (hi - lo), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * ramp))).astype(np.float32)


# Default mask diameter as a fraction of N: the released code's N/3, not the paper text's
# N/Ks_max = N/7.  Measured on the synthetic counting-mode movie (atomic columns 9 px
# apart, bench/bench_wcvd.py): WCVD + N/3 gains ~0.15 dB PSNR over WCVD alone, WCVD + N/7
# loses ~1 dB -- its cutoff (periods > 14 px) removes the lattice itself.
LOWPASS_DIAMETER = 1.0 / 3.0


def fft_lowpass(stack: np.ndarray, diameter: float | None = LOWPASS_DIAMETER, ks_max: int = 7,
                pad: str = "symmetric", edge_width: float = 0.0) -> np.ndarray:
    """Circular low-pass in Fourier space applied to every frame (WCVD paper, SM 2).

    stack: (T, Y, X) or (Y, X) array; returns float32 of the same shape.
    diameter: mask diameter as a fraction of the frame size N, i.e. a diameter of
        ``diameter * N`` bins in the N-bin spectrum of each axis.  Default 1/3 (released
        code, better in our benchmark, see ``LOWPASS_DIAMETER``); None = the paper's
        rule N / Ks_max (``1 / ks_max``).  The cutoff radius is ``diameter / 2`` cycles
        per pixel: 1/3 keeps periods longer than 6 px, 1/7 keeps periods longer than
        14 px -- choose it from the finest lattice period you need to keep.
    ks_max: the largest spatial kernel of the model (used when diameter is None).
    pad: 'symmetric' (default) filters the mirror-extended frame (2Y x 2X, implemented
        exactly and cheaply as a DCT-II), so the FFT's implicit periodicity never meets
        the jump between opposite edges: no wrap-around ringing.  'periodic' is the
        plain FFT of the paper / released code (edges wrap around).
    edge_width: 0 = hard mask (paper); > 0 = raised-cosine roll-off of that width,
        as a fraction of the cutoff radius.
    The DC bin is always kept, so each frame's mean is preserved.
    """
    from scipy import fft as sfft

    arr = np.asarray(stack, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a (T, Y, X) or (Y, X) array, got shape {arr.shape}")
    frac = 1.0 / ks_max if diameter is None else float(diameter)
    if not frac > 0:
        raise ValueError(f"diameter must be > 0, got {diameter}")
    cutoff = frac / 2.0
    shape = arr.shape[-2:]
    if pad == "symmetric":
        mask = _lowpass_mask(shape, cutoff, edge_width, dct=True)
        spec = sfft.dctn(arr, type=2, axes=(-2, -1), norm="ortho", workers=-1)
        spec *= mask
        out = sfft.idctn(spec, type=2, axes=(-2, -1), norm="ortho", workers=-1)
    elif pad == "periodic":
        mask = _lowpass_mask(shape, cutoff, edge_width, dct=False)
        spec = sfft.rfftn(arr, axes=(-2, -1), workers=-1)
        spec *= mask
        out = sfft.irfftn(spec, s=shape, axes=(-2, -1), workers=-1)
    else:
        raise ValueError(f"pad must be 'symmetric' or 'periodic', got {pad!r}")
    return np.asarray(out, dtype=np.float32)
