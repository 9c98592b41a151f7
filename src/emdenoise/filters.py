"""Classical filters: Gaussian baselines (WCVD paper, section 4.3), a Gaussian 3D tuned
without ground truth (Noise2Self, Batson & Royer 2019), NL-means of a temporal Gaussian
average tuned the same way and a mix of Gaussians fitted per structure class on the same
loss (the three classical candidates of ``model: auto``); the mix can take its coefficients
per pixel from a gate (a small MLP fitted with torch by ``train.fit_mix_gate``, applied here
with NumPy: :func:`mix_gate_predict`).

All functions take and return ``(T, Y, X)`` float32 stacks; sigmas are in pixels
(spatial) and frames (temporal).  NumPy / SciPy (and scikit-image's NL-means) only: no
torch, no other stage (the WCID pre-filter, which trains a model, is
``emdenoise.pipeline.prefilter``).

Temporal reach. Every method that the metrics compare has a known *reach*: the number
of frames on each side of t whose input can change output frame t (raw and per-frame
filters 0, :func:`gaussian3d` ``ceil(2 sigma_t)``, a blind-spot network its
``params.halo_t``). :func:`temporal_reach` gives it; ``emdenoise.metrics`` places the
uMSE reference frames and the SNR frame pair outside the widest reach.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError

#: Spatial Gaussian kernels are truncated at scipy's default 4 sigma.
SPATIAL_TRUNCATE = 4.0
#: sigma grids of :func:`blind_gaussian3d` (frames; pixels).
BLIND_SIGMAS_T = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)  # frames; 32 ~ the mean of a short movie
# 4 and 6 px: a 41 x 256² tilt series of smooth cryo-ET-like objects (vesicles, spheres of
# 3-22 px) wants 6 (30.41 dB vs 29.71 with 3 at most); movies choose <= 2.
BLIND_SIGMAS_YX = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: Streaming (bounded memory).  Frame blocks of the baselines hold about this many bytes
#: of float32 input (at least 1 frame + the temporal halo); tiles of the tuned Gaussian
#: are sized so that its float32 working copies of (T, tile + 2 halo, tile + 2 halo)
#: stay within ``TILE_BUDGET`` (edge at least ``MIN_TILE`` px).
BLOCK_BYTES = 64 * 2**20
TILE_BUDGET = 384 * 2**20
MIN_TILE = 32


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


def block_frames(frame_shape, budget: int | None = None) -> int:
    """Frames per streamed block: ``budget`` bytes (None: ``BLOCK_BYTES``) of float32
    frames of ``frame_shape`` (Y, X), at least 1."""
    budget = BLOCK_BYTES if budget is None else budget
    return max(1, int(budget) // (4 * math.prod(int(n) for n in frame_shape)))


def filter_blocks(stack, fn, halo_t: int, frames: int | None = None):
    """Apply a filter ``fn`` ((t, Y, X) float32 -> same shape) to a (T, Y, X) stack in
    blocks of ``frames`` whole frames (None: :func:`block_frames`), each read with
    ``halo_t`` frames on either side (clipped at the movie's ends, where ``fn``'s own
    boundary handling then sees what it sees on the whole stack).

    stack: any (T, Y, X) array-like (NumPy, Zarr, ``io.LazyStack``); read block by block.
    Yields (first frame a, float32 block (b - a, Y, X)).  Equal to ``fn(stack)`` when
    ``fn``'s temporal footprint is at most ``halo_t`` frames (per-line filters such as
    scipy.ndimage's give bit-identical values).  Peak memory: (frames + 2 halo_t) input
    frames plus ``fn``'s working copies of them.
    """
    n = int(stack.shape[0])
    k = int(frames) if frames else block_frames(stack.shape[1:])
    if k < 1 or halo_t < 0:
        raise InputError(None, f"filter_blocks: need frames >= 1 and halo_t >= 0, got {frames}, {halo_t}")
    for a in range(0, n, k):
        b = min(n, a + k)
        lo, hi = max(0, a - halo_t), min(n, b + halo_t)
        out = fn(np.asarray(stack[lo:hi], dtype=np.float32))
        yield a, np.asarray(out[a - lo:b - lo], dtype=np.float32)


def gaussian2d_blocks(stack, sigma: float = 1.0, frames: int | None = None):
    """:func:`gaussian2d` streamed by frame blocks (:func:`filter_blocks`, no temporal
    halo): yields (a, float32 block); bit-identical to the whole-stack filter."""
    return filter_blocks(stack, lambda s: gaussian2d(s, sigma), 0, frames)


def gaussian3d_blocks(stack, sigma=1.0, frames: int | None = None):
    """:func:`gaussian3d` streamed by frame blocks with a temporal halo of its reach
    ceil(2 sigma_t) (:func:`filter_blocks`): yields (a, float32 block); bit-identical to
    the whole-stack filter (reflected borders at the movie's first and last frames)."""
    sig = _sigma3(sigma)
    return filter_blocks(stack, lambda s: gaussian3d(s, sig), gaussian_reach(sig[0]), frames)


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


def _kernel1d(sigma: float, radius: int) -> np.ndarray:
    """Normalised Gaussian weights at offsets -radius..radius (scipy's kernel); [1] for 0."""
    if sigma <= 0 or radius <= 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _axis_sum(n: int, w: np.ndarray) -> np.ndarray:
    """For each of n positions, the sum of the kernel weights that fall inside 0..n-1."""
    return ndimage.correlate1d(np.ones(n), w, mode="constant", cval=0.0)


def _blur2d(frame: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """Zero-padded separable correlation of one (Y, X) frame, float64."""
    out = ndimage.correlate1d(np.asarray(frame, dtype=np.float64), wy, axis=0, mode="constant", cval=0.0)
    return ndimage.correlate1d(out, wx, axis=1, mode="constant", cval=0.0)


class _Separable:
    """One Gaussian 3D of :func:`blind_gaussian3d`: zero padding + renormalisation.

    f(t, p) = sum over in-movie q of K(q - p) y(q) / sum over in-movie q of K(q - p), with
    K = gt x gy x gx; the J-invariant version drops (from both sums) the centre-frame
    pixels with |dy|, |dx| <= b.  Zero padding (instead of mirroring) never counts a pixel
    or frame twice, so f_J(t, p) is exactly independent of y(t, q) for q in the window.
    The spatial normalisations are kept as per-axis sums (Y,) and (X,), so a tile's
    (y, x) region costs its own area only.
    """

    def __init__(self, shape, sigma_t: float, sigma_yx: float, b: int):
        n_t, n_y, n_x = shape
        self.reach = gaussian_reach(sigma_t)
        self.gt = _kernel1d(sigma_t, self.reach)
        r_s = _spatial_radius(sigma_yx)
        self.gs = _kernel1d(sigma_yx, r_s)
        bb = min(int(b), len(self.gs) // 2)
        c = len(self.gs) // 2
        self.gb = self.gs[c - bb:c + bb + 1]  # the masked part of the spatial kernel
        self.g0 = float(self.gt[self.reach])  # centre-frame weight
        self.norm_t = _axis_sum(n_t, self.gt)  # (T,)
        self.sy, self.sx = _axis_sum(n_y, self.gs), _axis_sum(n_x, self.gs)  # (Y,), (X,)
        self.by, self.bx = _axis_sum(n_y, self.gb), _axis_sum(n_x, self.gb)
        self.n_t = n_t

    def norms(self, region=(slice(None), slice(None))):
        """(spatial normalisation, its masked part) over a (y, x) region, float64."""
        ys, xs = region
        return np.outer(self.sy[ys], self.sx[xs]), self.g0 * np.outer(self.by[ys], self.bx[xs])

    def masked_fraction(self) -> float:
        """Share of the interior kernel weight that the blind spot removes (sum w_J)."""
        return self.g0 * float(self.gb.sum()) ** 2

    def min_denominator(self, rows: int = 256) -> float:
        """Smallest kernel weight left after masking, over the movie (at t = 0, corners);
        computed ``rows`` frame rows at a time (memory: rows x X float64)."""
        t_min = self.norm_t.min()
        return float(min(np.min(t_min * s - m) for s, m in
                         (self.norms((slice(i, i + rows), slice(None))) for i in range(0, len(self.sy), rows))))

    def frames(self, spatial, masked=None, region=(slice(None), slice(None))):
        """Yield (t, output frame) from the spatially blurred frames (and their masked
        parts for f_J) of a (y, x) ``region`` of the movie: a temporal sum over the frames
        t - reach .. t + reach in range (one scipy correlation along T: zero padding =
        frames outside the movie count 0)."""
        num_all = ndimage.correlate1d(spatial, self.gt.astype(np.float32), axis=0, mode="constant", cval=0.0,
                                      output=np.float32)
        norm_s, norm_b = self.norms(region)
        for t in range(self.n_t):
            num = num_all[t].astype(np.float64)
            den = self.norm_t[t] * norm_s
            if masked is not None:
                num -= self.g0 * masked[t]
                den = den - norm_b
            yield t, num / den


def _spatial_parts(y: np.ndarray, sigma_yx: float, b: int, need_masked: bool, core=(slice(None), slice(None))):
    """Per-frame spatial blur of a (T, Y', X') box, cropped to its ``core`` (y, x) slices,
    float32, and its masked part (or None).  The box must extend the core by the kernel
    radius wherever the core is not at the frame's edge (zero padding beyond it)."""
    probe = _Separable((1, 1, 1), 0.0, sigma_yx, b)
    shape = (y.shape[0],) + np.empty(y.shape[1:], dtype=np.bool_)[core].shape
    spatial = np.empty(shape, dtype=np.float32)
    masked = np.empty(shape, dtype=np.float32) if need_masked else None
    for t in range(y.shape[0]):
        spatial[t] = _blur2d(y[t], probe.gs, probe.gs)[core]
        if need_masked:
            masked[t] = _blur2d(y[t], probe.gb, probe.gb)[core]
    return spatial, masked


def auto_tile(n_frames: int, halo: int, copies: int = 5, budget: int | None = None) -> int:
    """Tile edge (px) such that ``copies`` float32 boxes of (T, tile + 2 halo, tile + 2 halo)
    fit in ``budget`` bytes (None: ``TILE_BUDGET``); at least ``MIN_TILE``."""
    budget = TILE_BUDGET if budget is None else budget
    edge = int(math.sqrt(budget / (4.0 * copies * max(1, int(n_frames))))) - 2 * int(halo)
    return max(MIN_TILE, edge)


def blind_tile(n_frames: int, sigmas_yx=BLIND_SIGMAS_YX) -> int:
    """The tile edge (px) :func:`blind_gaussian3d` uses by default for a movie of
    ``n_frames``: :func:`auto_tile` with the widest spatial kernel's halo, 4 copies."""
    return auto_tile(n_frames, max(_spatial_radius(s) for s in sigmas_yx), copies=4)


def _tiles(frame_shape, tile: int):
    """Non-overlapping (slice_y, slice_x) tiles of ``tile`` px covering a (Y, X) frame,
    row-major, aligned to multiples of ``tile`` (the last ones clipped)."""
    ny, nx = (int(n) for n in frame_shape)
    for y0 in range(0, ny, tile):
        for x0 in range(0, nx, tile):
            yield slice(y0, min(ny, y0 + tile)), slice(x0, min(nx, x0 + tile))


def _read_tile(stack, region, halo: int):
    """All frames of a (y, x) ``region`` plus ``halo`` px around it (clipped to the frame):
    the (T, Y', X') box (dtype kept) and the region's slices inside the box."""
    ny, nx = stack.shape[1:]
    ys, xs = region
    y0, y1 = max(0, ys.start - halo), min(ny, ys.stop + halo)
    x0, x1 = max(0, xs.start - halo), min(nx, xs.stop + halo)
    box = np.asarray(stack[:, y0:y1, x0:x1])
    return box, (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))


def _check_stack(stack, what: str):
    """The (T, Y, X) stack itself when it is an array-like with ``shape`` and ``dtype``
    (NumPy, Zarr, ``io.LazyStack``: read later, tile by tile), else ``np.asarray``."""
    y = stack if hasattr(stack, "shape") and hasattr(stack, "dtype") else np.asarray(stack)
    if len(y.shape) != 3 or min(y.shape) < 1:
        raise InputError(None, f"{what}: expected a (T, Y, X) stack, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number):
        raise InputError(None, f"{what}: expected numbers, got dtype {y.dtype}")
    return y


def _check_b(blind_radius) -> int:
    b = int(blind_radius)
    if b < 0 or b != blind_radius:
        raise InputError(None, f"blind_radius must be an integer >= 0 (blindspot // 2), got {blind_radius}")
    return b


def normalised_gaussian3d(stack, sigma_t: float, sigma_yx: float, *, blind_radius: int | None = None,
                          tile: int | None = None, out=None):
    """Gaussian 3D with zero padding and renormalised weights (the family that
    :func:`blind_gaussian3d` tunes); ``blind_radius`` b not None gives the J-invariant
    version f_J: the centre-frame weights with |dy|, |dx| <= b set to zero and the kernel
    renormalised, so f_J(t, p) never depends on y(t, q) for max(|q - p|) <= b.

    stack: (T, Y, X) array-like (any real dtype; NumPy or Zarr, read by spatial tiles);
    sigma_t in frames (truncated at ceil(2 sigma_t), the reach), sigma_yx in px
    (truncated at 4 sigma).  Computed as (G * y - w_J * y_t) / (sum G - sum w_J), both
    sums restricted to the movie: a small 2D correlation of the centre frame only.

    Tiles: all T frames of ``tile`` x ``tile`` px (None: :func:`auto_tile`) read with a
    halo of the spatial kernel radius, so every tile's values equal the whole-frame
    computation's bit for bit.  out: None (a new float32 (T, Y, X) array) or any writable
    (T, Y, X) array (e.g. a Zarr array whose shards are tiles of this size), filled tile
    by tile; returned.  Peak memory besides ``out``: about 5 float32 copies of one
    (T, tile + 2 radius, tile + 2 radius) box.
    """
    y = _check_stack(stack, "normalised_gaussian3d")
    b = None if blind_radius is None else _check_b(blind_radius)
    if not (sigma_t >= 0 and sigma_yx >= 0):
        raise InputError(None, f"normalised_gaussian3d: sigmas must be >= 0, got {sigma_t}, {sigma_yx}")
    filt = _Separable(y.shape, sigma_t, sigma_yx, b or 0)
    halo = _spatial_radius(sigma_yx)
    out = np.empty(y.shape, dtype=np.float32) if out is None else out
    for region in _tiles(y.shape[1:], int(tile or auto_tile(y.shape[0], halo))):
        box, core = _read_tile(y, region, halo)
        spatial, masked = _spatial_parts(box, sigma_yx, b or 0, b is not None, core)
        del box
        block = np.empty(spatial.shape, dtype=np.float32)
        for t, frame in filt.frames(spatial, masked, region):
            block[t] = frame
        out[(slice(None),) + region] = block
    return out


@dataclass
class BlindGaussian:
    """Result of :func:`blind_gaussian3d`.

    denoised: (T, Y, X) float32 -- the candidate output (see ``output``; None for 'none').
    sigma: (sigma_t, sigma_yx) chosen (frames, px); reach: ceil(2 sigma_t) frames.
    blind_radius: b used for the J-invariant score; output: 'plain' or 'jinv'.
    loss: the self-supervised loss of f_J at the chosen sigma (``metrics.self_supervised_loss``);
    loss_frames: (T,) its value per frame (``metrics.self_supervised_loss_per_frame``).
    scores: DataFrame with columns sigma_t, sigma_yx, reach, masked_fraction, loss
        (self-supervised loss mean (f_J(y) - y)^2 in squared input units; NaN where the
        combination was skipped: reach too long for the movie or a degenerate f_J).
    """

    denoised: np.ndarray
    sigma: tuple[float, float]
    reach: int
    blind_radius: int
    output: str
    scores: pd.DataFrame
    loss: float
    loss_frames: np.ndarray


def blind_gaussian3d(stack, blind_radius: int = 0, *, sigmas_t=BLIND_SIGMAS_T, sigmas_yx=BLIND_SIGMAS_YX,
                     output: str = "plain", min_weight: float = 0.02, max_reach: int | None = None,
                     tile: int | None = None, out=None) -> BlindGaussian:
    """Gaussian 3D whose sigmas are tuned on the noisy movie itself, without ground truth.

    Noise2Self (Batson & Royer 2019): for a J-invariant filter f_J (f_J(y)(p) ignores
    y on a neighbourhood J(p) of p), E|f_J(y) - y|^2 = E|f_J(y) - x|^2 + E|y - x|^2 when
    the noise in J(p) is independent of the noise outside (x the clean movie): the
    self-supervised loss ranks filters by their true MSE.  J(p) is the blind spot of the
    noise stage on the centre frame, |dy|, |dx| <= b (b = blindspot // 2; b = 0: only p),
    exactly the blindness of the networks, so the same noise-correlation assumption holds.

    Each (sigma_t, sigma_yx) of the grid is scored with f_J of :func:`normalised_gaussian3d`.
    ``max_reach`` (frames, None = any) limits sigma_t to reach = ceil(2 sigma_t) <= it;
    the loss itself is unbiased for any reach (a kernel longer than the movie averages
    the whole movie, zero padded and renormalised).  Combinations whose f_J keeps
    less than ``min_weight`` of the kernel somewhere (e.g. sigma_t = 0 with the whole
    spatial kernel inside the blind spot) are skipped: f_J would divide by ~0.

    output: which filter at the chosen sigma is returned.
        'plain' (default): the Gaussian itself, centre pixels included.  Measured on
        synthetic 16 x 128 x 128 movies (seed 5, static and 6 px drift aligned by whole
        pixels), PSNR against ground truth at the chosen sigma, plain vs f_J: counting
        (independent noise, b = 0) 23.82 vs 23.81 dB and 23.60 vs 23.57 dB; linear mode
        with PSF-correlated noise (psf_sigma 1, b = 2-3) 23.64 vs 23.27 dB and 23.54 vs
        23.21 dB.  Plain is never worse: the centre pixels carry the most signal weight,
        and dropping them costs more (bias, fewer averaged pixels) than their noise adds.  Its
        loss is that of f_J (``output`` does not change the choice), a conservative score
        for the plain output; in every case above the blind choice was the oracle's.
        'jinv': f_J, whose self-supervised loss is an unbiased MSE + noise estimate.
        'none': no output (``denoised`` None): the tuning only.

    Parameters
    ----------
    stack : (T, Y, X) array
        Aligned noisy movie (any real dtype; float32 copies are made per sigma_yx).
    blind_radius : int
        b >= 0 (blindspot // 2 of ``emdenoise.noise.estimate_blindspot``).
    sigmas_t, sigmas_yx : sequences of float
        Grid, frames and px.

    Returns
    -------
    BlindGaussian

    tile : int or None
        Spatial tile edge (px; None: :func:`auto_tile` from the movie's length): the
        scores are sums over pixels, accumulated over tiles of all T frames read with a
        halo of the widest spatial kernel (results equal the whole-frame computation up
        to the summation order of the losses).
    out : writable (T, Y, X) array or None
        Where the output at the chosen sigma goes (:func:`normalised_gaussian3d`); None:
        a new float32 array (``denoised``).

    Memory: the stack is read tile by tile (NumPy or Zarr): per tile about 4 float32
    copies of (T, tile + 2 halo, tile + 2 halo) -- the box, its spatial blur, the blur's
    masked part and their temporal sum -- plus ``out`` when it is in memory (None).
    ``TILE_BUDGET`` bounds the tiles, so the peak does not grow with the frame size or
    (down to ``MIN_TILE`` px tiles) the movie's length.
    """
    y = _check_stack(stack, "blind_gaussian3d")
    b = _check_b(blind_radius)
    if output not in ("plain", "jinv", "none"):
        raise InputError(None, f"blind_gaussian3d: output must be 'plain', 'jinv' or 'none', got {output!r}")
    n_t = y.shape[0]
    if max_reach is None:
        max_reach = np.inf  # any: a kernel longer than the movie is truncated to it
    if max_reach < 0:
        raise InputError(None, f"blind_gaussian3d: max_reach must be >= 0, got {max_reach}")
    if not len(sigmas_t) or not len(sigmas_yx) or min(sigmas_t) < 0 or min(sigmas_yx) < 0:
        raise InputError(None, "blind_gaussian3d: sigma grids must be non-empty and >= 0")
    rows, todo = [], {}  # todo: row index -> filter to score
    for s_yx in sigmas_yx:
        for s_t in sigmas_t:
            filt = _Separable(y.shape, s_t, s_yx, b)
            rows.append({"sigma_t": float(s_t), "sigma_yx": float(s_yx), "reach": filt.reach,
                         "masked_fraction": filt.masked_fraction(), "loss": float("nan")})
            if filt.reach <= max_reach and filt.min_denominator() >= min_weight:
                todo[len(rows) - 1] = (float(s_yx), filt)
    sse = _tiled_losses(y, todo, b, tile)
    frame_losses = {i: v / (y.shape[1] * y.shape[2]) for i, v in sse.items()}  # (T,) mean per frame
    for i, per in frame_losses.items():
        rows[i]["loss"] = float(per.mean())
    scores = pd.DataFrame(rows, columns=["sigma_t", "sigma_yx", "reach", "masked_fraction", "loss"])
    if scores["loss"].isna().all():
        raise InputError(None, f"blind_gaussian3d: no sigma of the grid fits a {n_t}-frame movie with blind "
                               f"radius {b}")
    best = scores.loc[scores["loss"].idxmin()]
    sigma = (float(best.sigma_t), float(best.sigma_yx))
    den = None if output == "none" else normalised_gaussian3d(y, *sigma, blind_radius=b if output == "jinv" else None,
                                                             tile=tile or blind_tile(n_t, sigmas_yx), out=out)
    return BlindGaussian(denoised=den, sigma=sigma, reach=int(best.reach), blind_radius=b, output=output,
                         scores=scores, loss=float(best.loss), loss_frames=frame_losses[int(best.name)])


def _tiled_losses(y, todo: dict, b: int, tile: int | None) -> dict:
    """Sum over pixels of (f_J(y) - y)^2 per frame for every filter in ``todo`` (row ->
    (sigma_yx, _Separable)): {row: (T,) float64}, accumulated over spatial tiles of all
    frames (halo: the widest spatial kernel's radius).  The spatial parts are computed
    once per tile and sigma_yx, shared by every sigma_t."""
    if not todo:
        return {}
    n_t = y.shape[0]
    by_syx: dict[float, dict] = {}
    for i, (s_yx, filt) in todo.items():
        by_syx.setdefault(s_yx, {})[i] = filt
    halo = max(_spatial_radius(s) for s in by_syx)
    sse = {i: np.zeros(n_t) for i in todo}
    for region in _tiles(y.shape[1:], int(tile or blind_tile(n_t, list(by_syx)))):
        box, core = _read_tile(y, region, halo)
        obs = box[(slice(None),) + core]
        for s_yx, mine in by_syx.items():
            spatial, masked = _spatial_parts(box, s_yx, b, True, core)
            for i, filt in mine.items():
                for t, frame in filt.frames(spatial, masked, region):
                    d = frame - obs[t]
                    sse[i][t] += np.sum(d * d)
            del spatial, masked
    return sse


# ------------------------------------------------------------------- NL-means candidate

#: The grid :func:`blind_nlm` scores: (patch size, search distance) in px, and h as a
#: multiple of the noise SD of the temporal average that NL-means denoises.
NLM_PATCHES = ((5, 6), (9, 11), (13, 15))
NLM_H = (0.45, 0.7, 1.0, 1.4)
#: The grid is scored on this many frames spread over the movie, each on a central crop of
#: at most this edge (px; NL-means runs on it plus the search margin); the chosen setting
#: is then scored on every whole frame.
NLM_TUNE_FRAMES = 6
NLM_TUNE_PX = 384


def temporal_noise_factor(n_frames: int, sigma_t: float, blind: bool) -> np.ndarray:
    """(T,) noise SD of each frame's temporal Gaussian average (:func:`normalised_gaussian3d`
    with sigma_yx 0; frame t left out when ``blind``) relative to one frame's, for noise of
    equal SD and independent between frames: sqrt(sum w^2) / sum w over the frames of the
    movie (fewer at its ends); inf where no frame is left."""
    reach = gaussian_reach(sigma_t)
    g = _kernel1d(sigma_t, reach)
    out = np.full(int(n_frames), np.inf)
    for t in range(int(n_frames)):
        lo, hi = max(0, t - reach), min(int(n_frames), t + reach + 1)
        w = g[lo - t + reach:hi - t + reach].copy()
        if blind:
            w[t - lo] = 0.0
        if w.sum() > 0:
            out[t] = math.sqrt(float(np.sum(w * w))) / float(w.sum())
    return out


def nlm_frame(frame: np.ndarray, noise_sd: float, patch: int, distance: int, h: float) -> np.ndarray:
    """NL-means of one (Y, X) frame (scikit-image ``denoise_nl_means``, fast mode, which
    subtracts the expected patch distance of noise of SD ``noise_sd``); ``h`` in units of
    ``noise_sd``.  float32 (Y, X)."""
    from skimage.restoration import denoise_nl_means  # ~0.3 s import: only where NL-means runs

    f = np.ascontiguousarray(frame, dtype=np.float32)
    return np.asarray(denoise_nl_means(f, patch_size=int(patch), patch_distance=int(distance), h=float(h) * noise_sd,
                                       sigma=float(noise_sd), fast_mode=True), dtype=np.float32)


def average_tile(n_frames: int) -> int:
    """Tile edge (px) of NL-means' temporal averages: 3 float32 copies of all frames of a
    tile within ``TILE_BUDGET`` (:func:`auto_tile`, no halo)."""
    return auto_tile(n_frames, 0, copies=3)


def _temporal_average(y, sigma_t: float, blind: bool, tile, average):
    """Each frame's temporal Gaussian average (zero padding, renormalised: sigma_yx 0 of
    :func:`normalised_gaussian3d`), frame t's weight set to exactly 0 when ``blind``, so
    output frame t does not depend on input frame t even by rounding.  Into ``average``
    (None: a new float32 array), by spatial tiles of all frames (``tile`` px, None:
    :func:`average_tile`)."""
    if not sigma_t > 0:
        raise InputError(None, f"temporal NL-means needs sigma_t > 0 (frames to average), got {sigma_t}")
    n_t = y.shape[0]
    reach = gaussian_reach(sigma_t)
    g = _kernel1d(sigma_t, reach)
    if blind:
        g[reach] = 0.0
    norm = _axis_sum(n_t, g).astype(np.float32)[:, None, None]  # (T, 1, 1)
    out = np.empty(y.shape, dtype=np.float32) if average is None else average
    for region in _tiles(y.shape[1:], int(tile or average_tile(n_t))):
        box = np.asarray(y[(slice(None),) + region], dtype=np.float32)
        num = ndimage.correlate1d(box, g.astype(np.float32), axis=0, mode="constant", cval=0.0, output=np.float32)
        out[(slice(None),) + region] = num / norm
    return out


def temporal_nlm(stack, sigma_t: float, patch: int, distance: int, h: float, *, noise_sd: float,
                 blind: bool = False, tile: int | None = None, average=None, out=None, region=None):
    """NL-means (:func:`nlm_frame`) of every frame's temporal Gaussian average.

    stack: (T, Y, X) array-like (NumPy or Zarr); sigma_t in frames (> 0); patch, distance
    px; h in units of the average's noise SD, which is ``noise_sd`` (one frame's, data
    units) x :func:`temporal_noise_factor`.  blind: frame t is left out of its own average,
    so output frame t never depends on input frame t at all (J-invariant for any spatial
    blind spot within a frame, as long as frames are independent) -- the version whose
    self-supervised loss ranks the settings; plain (False): frame t included, the output.
    average: scratch (T, Y, X) array for the averages (None: in memory; a Zarr array for
    large movies).  out: None (a new float32 array), a writable (T, Y, X) array filled by
    blocks of frames, or False (no output: only the losses).
    Returns (output or None, (T,) float64 self-supervised loss per frame, mean (f - y)^2
    over ``region`` (slice_y, slice_x) of each frame, None: all of it).
    """
    y = _check_stack(stack, "temporal_nlm")
    avg = _temporal_average(y, sigma_t, blind, tile, average)
    sds = float(noise_sd) * temporal_noise_factor(y.shape[0], sigma_t, blind)
    return _nlm_pass(y, avg, sds, (patch, distance, h), out, region)


def _nlm_pass(y, avg, sds: np.ndarray, setting: tuple, out, region):
    """:func:`temporal_nlm` on averages already made: NL-means of every frame of ``avg``
    (noise SD ``sds[t]``), by blocks of frames; (output or None, (T,) losses against y)."""
    n_t = y.shape[0]
    patch, distance, h = setting
    keep = out is not False
    if keep and out is None:
        out = np.empty(y.shape, dtype=np.float32)
    cut = tuple(region) if region is not None else (slice(None), slice(None))
    losses = np.zeros(n_t)
    k = block_frames(y.shape[1:])
    for a in range(0, n_t, k):
        b = min(n_t, a + k)
        src = np.asarray(avg[a:b], dtype=np.float32)
        obs = np.asarray(y[a:b], dtype=np.float32)
        block = np.empty(src.shape, dtype=np.float32)
        for i in range(b - a):
            block[i] = nlm_frame(src[i], sds[a + i], patch, distance, h)
            d = block[i][cut].astype(np.float64) - obs[i][cut]
            losses[a + i] = float(np.mean(d * d))
        if keep:
            out[a:b] = block
    return (out if keep else None), losses


@dataclass
class BlindNLM:
    """Result of :func:`blind_nlm`: the chosen ``sigma_t`` (frames), ``patch``, ``distance``
    (px), ``h`` (x the average's noise SD), ``noise_sd`` (one frame's, data units); ``loss``
    and ``loss_frames`` (T,): the self-supervised loss of the blind version on every whole
    frame (comparable with :class:`BlindGaussian`'s); ``scores``: DataFrame patch,
    distance, h, loss (on the tuning frames' crops)."""

    sigma_t: float
    patch: int
    distance: int
    h: float
    noise_sd: float
    loss: float
    loss_frames: np.ndarray
    scores: pd.DataFrame


def blind_nlm(stack, sigma_t: float, *, noise_sd: float, patches=NLM_PATCHES, hs=NLM_H,
              tune_frames: int = NLM_TUNE_FRAMES, tune_px: int = NLM_TUNE_PX, tile: int | None = None,
              average=None, region=None) -> BlindNLM:
    """NL-means of a temporal Gaussian average, tuned on the noisy movie (Noise2Self).

    Why: a Gaussian averages every pixel with its neighbours whatever they show; NL-means
    (Buades et al. 2005) averages pixels whose surrounding patches look alike, so edges of
    vesicles and particles stay sharp while flat regions are averaged widely.  Measured on
    the bench's 41 x 256² tilt series (smooth objects, PSF-correlated noise): 32.2 dB vs
    30.4 for the oracle-tuned Gaussian 3D; on linear-mode movies +0.0-0.4 dB; on counting
    movies it loses to the Gaussian (amorphous texture: no similar patches).
    Each setting of the grid (``patches`` x ``hs``) is scored with the blind version of
    :func:`temporal_nlm` -- frame t left out of its own average, so its self-supervised
    loss mean (f - y)^2 is the true MSE plus the noise variance (Batson & Royer 2019) --
    on ``tune_frames`` frames spread over the movie, each on a central crop of at most
    ``tune_px`` px (NL-means sees the crop plus its search margin).  The chosen setting is
    then scored on every whole frame (``region``: of each frame, as in
    ``metrics.self_supervised_loss``), the loss that competes with the other candidates.

    stack: (T, Y, X) aligned noisy movie; sigma_t: temporal sigma of the average (frames,
    > 0); noise_sd: one frame's noise SD in data units (e.g. sqrt of
    ``metrics.frame_difference_variance``).  average: scratch (T, Y, X) array (None: in
    memory).  Cost: (tune_frames x grid) crops + T whole frames of NL-means (~0.25 s per
    256² frame at patch 13, search 15).
    """
    y = _check_stack(stack, "blind_nlm")
    n_t, n_y, n_x = y.shape
    if not (noise_sd > 0 and np.isfinite(noise_sd)):
        raise InputError(None, f"blind_nlm: noise_sd must be a positive number, got {noise_sd}")
    avg = _temporal_average(y, sigma_t, True, tile, average)
    sds = float(noise_sd) * temporal_noise_factor(n_t, sigma_t, True)
    frames = np.unique(np.linspace(0, n_t - 1, max(1, min(n_t, int(tune_frames)))).round().astype(int))
    margin = max(d + p // 2 for p, d in patches)

    def crop(n):  # (read slice, score slice inside it)
        c0 = max(0, (n - int(tune_px)) // 2)
        c1 = min(n, c0 + int(tune_px))
        r0, r1 = max(0, c0 - margin), min(n, c1 + margin)
        return slice(r0, r1), slice(c0 - r0, c1 - r0)

    (ry, sy), (rx, sx) = crop(n_y), crop(n_x)
    src = [np.asarray(avg[t, ry, rx], dtype=np.float32) for t in frames]
    obs = [np.asarray(y[t, ry, rx], dtype=np.float32)[sy, sx] for t in frames]
    rows = []
    for p, d in patches:
        for h in hs:
            sse = [np.mean((nlm_frame(s, sds[t], p, d, h)[sy, sx].astype(np.float64) - o) ** 2)
                   for s, o, t in zip(src, obs, frames)]
            rows.append({"patch": int(p), "distance": int(d), "h": float(h), "loss": float(np.mean(sse))})
    scores = pd.DataFrame(rows, columns=["patch", "distance", "h", "loss"])
    best = scores.loc[scores["loss"].idxmin()]
    setting = (int(best.patch), int(best.distance), float(best.h))
    _, losses = _nlm_pass(y, avg, sds, setting, False, region)
    return BlindNLM(sigma_t=float(sigma_t), patch=setting[0], distance=setting[1], h=setting[2],
                    noise_sd=float(noise_sd), loss=float(losses.mean()), loss_frames=losses, scores=scores)


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


class FrameMap:
    """A lazy (T, Y, X) float32 stack ``fn(stack[a:b])`` for a per-frame function ``fn``
    ((t, Y, X) -> (t, Y, X)), computed only for the frames read: ``m[t]``, ``m[a:b]``
    (step 1), trailing Y / X indices, ``np.asarray(m)``.  With ``io.write_zarr`` or the
    ``emdenoise.metrics`` functions, which read block by block or frame by frame, a
    filtered stack is never whole in memory.  ``fn`` is applied to at most
    :func:`block_frames` frames at a time (``BLOCK_BYTES``), however many are read: a
    filter's working copies (an FFT low-pass: ~5x its input) stay small while a writer
    reads 256 MB blocks.
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, stack, fn):
        self.stack, self.fn = stack, fn
        self.shape = tuple(int(n) for n in stack.shape)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = key[0], key[1:]
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            i = int(first) + (n if first < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"frame {first} out of range for {n} frames")
            return self[i:i + 1][0][rest]
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise TypeError(f"FrameMap supports frame indices and slices of step 1, got {first!r}")
        a, b, _ = first.indices(n)
        block = np.asarray(self._frames(a, max(a, b)), dtype=np.float32)
        return block[(slice(None),) + rest]

    def _frames(self, a: int, b: int) -> np.ndarray:
        """Frames a..b-1, computed ``block_frames`` at a time (subclasses that need the
        frame indices override :meth:`_compute`)."""
        step = block_frames(self.shape[1:])
        if b - a <= step:
            return self._compute(a, b)
        out = np.empty((b - a,) + self.shape[1:], dtype=np.float32)
        for s in range(a, b, step):
            e = min(b, s + step)
            out[s - a:e - a] = self._compute(s, e)
        return out

    def _compute(self, a: int, b: int) -> np.ndarray:
        return self.fn(np.asarray(self.stack[a:b]))

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


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
    arr = np.asarray(stack, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected a (T, Y, X) or (Y, X) array, got shape {arr.shape}")
    return apply_lowpass_mask(arr, lowpass_mask(arr.shape[-2:], diameter, ks_max, pad, edge_width), pad)


def apply_lowpass_mask(frames, mask: np.ndarray, pad: str = "symmetric") -> np.ndarray:
    """(..., Y, X) frames filtered with a :func:`lowpass_mask` (float32): what
    :func:`fft_lowpass` does once the mask is made (callers that filter many blocks with
    one mask make it once)."""
    arr = np.asarray(frames, dtype=np.float32)
    spec, _ = lowpass_spectrum(arr, pad)
    spec *= mask
    return lowpass_inverse(spec, pad, arr.shape[-2:])


def lowpass_mask(shape: tuple[int, int], diameter: float | None = LOWPASS_DIAMETER, ks_max: int = 7,
                 pad: str = "symmetric", edge_width: float = 0.0) -> np.ndarray:
    """The mask :func:`fft_lowpass` multiplies the :func:`lowpass_spectrum` of a (Y, X)
    frame with: float32 (Y, X) for 'symmetric' (DCT-II bins), (Y, X // 2 + 1) for
    'periodic' (rfft2 bins); arguments as for :func:`fft_lowpass`."""
    frac = 1.0 / ks_max if diameter is None else float(diameter)
    if not frac > 0:
        raise ValueError(f"diameter must be > 0, got {diameter}")
    _check_pad(pad)
    return _lowpass_mask(tuple(shape), frac / 2.0, edge_width, dct=pad == "symmetric")


def _check_pad(pad: str) -> None:
    if pad not in ("symmetric", "periodic"):
        raise ValueError(f"pad must be 'symmetric' or 'periodic', got {pad!r}")


def lowpass_spectrum(frames: np.ndarray, pad: str = "symmetric") -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal spectrum of (..., Y, X) frames in the basis :func:`fft_lowpass` masks.

    'symmetric': DCT-II (the mirror-extended frame's spectrum), real, (..., Y, X);
    'periodic': rfft2, complex, (..., Y, X // 2 + 1).  Returns (spectrum, weight): weight
    (1, X') float32 makes Parseval hold on the half plane, sum over pixels of a * b ==
    sum over bins of weight * Re(A conj(B)) (1 for the DCT; 2 for the rfft2 columns that
    stand for two bins of the full plane).  float32 frames give float32 / complex64.
    """
    from scipy import fft as sfft

    _check_pad(pad)
    nx = frames.shape[-1]
    if pad == "symmetric":
        return (sfft.dctn(frames, type=2, axes=(-2, -1), norm="ortho", workers=-1),
                np.ones((1, nx), dtype=np.float32))
    weight = np.full((1, nx // 2 + 1), 2.0, dtype=np.float32)
    weight[0, 0] = 1.0
    if nx % 2 == 0:
        weight[0, -1] = 1.0  # the Nyquist column is its own mirror
    return sfft.rfftn(frames, axes=(-2, -1), norm="ortho", workers=-1), weight


def lowpass_inverse(spec: np.ndarray, pad: str, shape: tuple[int, int]) -> np.ndarray:
    """Frames (float32, (..., Y, X) with (Y, X) = ``shape``) from a :func:`lowpass_spectrum`."""
    from scipy import fft as sfft

    _check_pad(pad)
    if pad == "symmetric":
        out = sfft.idctn(spec, type=2, axes=(-2, -1), norm="ortho", workers=-1)
    else:
        out = sfft.irfftn(spec, s=tuple(shape), axes=(-2, -1), norm="ortho", workers=-1)
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------ Gaussian mix (classical)

#: The dictionary of :func:`blind_gaussian_mix`: Gaussian 3D filters at every (sigma_t,
#: sigma_yx) of these grids (frames; px) whose J-invariant version keeps enough weight.
MIX_SIGMAS_T = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MIX_SIGMAS_YX = (0.5, 1.0, 2.0, 4.0)
#: Numbers of structure classes (quantiles of the structure map, each with its own
#: coefficients) the mix chooses from by its cross-fitted loss.  Measured on the quality
#: suite's 50 x 256² movies (PSNR vs truth): 8 classes beat 1 by 0.1-0.45 dB, 16 gained
#: nothing more; on 24 x 96² movies 8 classes lose 0.2-0.7 dB to 1-2 (too few pixels).
MIX_CLASSES = (1, 2, 4, 8)
#: Structure map: gradient energy (derivative-of-Gaussian of MIX_GRAD_SIGMA px, squared,
#: smoothed by MIX_STRUCT_SMOOTH px) of the temporal Gaussian mean (MIX_STRUCT_SIGMA_T
#: frames) of the *other* frames -- it never reads frame t, so neither do the classes.
MIX_STRUCT_SIGMA_T = 16.0
MIX_GRAD_SIGMA = 1.0
MIX_STRUCT_SMOOTH = 2.0
#: The class edges are quantiles of at most about this many pixels of the structure map
#: (a grid in frame coordinates, so they do not depend on the tiling).
MIX_SAMPLES = 2**20
#: Extra blind radius (px) of the mix where the noise is spatially correlated (b > 0): the
#: noise stage's blind spot leaves |r| up to its threshold (0.05) outside -- more where it
#: is capped at its largest lag --, and a least-squares mix of 28 filters exploits even that
#: (a loss biased low).  Linear-mode movies (PSNR vs truth, loss, blind radius b / b + 1 /
#: b + 2): PSF 1.5 px 50 frames 33.07 / 33.59 / 33.63 dB (the loss had called b's mix
#: better than the tuned Gaussian, 33.44); PSF 1.0 px 10 frames 28.20 / 28.27 / 28.27;
#: PSF 0.7 px 32.22 / 32.24 / 32.24.  White noise (b = 0) has nothing left to exploit.
MIX_EXTRA_BLIND = 2
#: Pixels (at most about; a grid in frame coordinates) whose dictionary outputs the mix
#: hands to the fit of its gate (:func:`blind_gaussian_mix` ``samples``, ``train.fit_mix_gate``).
MIX_GATE_SAMPLES = 2**21
#: Ridge of the normal equations, relative to their mean diagonal (near-equal dictionary
#: entries -- sigma_t 16 and 32 on a 10-frame movie -- make them singular).
MIX_RIDGE = 1e-7


@dataclass
class GaussianMix:
    """Result of :func:`blind_gaussian_mix`.

    denoised: (T, Y, X) float32, the output: the J-invariant mix with the coefficients of
        all frames, its own pixel given back with the weight of ``pipeline.unblind``
        (None for ``output='none'``).
    loss: self-supervised loss of the J-invariant mix with coefficients fitted on the
        frames of the other parity (cross-fitted: unbiased for it up to O(1/N));
        loss_frames: (T,) per frame.
    fit: the fitted mix, JSON-able (:func:`gaussian_mix_apply` re-applies it): 'sigmas'
        [[sigma_t, sigma_yx], ...] (K entries), 'blind_radius', 'edges' (classes - 1
        structure quantiles), 'beta' (classes, K + 1; last: intercept) fitted on all
        frames -- the output's --, 'beta_cross' (2, classes, K + 1), [p] fitted on the
        frames whose parity is not p -- the blind version's --, 'pixels' per class,
        'own_pixel' {'weight', 'loss' (of the all-frame blind mix), 'noise_variance'}.
    samples: with ``samples`` > 0, the dictionary's blind outputs on a grid of pixels, for
        the gate (:func:`mix_gate_predict`): 'features' (n, K) float32 (the chosen fit's
        dictionary, in its order), 'structure' (n,), 'target' (n,) (the noisy pixel),
        'frame' (n,) int64.
    """

    denoised: np.ndarray | None
    loss: float
    loss_frames: np.ndarray
    fit: dict
    samples: dict | None = None


def mix_blind_radius(blind_radius: int) -> int:
    """The blind radius (px) :func:`blind_gaussian_mix` is given for a noise stage's b:
    b + ``MIX_EXTRA_BLIND`` for spatially correlated noise (b > 0), 0 for white noise."""
    b = _check_b(blind_radius)
    return b + MIX_EXTRA_BLIND if b > 0 else 0


def _mix_filters(shape, b: int, sigmas_t, sigmas_yx, min_weight: float) -> list:
    """[(sigma_t, sigma_yx, _Separable)] of the dictionary whose f_J keeps at least
    ``min_weight`` of its kernel everywhere (as :func:`blind_gaussian3d` requires)."""
    out = []
    for s_yx in sigmas_yx:
        for s_t in sigmas_t:
            filt = _Separable(shape, float(s_t), float(s_yx), b)
            if filt.min_denominator() >= min_weight:
                out.append((float(s_t), float(s_yx), filt))
    return out


def _mix_halo(sigmas_yx) -> int:
    """Spatial halo (px) a tile of the mix is read with: the widest Gaussian's radius and
    the structure map's (derivative + smoothing, truncated at SPATIAL_TRUNCATE sigma)."""
    struct = _spatial_radius(MIX_GRAD_SIGMA) + _spatial_radius(MIX_STRUCT_SMOOTH)
    return max(max(_spatial_radius(s) for s in sigmas_yx), struct)


def mix_structure_sigma(max_reach: int | None) -> float:
    """sigma_t (frames) of the mix's structure map: :data:`MIX_STRUCT_SIGMA_T`, or less so
    that the map of frame t reads no frame beyond ``max_reach`` (its reach ceil(2 sigma_t)
    is part of the mix's temporal reach); None or < 1: the default (no frame budget)."""
    if max_reach is None or int(max_reach) < 1:
        return MIX_STRUCT_SIGMA_T
    return min(MIX_STRUCT_SIGMA_T, int(max_reach) / 2.0)


def mix_reach(fit: dict) -> int:
    """Temporal reach (frames each side) of a fitted mix's output: its dictionary's longest
    Gaussian and, where the coefficients depend on the structure map (more than one class,
    or a gate, which reads it), the map's temporal mean (:func:`mix_structure_sigma`)."""
    reach = max(gaussian_reach(s_t) for s_t, _ in fit["sigmas"])
    if int(fit.get("classes", 1)) > 1 or fit.get("gate"):
        reach = max(reach, gaussian_reach(float(fit.get("structure_sigma_t", MIX_STRUCT_SIGMA_T))))
    return int(reach)


def _mix_structure(box: np.ndarray, core, sigma_t: float = MIX_STRUCT_SIGMA_T) -> np.ndarray:
    """(T, Y', X') box -> (T, core) float32 structure map: gradient energy of the temporal
    Gaussian mean (``sigma_t`` frames) of the *other* frames (zero padding in t,
    renormalised), so frame t's map never reads frame t.  The box must extend the core by
    :func:`_mix_halo` px where the core is not at the frame's edge (the filters mirror only
    at the frame's edge)."""
    n_t = box.shape[0]
    reach = gaussian_reach(sigma_t)
    gt = _kernel1d(sigma_t, reach).astype(np.float32)
    gt[reach] = 0.0  # leave frame t out
    num = ndimage.correlate1d(box.astype(np.float32, copy=False), gt, axis=0, mode="constant", cval=0.0)
    den = ndimage.correlate1d(np.ones(n_t, np.float32), gt, mode="constant", cval=0.0)
    ctx = num / den[:, None, None]
    s, tr = MIX_GRAD_SIGMA, SPATIAL_TRUNCATE
    gy = ndimage.gaussian_filter(ctx, (0, s, s), order=(0, 1, 0), truncate=tr)
    gx = ndimage.gaussian_filter(ctx, (0, s, s), order=(0, 0, 1), truncate=tr)
    energy = ndimage.gaussian_filter(gy * gy + gx * gx, (0, MIX_STRUCT_SMOOTH, MIX_STRUCT_SMOOTH), truncate=tr)
    return energy[(slice(None),) + tuple(core)]


def _mix_features(box: np.ndarray, core, region, filters_: list, b: int) -> np.ndarray:
    """The J-invariant outputs of the dictionary on a tile: (K, T, h, w) float32, equal to
    the whole-frame values (:func:`normalised_gaussian3d` with ``blind_radius`` b)."""
    n_t = box.shape[0]
    h, w = np.empty(box.shape[1:], dtype=np.bool_)[core].shape
    feats = np.empty((len(filters_), n_t, h, w), np.float32)
    by_yx = {}
    for k, (_, s_yx, _) in enumerate(filters_):
        by_yx.setdefault(s_yx, []).append(k)
    for s_yx, ks in by_yx.items():
        spatial, masked = _spatial_parts(box, s_yx, b, True, core)
        for k in ks:
            for t, frame in filters_[k][2].frames(spatial, masked, region):
                feats[k, t] = frame
    return feats


def _mix_design(feats: np.ndarray, t: int, sel: np.ndarray) -> np.ndarray:
    """(n, K + 1) float64 design matrix of frame t's selected pixels: features + 1."""
    a = np.empty((int(sel.sum()), feats.shape[0] + 1), np.float64)
    a[:, :-1] = feats[:, t][:, sel].T
    a[:, -1] = 1.0
    return a


def _mix_solve(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Least-squares coefficients from normal equations, with a small relative ridge."""
    k = gram.shape[0]
    lam = MIX_RIDGE * float(np.trace(gram)) / k
    return np.linalg.solve(gram + lam * np.eye(k), rhs)


def _mix_tiles(shape, halo: int, n_feat: int) -> int:
    """Tile edge (px) at which the mix's ``n_feat`` float32 copies of (T, tile, tile) and
    the box's working copies fit in TILE_BUDGET."""
    return auto_tile(shape[0], halo, copies=n_feat + 8)


def _mix_fit(gram, rhs, sq, members, n_k: int, edges, n_pixels: int) -> dict:
    """Coefficients of one class layout from the finest classes' normal equations:
    ``members`` lists, per class, the finest classes it joins.  A class with fewer than
    4 (K + 1) pixels of a parity takes the coefficients of all pixels (of that parity)."""
    g = np.stack([gram[:, m].sum(1) for m in members], 1)  # (2, C, K + 1, K + 1)
    r = np.stack([rhs[:, m].sum(1) for m in members], 1)
    q = np.stack([sq[:, m].sum(1) for m in members], 1)
    n_pix = np.rint(g[:, :, -1, -1]).astype(np.int64)  # the intercept column counts pixels
    few = 4 * (n_k + 1)
    pooled = _mix_solve(g.sum((0, 1)), r.sum((0, 1)))
    beta = np.stack([_mix_solve(g[:, c].sum(0), r[:, c].sum(0)) if n_pix[:, c].sum() >= few else pooled
                     for c in range(len(members))])
    cross = np.stack([np.stack([_mix_solve(g[1 - p, c], r[1 - p, c]) if n_pix[1 - p, c] >= few else
                                _mix_solve(g[1 - p].sum(0), r[1 - p].sum(0)) for c in range(len(members))])
                      for p in (0, 1)])
    g_all, r_all, q_all = g.sum(0), r.sum(0), q.sum(0)
    loss_all = sum(float(q_all[c] - 2 * beta[c] @ r_all[c] + beta[c] @ g_all[c] @ beta[c])
                   for c in range(len(members))) / n_pixels
    return {"classes": len(members), "edges": [float(e) for e in edges], "beta": beta.tolist(),
            "beta_cross": cross.tolist(), "pixels": n_pix.sum(0).tolist(), "loss_all": loss_all}


def blind_gaussian_mix(stack, blind_radius: int = 0, *, sigmas_t=MIX_SIGMAS_T, sigmas_yx=MIX_SIGMAS_YX,
                       classes=MIX_CLASSES, noise_variance: float | None = None,
                       preferred_reach: int | None = None, min_z: float = 2.0, output: str = "plain",
                       min_weight: float = 0.02, tile: int | None = None, out=None, samples: int = 0,
                       max_reach: int | None = None) -> GaussianMix:
    """A locally adaptive mix of Gaussian 3D filters, fitted on the noisy movie itself.

    Each output pixel is a linear combination of K Gaussian 3D filters of the movie (the
    (sigma_t, sigma_yx) grid; zero padding, renormalised -- :func:`normalised_gaussian3d`)
    plus a constant, with one set of coefficients per *structure class*: the quantile of
    the local gradient energy of the mean of the other frames (:func:`_mix_structure`),
    so lattice fringes, particle edges and flat support each get their own filter.  The
    coefficients minimise the self-supervised loss of the J-invariant mix, sum (f_J - y)^2
    (Noise2Self: least squares, since f_J is linear in them), i.e. a data-tuned Wiener
    filter on a basis of Gaussians -- a difference of two Gaussians with opposite signs
    sharpens what one Gaussian blurs, and a class can average long in time where the scene
    keeps still.  Why: on the quality suite's 50-frame movies the best single Gaussian
    (tuned with the truth) loses 0.3-1.3 dB to this mix.

    The number of classes is chosen among ``classes`` (1, 2, 4, 8: nested quantiles) by the
    cross-fitted loss below: more classes fit more coefficients, which a small movie
    cannot afford (24 x 96² px: 8 classes 0.6 dB below 1; 50 x 256²: 8 classes best).

    Blindness: f_J of every dictionary entry ignores y(t, q) for |q - p| <= b on the centre
    frame, and frame t's class never reads frame t; with the coefficients fixed
    (:func:`gaussian_mix_apply`) the blind mix is exactly J-invariant.  The coefficients of
    the reported loss are fitted on the frames of the other parity (frame t is never its
    own target), so the loss is an unbiased estimate of MSE + noise variance up to their
    O(1/N) dependence on frame t through the other frames' inputs (at most ~250 numbers
    fitted on the movie's pixels).  The output is the J-invariant mix with the
    coefficients fitted on all frames, its own pixel given back as a network's is
    (``pipeline.unblind``: weight 1 - sigma^2 / L, never worse than the blind mix in
    expectation; sigma^2 = ``noise_variance``).  Not the plain Gaussians with those
    coefficients: a small kernel's blind version predicts from the neighbours, its plain
    one is mostly the pixel itself (0.1 dB worse, 28.69 vs 28.79 dB on the suite's 4 e-/px
    dynamic movie).

    stack: (T, Y, X) array-like, T >= 2 (NumPy or Zarr: read by spatial tiles of all
        frames, four times); blind_radius: b (px, the noise stage's blindspot // 2).
    noise_variance: the noise variance per pixel (``metrics.frame_difference_variance``),
        for the own pixel's weight; None: no own pixel (weight 0).
    preferred_reach: temporal reach (frames) the mix keeps to unless reaching further is
        better by ``min_z`` standard errors of the per-frame loss difference (the networks'
        rule, ``pipeline.choose_reach``): ``metrics.checkable_reach(T)``, so that uMSE can
        still score the output (on the 100-frame Au movie the whole dictionary reaches 64
        frames, past the 44 uMSE can check).  The dictionary without the Gaussians that
        reach further (and each number of classes) is fitted from the same normal
        equations.  None: no preference.  The structure map's temporal mean keeps within it
        too (:func:`mix_structure_sigma`; the classes, and so the output, depend on every
        frame the map reads: :func:`mix_reach`).
    max_reach: the longest temporal reach (frames) allowed at all (``model.max_reach``):
        Gaussians reaching further leave the grid, the structure map keeps within it, and
        with 0 the mix has one class and no gate (the map needs another frame).  None: any.
    classes: a number of structure classes, or several (a power-of-two ladder up to the
        largest, e.g. (1, 2, 4, 8): the lowest cross-fitted loss is kept).
    output: 'plain' (default: the denoised movie), 'jinv' (the cross-fitted blind mix) or
        'none'.
    tile: tile edge (px) of the output (None: from the memory budget); each is computed
        in sub-tiles that fit ``TILE_BUDGET`` and written once.  The values do not depend
        on the tiles (each tile is read with a halo of :func:`_mix_halo` px).
    out: writable (T, Y, X) array (e.g. a Zarr array sharded by ``tile``) or None.
    samples: keep the blind dictionary outputs of about this many pixels (every frame, a
        grid of rows and columns fixed in frame coordinates) for a gate (result's
        ``samples``); 0: none.
    """
    y = _check_stack(stack, "blind_gaussian_mix")
    b = _check_b(blind_radius)
    if output not in ("plain", "jinv", "none"):
        raise InputError(None, f"blind_gaussian_mix: output must be 'plain', 'jinv' or 'none', got {output!r}")
    n_t, n_y, n_x = (int(n) for n in y.shape)
    if n_t < 2:
        raise InputError(None, f"blind_gaussian_mix: needs at least 2 frames (the structure map of frame t is "
                               f"made of the others), got {n_t}")
    if max_reach is not None:
        sigmas_t = tuple(s for s in sigmas_t if gaussian_reach(s) <= int(max_reach))
    budget = [int(r) for r in (preferred_reach, max_reach) if r is not None]
    s_sigma = mix_structure_sigma(min(budget) if budget else None)
    if max_reach is not None and gaussian_reach(s_sigma) > int(max_reach):  # 0: no other frame for the map
        classes, samples = 1, 0
    options = sorted({int(c) for c in np.atleast_1d(classes)})
    finest = options[-1]
    if options[0] < 1 or any(finest % c for c in options):
        raise InputError(None, f"blind_gaussian_mix: classes must be >= 1, each dividing the largest, got {classes}")
    filts = _mix_filters(y.shape, b, sigmas_t, sigmas_yx, min_weight)
    if not filts:
        raise InputError(None, f"blind_gaussian_mix: no Gaussian of the grid keeps {min_weight} of its weight "
                               f"with blind radius {b}")
    halo, n_k = _mix_halo(sigmas_yx), len(filts)
    sub = _mix_tiles(y.shape, halo, n_k)
    # pass 1: class edges from a grid of the structure map (fixed in frame coordinates)
    step = max(1, int(math.ceil(math.sqrt(n_t * n_y * n_x / MIX_SAMPLES))))
    edge_samples = []
    for region in _tiles((n_y, n_x), sub):
        box, core = _read_tile(y, region, halo)
        st = _mix_structure(box, core, s_sigma)
        oy, ox = (-region[0].start) % step, (-region[1].start) % step
        edge_samples.append(st[:, oy::step, ox::step].ravel())
    edges = np.quantile(np.concatenate(edge_samples), np.linspace(0, 1, finest + 1)[1:-1])
    # pass 2: normal equations per finest class and frame parity, from the blind dictionary
    gram = np.zeros((2, finest, n_k + 1, n_k + 1))
    rhs = np.zeros((2, finest, n_k + 1))
    sq = np.zeros((2, finest))
    s_step = max(1, int(math.ceil(math.sqrt(n_t * n_y * n_x / samples)))) if samples else 0
    kept = []
    for region in _tiles((n_y, n_x), sub):
        box, core = _read_tile(y, region, halo)
        struct = _mix_structure(box, core, s_sigma)
        cls = np.digitize(struct, edges)
        fb = _mix_features(box, core, region, filts, b)
        target = box[(slice(None),) + tuple(core)]
        if s_step:
            grid = (slice(None), slice((-region[0].start) % s_step, None, s_step),
                    slice((-region[1].start) % s_step, None, s_step))
            frame = np.broadcast_to(np.arange(n_t)[:, None, None], struct.shape)
            kept.append((fb[(slice(None),) + grid].reshape(n_k, -1).T, struct[grid].ravel(),
                         target[grid].ravel().astype(np.float32), frame[grid].ravel()))
        for t in range(n_t):
            for c in range(finest):
                sel = cls[t] == c
                if sel.any():
                    a = _mix_design(fb, t, sel)
                    v = target[t][sel].astype(np.float64)
                    gram[t % 2, c] += a.T @ a
                    rhs[t % 2, c] += a.T @ v
                    sq[t % 2, c] += float(v @ v)
        del fb, box
    reach = [gaussian_reach(s_t) for s_t, _, _ in filts]
    dictionaries = [list(range(n_k))]  # the whole grid, and the part within the preferred reach
    short = [k for k in range(n_k) if preferred_reach is not None and reach[k] <= int(preferred_reach)]
    if short and len(short) < n_k:
        dictionaries.insert(0, short)
    fits = []
    for keep in dictionaries:
        idx = np.array(keep + [n_k])  # + the intercept
        g_k, r_k = gram[:, :, idx][:, :, :, idx], rhs[:, :, idx]
        base = {"sigmas": [[filts[k][0], filts[k][1]] for k in keep], "blind_radius": b,
                "sigmas_yx_grid": [float(s) for s in sigmas_yx], "structure_sigma_t": s_sigma}
        for c in options:  # nested quantile classes: class i of c joins finest classes i*f .. (i+1)*f - 1
            f = finest // c
            fits.append({**base, **_mix_fit(g_k, r_k, sq, [list(range(i * f, (i + 1) * f)) for i in range(c)],
                                            len(keep), edges[f - 1::f][:c - 1], n_t * n_y * n_x)})
            fits[-1]["reach"] = mix_reach(fits[-1])
    # pass 3: every fit's cross-fitted blind loss; the lowest within the preferred reach is kept
    # unless the whole dictionary's lowest is significantly lower
    _, sums = _mix_apply(y, fits, "none", None, None, None)
    per_frame = sums / (n_y * n_x)
    means = per_frame.mean(1)
    n_short = len(options) if len(dictionaries) == 2 else 0
    best = int(np.argmin(means))
    z = None
    if n_short and best >= n_short:
        near = int(np.argmin(means[:n_short]))
        d = per_frame[best] - per_frame[near]
        se = float(np.std(d, ddof=1) / np.sqrt(n_t)) if n_t > 1 else 0.0
        z = float(np.mean(d) / se) if se > 0 else float("-inf")
        if z > -float(min_z):
            best = near
    fit = fits[best]
    fit["reach_choice"] = {"preferred_reach": None if preferred_reach is None else int(preferred_reach),
                           "reaches": sorted({f["reach"] for f in fits}), "z": z, "min_z": float(min_z)}
    var = float("nan") if noise_variance is None else float(noise_variance)
    loss_all = fit.pop("loss_all")
    weight = float(np.clip(1.0 - var / loss_all, 0.0, 0.999)) if loss_all > 0 and np.isfinite(var) else 0.0
    fit["own_pixel"] = {"weight": weight, "loss": loss_all, "noise_variance": float(var)}
    first = best - best % len(options)  # the class ladder of the chosen fit's dictionary
    fit["class_losses"] = {str(c): float(v) for c, v in zip(options, means[first:first + len(options)])}
    # pass 4: the output
    den = None
    if output != "none":
        den = _mix_apply(y, [fit], "denoised" if output == "plain" else "jinv", tile, out, None)[0]
    picked = None
    if kept:
        cols = [[filts[k][0], filts[k][1]] for k in range(n_k)]
        cols = np.array([cols.index(list(sig)) for sig in fit["sigmas"]])
        picked = {"features": np.concatenate([k[0] for k in kept])[:, cols],
                  **{name: np.concatenate([k[i] for k in kept]) for i, name in
                     ((1, "structure"), (2, "target"), (3, "frame"))}}
    return GaussianMix(denoised=den, loss=float(per_frame[best].mean()), loss_frames=per_frame[best], fit=fit,
                       samples=picked)


def gaussian_mix_apply(stack, fit: dict, *, output: str = "denoised", tile: int | None = None, out=None,
                       loss: bool = False, region=None):
    """Apply a fitted Gaussian mix (:func:`blind_gaussian_mix`'s ``fit``) to a (T, Y, X) stack.

    output: 'denoised' -- the J-invariant mix with the coefficients of all frames, plus
    ``fit['own_pixel']['weight']`` x (y - it) (the denoised movie); 'jinv' -- the
    J-invariant mix with the cross-fitted coefficients (frame t's from the frames of the
    other parity): exactly blind for the fit given; 'none' -- nothing (with ``loss``).
    A fit with a 'gate' (``pipeline.gate_mix``) takes its coefficients per pixel from it
    (:func:`mix_gate_predict`, the gate fitted on the other parity) instead of per class,
    for 'denoised' too (no gate is fitted on all frames).
    loss: also return the (T,) sums over pixels of (cross-fitted blind mix - y)^2 (of
    ``region``, a (y, x) pair of slices, when given).  Returns (output array or None, loss
    sums or None).  tile / out as for :func:`blind_gaussian_mix`.
    """
    y = _check_stack(stack, "gaussian_mix_apply")
    if output not in ("denoised", "jinv", "none"):
        raise InputError(None, f"gaussian_mix_apply: output must be 'denoised', 'jinv' or 'none', got {output!r}")
    res, sums = _mix_apply(y, [fit], output, tile, out, region, loss=loss)
    return res, (sums[0] if loss else None)


#: The gate's hidden layers use this slope for negative inputs (LeakyReLU, as WCVD's).
GATE_SLOPE = 0.1


def mix_gate_inputs(gate: dict, features: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The gate's inputs for n pixels: the dictionary outputs (n, K) scaled by the
    movie's mean and SD ('scale') and the same with the standardised log structure map
    appended, (n, K + 1); both float32."""
    mu, sd = gate["scale"]
    f = (np.asarray(features, dtype=np.float32) - np.float32(mu)) / np.float32(sd)
    m, s, eps = gate["structure"]
    z = (np.log(np.asarray(structure, dtype=np.float64) + eps) - m) / s
    return f, np.concatenate([f, z.astype(np.float32)[:, None]], 1)


def mix_gate_predict(gate: dict, parity: int, features: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The gated mix at n pixels (data units, float64): sum_k (a_k + g_k(x)) f_k + c, with
    f the dictionary's blind outputs (n, K) (scaled, :func:`mix_gate_inputs`), (a, c) a
    linear mix and g a small MLP (two hidden layers, LeakyReLU) of the scaled outputs
    and the structure map (n,) -- per-pixel coefficients instead of per-class ones.
    ``gate['weights'][parity]`` are the weights fitted on the frames of the other parity
    (``train.fit_mix_gate``; the torch module ``models.MixGate`` computes the same)."""
    w = gate["weights"][int(parity)]
    f, x = mix_gate_inputs(gate, features, structure)
    h = x
    for name in ("1", "2"):
        h = h @ np.asarray(w["w" + name], np.float32).T + np.asarray(w["b" + name], np.float32)
        h = np.where(h > 0, h, np.float32(GATE_SLOPE) * h)
    g = h @ np.asarray(w["w3"], np.float32).T + np.asarray(w["b3"], np.float32)
    out = f @ np.asarray(w["lin_w"], np.float32) + np.float32(w["lin_b"]) + np.sum(g * f, 1)
    mu, sd = gate["scale"]
    return out.astype(np.float64) * sd + mu


def _mix_apply(y, fits: list, output: str, tile, out, region, loss: bool = True):
    """The pass over tiles behind :func:`gaussian_mix_apply`: the output of ``fits[0]``
    (``output`` 'denoised' | 'jinv' | 'none') and, with ``loss``, every fit's (T,) sums of
    squared cross-fitted blind residuals (array (n_fits, T))."""
    n_t, n_y, n_x = (int(n) for n in y.shape)
    b = int(fits[0]["blind_radius"])
    union = list(dict.fromkeys((float(s_t), float(s_yx)) for f in fits for s_t, s_yx in f["sigmas"]))
    filts = [(s_t, s_yx, _Separable(y.shape, s_t, s_yx, b)) for s_t, s_yx in union]
    # each fit's features among the union's (a fit of a shorter dictionary uses a subset)
    index = [np.array([union.index((float(s_t), float(s_yx))) for s_t, s_yx in f["sigmas"]]) for f in fits]
    index = [None if np.array_equal(ix, np.arange(len(filts))) else ix for ix in index]  # None: all, in order
    halo = _mix_halo(sorted({s for f in fits for s in (f.get("sigmas_yx_grid") or [v for _, v in f["sigmas"]])}))
    edges = [np.asarray(f["edges"], dtype=np.float64) for f in fits]
    cross = [np.asarray(f["beta_cross"], dtype=np.float64) for f in fits]
    beta = np.asarray(fits[0]["beta"], dtype=np.float64)
    w_own = float(fits[0]["own_pixel"]["weight"]) if output == "denoised" else 0.0
    s_sigma = float(fits[0].get("structure_sigma_t", MIX_STRUCT_SIGMA_T))  # fits of one call share it
    if output != "none" and out is None:
        out = np.empty(y.shape, dtype=np.float32)
    sums = np.zeros((len(fits), n_t)) if loss else None
    keep = np.ones((n_y, n_x), dtype=bool)
    if region is not None:
        keep[:] = False
        keep[tuple(region)] = True
    sub_edge = _mix_tiles(y.shape, halo, len(filts))
    outer_edge = int(tile or sub_edge)
    for outer in _tiles((n_y, n_x), outer_edge):
        oy, ox = outer
        block = None if output == "none" else np.empty((n_t, oy.stop - oy.start, ox.stop - ox.start), np.float32)
        for inner in _tiles((oy.stop - oy.start, ox.stop - ox.start), min(sub_edge, outer_edge)):
            reg = (slice(oy.start + inner[0].start, oy.start + inner[0].stop),
                   slice(ox.start + inner[1].start, ox.start + inner[1].stop))
            box, core = _read_tile(y, reg, halo)
            struct = _mix_structure(box, core, s_sigma)
            fb_all = _mix_features(box, core, reg, filts, b)
            target = box[(slice(None),) + tuple(core)].astype(np.float64)
            k_in = keep[reg]
            for i in range(len(fits)):
                cls = np.digitize(struct, edges[i])
                fb = fb_all if index[i] is None else fb_all[index[i]]
                gate = fits[i].get("gate")
                for t in range(n_t):
                    if (loss or output == "jinv" or gate) and (i == 0 or loss):
                        if gate:  # the gate's coefficients, from the model fitted on the other parity
                            fj = mix_gate_predict(gate, t % 2, fb[:, t].reshape(len(fb), -1).T,
                                                  struct[t].ravel()).reshape(struct.shape[1:])
                        else:
                            coef = cross[i][t % 2][cls[t]]  # (h, w, K + 1)
                            fj = (np.einsum("khw,hwk->hw", fb[:, t].astype(np.float64), coef[..., :-1])
                                  + coef[..., -1])
                        if loss:
                            sums[i, t] += float(np.sum(((fj - target[t]) ** 2)[k_in]))
                        if output == "jinv" and i == 0:
                            block[t][inner] = fj
                        if output == "denoised" and i == 0 and gate:
                            block[t][inner] = fj + w_own * (target[t] - fj)
                    if output == "denoised" and i == 0 and not gate:
                        coef = beta[cls[t]]
                        f = np.einsum("khw,hwk->hw", fb[:, t].astype(np.float64), coef[..., :-1]) + coef[..., -1]
                        block[t][inner] = f + w_own * (target[t] - f)
            del fb, fb_all, box
        if block is not None:
            out[(slice(None),) + outer] = block
    return (out if output != "none" else None), sums
