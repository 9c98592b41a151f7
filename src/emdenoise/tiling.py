"""Overlapping tiles for large frames (cryo-ET tilt series, 4096 x 4096 px and up).

SHINE (seed 004, methods) cuts 4096 x 4096 tilt images into 1024 x 1024 px patches that
overlap by 256 px, trains on half of them and stitches the denoised patches back.  This
module provides the pieces:

- :func:`tile_grid` -- the patch grid (slices) over one frame;
- :func:`blend_window` -- a raised-cosine weight per tile whose overlapping tapers sum
  to one (a partition of unity), with an optional zero *guard band* at the tile edges;
- :func:`denoise_tiled` -- per-tile inference, stitched with the blending window;
- :func:`training_patches` -- the patch set for training, read one patch at a time;
- :func:`read_with_halo` -- reads a (t, y, x) box plus halos from any sliceable stack
  (NumPy, memmap, Zarr), reflecting in time and wrapping in space; shared with the
  chunked Zarr inference ``emdenoise.infer.infer_zarr``.

Halo / padding choice (``denoise_tiled(padding=...)``):

'valid' (default)
    Each tile is read with a halo of ``model.params.halo_s`` *real* pixels on every side
    (wrapped periodically only at the frame border, exactly like whole-frame inference
    with circular padding) and the network runs with 'valid' spatial padding.  Every
    tile pixel is then bit-for-bit the whole-frame result, so tiling changes nothing and
    the blending is a weighted average of identical values -- no seam can appear.
'circular'
    Tile-local circular padding, as a patch-based network would see an isolated patch:
    the outer ``halo_s`` px of every tile are predicted from pixels of the *opposite*
    tile edge and are wrong.  The blending window then gets a guard band of ``halo_s``
    px of weight 0 at every tile edge that lies inside the frame, followed by a raised
    cosine over the rest of the overlap, so the wrapped pixels never reach the output.
    Needs ``overlap >= 2 * halo_s + 1``.  With the guard the result equals whole-frame
    inference except within ``halo_s`` px of the *frame* border, where the edge tile
    wraps onto its own opposite edge instead of the frame's (both are arbitrary
    boundary choices; 'valid' reproduces the whole-frame one exactly).

Temporal neighbours of a tilt series: with no dose fractions the "frames" are the tilts
themselves, so the network predicts a tilt from the tilts a few degrees on either side.
Those are *different projections* of the specimen -- features move by up to
``z * (sin a1 - sin a0)`` px (z the height above the tilt axis) and thicken with
1/cos(a) -- so the temporal neighbours share much less signal than consecutive movie
frames.  The network then leans on the spatial neighbours (more smoothing, less
detail gained from time); the noise is still independent between tilts, so the
blind spot remains valid and nothing is biased, only less signal is recovered.  The
reflected edge windows (first tilt predicted from tilts (1, 0, 1)) are as in
``emdenoise.infer.denoise``.

Relation to training: ``emdenoise.train.train_model`` already trains on random crops
(``TrainParams.crop``) with real-pixel halos, so it never needs whole frames inside the
network; what it does need is the (T, Y, X) array in memory.  For a 60 x 4096 x 4096
series (4 GB) use :func:`training_patches` to pick the SHINE patch set (a ``fraction``
of the 1024-px grid, seeded) and read only those patches, e.g. by training on one
patch stack at a time or on a random subset of patches; crops drawn inside a patch are
the same crops ``train_model`` would draw from the whole frame.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import InputError

__all__ = ["tile_grid", "blend_window", "denoise_tiled", "training_patches", "read_with_halo",
           "reflect_index", "wrap_index"]


# ------------------------------------------------------------------------- indices
def reflect_index(start: int, stop: int, n: int) -> np.ndarray:
    """Frame indices ``start..stop-1`` reflected into ``[0, n)`` *without repeating the
    edge frame* (frame -k := k, frame n-1+k := n-1-k), as ``infer.denoise`` does.

    This is NumPy's ``mode='reflect'``; Dask's ``boundary='reflect'`` is NumPy's
    ``'symmetric'`` (it repeats the edge: -1 := 0) and would put the predicted frame into
    its own temporal window, so it is *not* used for time.
    """
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def wrap_index(start: int, stop: int, n: int) -> np.ndarray:
    """Pixel indices ``start..stop-1`` wrapped periodically into ``[0, n)``
    (Dask ``boundary='periodic'``, NumPy ``mode='wrap'``, torch circular padding)."""
    return np.arange(start, stop) % n


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split an index array into runs of consecutive indices: (pos, first, length)."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    bounds = np.concatenate([[0], cuts, [len(idx)]])
    return [(int(a), int(idx[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


def read_with_halo(stack, t_idx: np.ndarray, y_idx: np.ndarray, x_idx: np.ndarray) -> np.ndarray:
    """``stack[t_idx][:, y_idx][:, :, x_idx]`` as float32, reading only what is needed.

    stack: any (T, Y, X) array supporting basic slicing (NumPy, memmap, Zarr, LazyStack).
    t_idx / y_idx / x_idx: integer index arrays (from :func:`reflect_index` /
    :func:`wrap_index`).  Time is read as one contiguous frame range (reflection stays
    next to the edge); each spatial axis is split into its contiguous runs (at most 3
    with wrapping), so a Zarr store decodes only the chunks the box touches.
    """
    t0, t1 = int(t_idx.min()), int(t_idx.max()) + 1
    out = np.empty((len(t_idx), len(y_idx), len(x_idx)), dtype=np.float32)
    tl = t_idx - t0
    for py, fy, ny in _runs(y_idx):
        for px, fx, nx in _runs(x_idx):
            box = np.asarray(stack[t0:t1, fy:fy + ny, fx:fx + nx], dtype=np.float32)
            out[:, py:py + ny, px:px + nx] = box[tl]
    return out


# ---------------------------------------------------------------------------- tiles
def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: step tile - overlap, the last tile flush with the end."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step))
    starts.append(n - tile)  # last tile flush with the edge: its overlap may be larger
    return starts


def tile_grid(shape_yx: tuple[int, int], tile: int = 1024, overlap: int = 256) -> list[tuple[slice, slice]]:
    """Overlapping square tiles covering a (Y, X) frame, as (slice_y, slice_x) pairs.

    Tiles are ``tile`` px (clipped to the frame when it is smaller), start every
    ``tile - overlap`` px, and the last tile of a row / column is shifted to end at the
    frame edge, so every tile has full size and neighbours overlap by >= ``overlap`` px.
    Row-major order.  Raises ValueError unless 0 <= overlap < tile.
    """
    tile, overlap = int(tile), int(overlap)
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    y, x = (int(n) for n in shape_yx)
    ty, tx = min(tile, y), min(tile, x)
    return [(slice(a, a + ty), slice(b, b + tx))
            for a in _starts(y, tile, overlap) for b in _starts(x, tile, overlap)]


def _ramp(n: int, overlap: int, guard: int, taper_lo: bool, taper_hi: bool) -> np.ndarray:
    """1D weights of length n: 0 over ``guard`` px, raised cosine up to 1 at ``overlap -
    guard`` px from a tapered edge.  Up-ramp r(i) and the mirrored down-ramp 1 - r(i) of
    the neighbour over the same ``overlap`` px sum to exactly 1 (sin^2 + cos^2)."""
    w = np.ones(n, dtype=np.float64)
    width = overlap - 2 * guard  # px of the cosine part
    i = np.arange(overlap, dtype=np.float64)
    up = np.clip((i - guard + 0.5) / max(width, 1), 0.0, 1.0) if width > 0 else (i >= guard).astype(float)
    up = np.sin(0.5 * np.pi * up) ** 2
    m = min(overlap, n)
    if taper_lo and overlap:
        w[:m] *= up[:m]
    if taper_hi and overlap:
        w[n - m:] *= up[:m][::-1]
    return w


def blend_window(tile_shape: tuple[int, int], overlap: int, *, guard: int = 0,
                 sides: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
    """Separable raised-cosine blending weights for one (ty, tx) tile, float32 in [0, 1].

    overlap: px over which two neighbouring tiles cross-fade.  Over an overlap of exactly
        ``overlap`` px the up-taper of one tile and the down-taper of the other sum to 1,
        so on a regular grid the windows form a partition of unity (``denoise_tiled``
        still divides by the summed weights, which makes the flush last tiles, whose
        overlap is larger, exact too).
    guard: px of weight 0 at each tapered edge (tile-local circular padding corrupts the
        outer ``halo_s`` px); the cosine then spans ``overlap - 2*guard`` px.
    sides: taper the (top, bottom, left, right) edge; edges on the frame border are not
        tapered (no neighbour would make up the weight there).
    """
    ty, tx = (int(n) for n in tile_shape)
    if overlap < 0 or guard < 0 or (guard and overlap < 2 * guard + 1):
        raise ValueError(f"need overlap >= 2*guard + 1, got overlap={overlap}, guard={guard}")
    wy = _ramp(ty, overlap, guard, sides[0], sides[1])
    wx = _ramp(tx, overlap, guard, sides[2], sides[3])
    return np.outer(wy, wx).astype(np.float32)


def _tile_sides(sy: slice, sx: slice, shape_yx) -> tuple[bool, bool, bool, bool]:
    y, x = shape_yx
    return (sy.start > 0, sy.stop < y, sx.start > 0, sx.stop < x)


# ------------------------------------------------------------------------ inference
def denoise_tiled(model, ckpt, stack, *, tile: int = 1024, overlap: int = 256, device: str = "auto",
                  padding: str = "valid", batch_frames: int = 8, num_workers: int | None = None) -> np.ndarray:
    """Denoise a (T, Y, X) stack tile by tile: (T, Y, X) data units -> (T, Y, X) float32.

    stack: (T, Y, X) array in data units; NumPy, memmap or Zarr (only one tile plus its
        halo of ``batch_frames + kt - 1`` frames is read at a time).
    ckpt: checkpoint dict with the normalisation (None: already normalised).
    tile / overlap: px, see :func:`tile_grid`.  padding: 'valid' (real-pixel halo, exact)
        or 'circular' (tile-local wrap, hidden by a guard band); see the module docstring.
    Temporal edges are reflected without repeating the edge frame, as in
    ``infer.denoise``; T >= halo_t + 1 frames are required.
    """
    from .infer import predict_block  # late: infer imports this module for infer_zarr

    if padding not in ("valid", "circular"):
        raise ValueError(f"padding must be 'valid' or 'circular', got {padding!r}")
    shape = tuple(int(n) for n in stack.shape)
    if len(shape) != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {shape}")
    t, y, x = shape
    p = model.params
    ht, hs = p.halo_t, p.halo_s
    if t < ht + 1:
        raise InputError(None, f"need at least {ht + 1} frames for reflected temporal windows, got {t}")
    guard = hs if padding == "circular" else 0
    grid = tile_grid((y, x), tile, overlap)
    if padding == "circular" and len(grid) > 1 and overlap < 2 * guard + 1:
        raise ValueError(f"padding='circular' needs overlap >= {2 * guard + 1} px (2*halo_s + 1), got {overlap}")
    out = np.zeros(shape, dtype=np.float32)
    wsum = np.zeros((y, x), dtype=np.float32)
    halo = hs if padding == "valid" else 0
    step = max(1, int(batch_frames))
    for sy, sx in grid:
        w = blend_window((sy.stop - sy.start, sx.stop - sx.start), overlap, guard=guard,
                         sides=_tile_sides(sy, sx, (y, x)))
        yi = wrap_index(sy.start - halo, sy.stop + halo, y)
        xi = wrap_index(sx.start - halo, sx.stop + halo, x)
        for s in range(0, t, step):
            e = min(t, s + step)
            block = read_with_halo(stack, reflect_index(s - ht, e + ht, t), yi, xi)
            pred = predict_block(model, block, normalisation=ckpt, device=device, spatial_padding=padding,
                                 batch_frames=step, num_workers=num_workers)
            out[s:e, sy, sx] += w * pred
        wsum[sy, sx] += w
    out /= wsum  # every pixel has weight > 0: frame-border edges are never tapered
    return out


# ------------------------------------------------------------------------- training
def training_patches(stack, tile: int = 1024, overlap: int = 256, *, fraction: float = 0.5,
                     seed: int = 0):
    """Yield ``(slice_y, slice_x, patch)`` for a seeded ``fraction`` of the tile grid.

    SHINE's cryo-ET recipe: 1024-px patches with 256 px overlap, 50 % used for training.
    patch: (T, ty, tx) float32 read from ``stack`` (NumPy / memmap / Zarr) only when the
    generator reaches it, so a 4096^2 series is never held whole.  At least one patch is
    always chosen.  Pass a patch to ``train.train_model`` (with ``TrainParams.crop``
    smaller than the patch) -- its random crops are then crops of the full frame.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    grid = tile_grid(tuple(stack.shape[-2:]), tile, overlap)
    n = max(1, int(math.ceil(fraction * len(grid))))
    pick = np.sort(np.random.default_rng(seed).choice(len(grid), size=n, replace=False))
    for i in pick:
        sy, sx = grid[int(i)]
        yield sy, sx, np.asarray(stack[:, sy, sx], dtype=np.float32)
