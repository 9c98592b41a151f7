"""Classical filters: Gaussian baselines (WCVD paper, section 4.3).

All functions take and return ``(T, Y, X)`` float32 stacks; sigmas are in pixels
(spatial) and frames (temporal).  NumPy / SciPy only: no torch, no other stage (the
WCID pre-filter, which trains a model, is ``emdenoise.pipeline.prefilter``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def gaussian2d(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian filter of each frame on its own (no temporal mixing).

    stack: (T, Y, X) array; sigma in pixels. Returns float32 (T, Y, X).
    Borders are reflected, so no wrap-around from the opposite edge.
    """
    stack = np.asarray(stack, dtype=np.float32)
    return ndimage.gaussian_filter(stack, sigma=(0.0, sigma, sigma), mode="reflect").astype(np.float32)


def gaussian3d(stack: np.ndarray, sigma: float | tuple[float, float, float] = 1.0) -> np.ndarray:
    """Gaussian filter over time and space, sigma = (t, y, x) or one value for all.

    stack: (T, Y, X) array; sigma in frames / pixels. Returns float32 (T, Y, X).
    """
    stack = np.asarray(stack, dtype=np.float32)
    sig = (float(sigma),) * 3 if np.isscalar(sigma) else tuple(float(s) for s in sigma)
    return ndimage.gaussian_filter(stack, sigma=sig, mode="reflect").astype(np.float32)


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
