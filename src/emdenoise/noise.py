"""Spatial noise correlation and blind-spot size (SHINE, "Noise statistics estimation
and blind-spot size determination").

A blind-spot network predicts a pixel from its neighbours. If the noise of a pixel is
correlated with the noise of its neighbours, the network learns to copy that noise from
them, so every neighbour whose noise correlates noticeably with the centre must be
inside the blind spot. The correlation is measured as a heatmap: the Pearson
correlation (SHINE eq. 4) between an image and itself shifted by ``(dy, dx)``.

SHINE computes it on one raw frame. Real structure (lattice fringes, blurred edges)
is spatially correlated too and inflates that heatmap, so by default the heatmap of the
*difference of two adjacent aligned frames* is used: the specimen cancels, the noise
(independent between frames) does not, and the difference of two independent copies of
stationary noise has the same normalised correlation as one copy. Frames must be
aligned with whole-pixel shifts only - interpolation would itself correlate the noise.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = ["correlation_heatmap", "difference_heatmap", "choose_blindspot", "estimate_blindspot",
           "heatmap_table", "plot_heatmaps", "BLINDSPOT_RULE"]

BLINDSPOT_RULE = ("The blind spot is the smallest allowed odd square that covers every lag whose "
                  "|noise correlation| exceeds the threshold: size >= 2k+1 with k the largest "
                  "Chebyshev distance max(|dy|, |dx|) having |r| > threshold.")

#: At most this many adjacent pairs (spread over the movie) enter the median heatmap.
MAX_PAIRS = 5


def _check_frame(frame, max_lag: int, what: str) -> np.ndarray:
    frame = np.asarray(frame, dtype=np.float64)
    if frame.ndim != 2:
        raise InputError(None, f"{what}: expected a (Y, X) frame, got shape {frame.shape}")
    if max_lag < 0 or 2 * max_lag + 2 > min(frame.shape):
        raise InputError(None, f"{what}: max_lag={max_lag} too large for a frame of shape {frame.shape}")
    if not np.all(np.isfinite(frame)):
        raise InputError(None, f"{what}: frame contains NaN or inf (crop aligned frames first)")
    return frame


def correlation_heatmap(frame, max_lag: int = 4) -> np.ndarray:
    """Spatial autocorrelation heatmap of one image (SHINE eq. 4).

    Parameters
    ----------
    frame : (Y, X) array
    max_lag : int
        Largest lag in pixels along each axis.

    Returns
    -------
    heatmap : (2*max_lag+1, 2*max_lag+1) float64
        ``heatmap[max_lag + dy, max_lag + dx]`` is the Pearson correlation between
        ``frame[y, x]`` and ``frame[y + dy, x + dx]`` over all pixel pairs inside the
        frame (no wrap-around; means and norms taken over that overlap). The centre
        is 1 and the map is point-symmetric, ``r(-dy, -dx) == r(dy, dx)``.
    """
    frame = _check_frame(frame, max_lag, "correlation_heatmap")
    ny, nx = frame.shape
    frame = (frame - frame.mean()) / (frame.std() or 1.0)  # standardised as in SHINE
    m = max_lag
    # Every lag at once: the sums of products over each overlap are one zero-padded FFT
    # autocorrelation (no wrap-around), the sums and sums of squares of its two parts
    # come from integral images -- the Pearson correlation per overlap, as a loop over
    # lags would compute it, in ~one FFT instead of (2 m + 1)^2 passes over the frame.
    from scipy import fft

    shape = (fft.next_fast_len(ny + m, real=True), fft.next_fast_len(nx + m, real=True))
    spec = fft.rfft2(frame, shape)
    auto = fft.irfft2(spec * spec.conj(), shape)           # auto[dy, dx] = sum f(y, x) f(y + dy, x + dx)
    s1 = np.zeros((ny + 1, nx + 1))
    s2 = np.zeros((ny + 1, nx + 1))
    s1[1:, 1:] = frame.cumsum(0).cumsum(1)
    s2[1:, 1:] = (frame * frame).cumsum(0).cumsum(1)

    def box(s, y0, y1, x0, x1):
        return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]

    size = 2 * m + 1
    heat = np.empty((size, size))
    for dy in range(0, m + 1):
        for dx in range(-m, m + 1):
            a = (0, ny - dy, max(0, -dx), nx - max(0, dx))  # frame[y, x] ...
            b = (dy, ny, max(0, dx), nx - max(0, -dx))      # ... and frame[y + dy, x + dx]
            n = (ny - dy) * (nx - abs(dx))
            sa, sb = box(s1, *a), box(s1, *b)
            va, vb = box(s2, *a) - sa * sa / n, box(s2, *b) - sb * sb / n
            cov = auto[dy, dx % shape[1]] - sa * sb / n
            flat = min(va, vb) <= 1e-9 * n  # a constant part (rounding aside): no correlation, as 0/0
            r = 0.0 if flat else float(cov / np.sqrt(va * vb))
            # The same pixel pairs give lag (-dy, -dx): fill both halves from one pass.
            heat[m + dy, m + dx] = r
            heat[m - dy, m - dx] = r
    return heat


def difference_heatmap(frame_a, frame_b, max_lag: int = 4) -> np.ndarray:
    """Correlation heatmap of ``frame_a - frame_b`` (two adjacent, aligned frames).

    The specimen cancels in the difference while independent noise does not, so this
    measures the noise correlation without the signal's. Shapes (Y, X) must match;
    returns the same (2*max_lag+1, 2*max_lag+1) float64 map as :func:`correlation_heatmap`.
    """
    a = np.asarray(frame_a, dtype=np.float64)
    b = np.asarray(frame_b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(None, f"difference_heatmap: frame shapes differ, {a.shape} vs {b.shape}")
    return correlation_heatmap(a - b, max_lag)


def _by_distance(heatmap: np.ndarray) -> dict[int, float]:
    """Largest |r| at each Chebyshev distance k >= 1 from the centre."""
    heat = np.asarray(heatmap, dtype=np.float64)
    lag = heat.shape[0] // 2
    dy, dx = np.meshgrid(np.arange(-lag, lag + 1), np.arange(-lag, lag + 1), indexing="ij")
    cheb = np.maximum(np.abs(dy), np.abs(dx))
    return {k: float(np.max(np.abs(heat[cheb == k]))) for k in range(1, lag + 1)}


def choose_blindspot(heatmap, threshold: float = 0.05, sizes=(1, 3, 5, 7, 9)) -> int:
    """Blind-spot size from a noise-correlation heatmap (rule: :data:`BLINDSPOT_RULE`).

    Parameters
    ----------
    heatmap : (2L+1, 2L+1) array
        From :func:`correlation_heatmap` or :func:`difference_heatmap`.
    threshold : float
        Correlations with ``|r| <= threshold`` are treated as negligible.
    sizes : sequence of int
        Allowed (odd) blind-spot edge lengths in pixels.

    Returns
    -------
    int
        Smallest allowed size ``>= 2k + 1``, with k the largest Chebyshev distance at
        which ``|r| > threshold`` (k = 0 for independent noise, giving 1). If even the
        largest allowed size is too small, that size is returned with a warning.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or heat.shape[0] != heat.shape[1] or heat.shape[0] % 2 == 0:
        raise InputError(None, f"choose_blindspot: heatmap must be square with odd size, got {heat.shape}")
    sizes = sorted(int(s) for s in sizes)
    if not sizes:
        raise InputError(None, "choose_blindspot: no allowed sizes given")
    over = [k for k, r in _by_distance(heat).items() if r > threshold]
    need = 2 * max(over, default=0) + 1
    for size in sizes:
        if size >= need:
            return size
    warnings.warn(f"noise is correlated up to {need // 2} px (needs a {need}x{need} blind spot); "
                  f"capped at the largest allowed size {sizes[-1]}", stacklevel=2)
    return sizes[-1]


def _pair_starts(n_frames: int, frame_index: int | None) -> list[int]:
    """First frames of the adjacent pairs used: the given one, or up to MAX_PAIRS spread
    evenly over the movie (so one odd pair - a jump, a flash - cannot decide alone)."""
    if frame_index is not None:
        if not 0 <= frame_index < n_frames - 1:
            raise InputError(None, f"estimate_blindspot: frame_index {frame_index} needs frame "
                                   f"{frame_index + 1}, stack has {n_frames} frames")
        return [int(frame_index)]
    n = min(MAX_PAIRS, n_frames - 1)
    return sorted({int(i) for i in np.rint(np.linspace(0, n_frames - 2, n))})


def estimate_blindspot(stack, *, max_lag: int = 4, threshold: float = 0.05, estimate: str = "auto",
                       frame_index: int | None = None, sizes=(1, 3, 5, 7, 9)) -> dict:
    """Measure the noise correlation of a movie and choose the blind-spot size.

    Parameters
    ----------
    stack : (T, Y, X) array
        Aligned frames, shifted by whole pixels only (never interpolated), cropped.
        NumPy, or a Zarr / lazy array: only the frames used are read (at most
        2 x ``MAX_PAIRS``), one or two at a time.
    max_lag : int
        Heatmap half-width in pixels.
    threshold : float
        ``|r|`` above which a lag must be inside the blind spot.
    estimate : {'auto', 'difference', 'frame'}
        'difference': heatmap of the difference of adjacent frames (signal cancels);
        'frame': heatmap of single raw frames (SHINE; includes signal correlation);
        'auto': 'difference' when T >= 2, else 'frame'.
    frame_index : int or None
        Use only frame ``i`` (and ``i + 1`` for the difference). None: the element-wise
        median of the heatmaps of up to 5 adjacent pairs ``(i, i + 1)`` spread evenly
        over the movie (single-frame heatmaps: of each pair's first frame).

    Returns
    -------
    dict
        'blindspot' int; 'estimate_used' 'difference' or 'frame'; 'threshold';
        'rule' (one sentence); 'heatmap_frame' and 'heatmap_difference' as lists of
        lists (row = dy from -max_lag, column = dx; the latter None for T == 1);
        'frames' sorted frame indices used; 'pairs' list of [i, i + 1];
        'max_abs_offcentre_r' {Chebyshev distance (str): max |r|} of the heatmap used;
        'capped' True if the noise needs a larger blind spot than allowed;
        'at_edge' True if |r| > threshold even at distance max_lag (the heatmap may be
        too small to see the full extent).

    Memory: independent of T -- the heatmaps come from a fixed, deterministic subset of
    frames (up to ``MAX_PAIRS`` adjacent pairs spread evenly over the movie), each read
    when needed; the working set is about six float64 copies of one frame (about 0.2 GB
    for 2048 x 2048 frames).
    """
    if not (hasattr(stack, "shape") and hasattr(stack, "__getitem__")):
        stack = np.asarray(stack)
    shape = tuple(int(v) for v in stack.shape)  # a Zarr / lazy stack stays lazy: frames read one by one
    if len(shape) != 3 or shape[0] < 1:
        raise InputError(None, f"estimate_blindspot: expected a (T, Y, X) stack, got shape {shape}")
    n = shape[0]
    if estimate not in ("auto", "difference", "frame"):
        raise InputError(None, "estimate_blindspot: estimate must be 'auto', 'difference' or "
                               f"'frame', got {estimate!r}")
    if estimate == "difference" and n < 2:
        raise InputError(None, "estimate_blindspot: the 'difference' estimate needs at least 2 frames")
    used = "frame" if estimate == "frame" or (estimate == "auto" and n < 2) else "difference"

    if n >= 2:
        starts = _pair_starts(n, frame_index)
        pairs = [[i, i + 1] for i in starts]
        heat_diff = np.median([difference_heatmap(stack[i], stack[i + 1], max_lag) for i in starts], axis=0)
    else:
        if frame_index not in (None, 0):
            raise InputError(None, f"estimate_blindspot: frame_index {frame_index} out of range for 1 frame")
        starts, pairs, heat_diff = [0], [], None
    heat_frame = np.median([correlation_heatmap(stack[i], max_lag) for i in starts], axis=0)

    heat = heat_diff if used == "difference" else heat_frame
    by_k = _by_distance(heat)
    need = 2 * max([k for k, r in by_k.items() if r > threshold], default=0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported through 'capped' instead
        size = choose_blindspot(heat, threshold, sizes)
    frames = sorted({i for p in pairs for i in p}) if pairs else starts
    return {
        "blindspot": int(size),
        "estimate_used": used,
        "threshold": float(threshold),
        "rule": BLINDSPOT_RULE,
        "heatmap_frame": heat_frame.tolist(),
        "heatmap_difference": None if heat_diff is None else heat_diff.tolist(),
        "frames": [int(i) for i in frames],
        "pairs": pairs,
        "max_abs_offcentre_r": {str(k): r for k, r in by_k.items()},
        "capped": bool(need > max(sizes)),
        "at_edge": bool(by_k.get(max_lag, 0.0) > threshold),
    }


def heatmap_table(heatmap) -> pd.DataFrame:
    """Long table of a heatmap: columns dy, dx (px) and r, one row per lag
    (for noise_correlation.csv). Accepts an array or the lists in estimate_blindspot's result."""
    heat = np.asarray(heatmap, dtype=np.float64)
    lag = heat.shape[0] // 2
    dy, dx = np.meshgrid(np.arange(-lag, lag + 1), np.arange(-lag, lag + 1), indexing="ij")
    return pd.DataFrame({"dy": dy.ravel(), "dx": dx.ravel(), "r": heat.ravel()})


def plot_heatmaps(result: dict, png_path: str | os.PathLike) -> None:
    """Plot the heatmaps of an :func:`estimate_blindspot` result, values annotated and
    the chosen blind spot outlined, to ``png_path`` (the caller renames atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = [("frame", "single frame", result["heatmap_frame"])]
    if result.get("heatmap_difference") is not None:
        panels.append(("difference", "difference of adjacent frames", result["heatmap_difference"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    size = result["blindspot"]
    for ax, (kind, title, heat) in zip(axes[0], panels):
        heat = np.asarray(heat, dtype=np.float64)
        lag = heat.shape[0] // 2
        shown = heat.copy()
        shown[lag, lag] = np.nan  # the centre (r = 1) would swamp the colour scale
        ext = (-lag - 0.5, lag + 0.5, lag + 0.5, -lag - 0.5)
        im = ax.imshow(shown, cmap="viridis", extent=ext,
                       vmin=min(0.0, np.nanmin(shown)), vmax=max(0.3, np.nanmax(shown)))
        for (iy, ix), r in np.ndenumerate(heat):
            ax.text(ix - lag, iy - lag, f"{r:.2f}", ha="center", va="center", fontsize=6, color="w")
        ax.add_patch(Rectangle((-size / 2, -size / 2), size, size, fill=False, ec="r", lw=1.5))
        used = " (used)" if kind == result["estimate_used"] else ""
        ax.set_title(f"{title}{used}", fontsize=9)
        ax.set_xlabel("dx (px)")
        ax.set_ylabel("dy (px)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"blind spot {size}x{size} (|r| > {result['threshold']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, format="png")
    plt.close(fig)
