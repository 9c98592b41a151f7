"""Overlapping tiles for large frames (cryo-ET tilt series, 4096 x 4096 px and up).

SHINE (seed 004, methods) cuts 4096 x 4096 tilt images into 1024 x 1024 px patches that
overlap by 256 px, trains on half of them and stitches the denoised patches back.  This
module provides the pieces:

- :func:`tile_grid` -- the patch grid (slices) over one frame;
- :func:`blend_window` -- a raised-cosine weight per tile whose overlapping tapers sum
  to one (a partition of unity), with an optional zero *guard band* at the tile edges;
- :func:`blend_tiles` -- per-tile prediction by any callable, stitched with the blending
  window (``emdenoise.infer.denoise_tiled`` passes a network);
- :func:`window_index` -- the temporal input windows of each output frame, mirrored about
  the centre frame at the ends of the movie (a window never holds its centre frame twice);
- :func:`training_patches` -- the patch set for training, read one patch at a time;
- :func:`read_with_halo` -- reads a (t, y, x) box plus halos from any sliceable stack
  (NumPy, memmap, Zarr), wrapping in space; shared with the chunked Zarr inference
  ``emdenoise.chunked.infer_zarr``.

This module is pure geometry on NumPy arrays: it imports no torch and no other stage.

Halo / padding choice (``blend_tiles(padding=...)``):

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
edge windows (first tilt predicted from tilts (1, 0, 1)) are mirrored about the
centre frame as in ``emdenoise.infer.denoise``.

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

#: Most bytes of stitched output frames :func:`blend_tiles` holds at once (whole frames).
BLOCK_BYTES = 256 * 2**20

__all__ = ["tile_grid", "blend_window", "blend_tiles", "training_patches", "read_with_halo",
           "window_index", "min_frames_for_windows", "check_frame_count", "check_frame_size", "wrap_index"]


# ------------------------------------------------------------------------- indices
def window_index(start: int, stop: int, n: int, halo: int) -> np.ndarray:
    """Temporal input windows of output frames ``start..stop-1`` of an ``n``-frame movie.

    Returns an int64 array (stop - start, 2*halo + 1): row i lists the input frames of
    output frame t = start + i, centre at column ``halo``.  Frame t + k outside
    ``[0, n)`` is replaced by its mirror image *about the centre frame*, t - k (the
    authors of SHINE mirror about the centre too); where that is outside the movie as
    well (a reach longer than half the movie), by frame (t + k) mod n, i.e. the movie
    continued periodically.  A window therefore never holds its centre frame twice:
    t - k = t and (t + k) mod n = t need k = 0 or |k| >= n.  Mirroring about frame 0
    instead (NumPy 'reflect', the old scheme) gives output frame 1 the window (1, 0, 1,
    2, 3) for halo 2, so its own noisy pixel enters through a neighbour slot and the
    blind spot leaks.  Why the periodic fallback: a context model whose reach is the
    whole movie (``WCVDParams.context`` up to n - 1) then averages every other frame,
    each the same number of times, for *every* output frame (the leave-one-out mean of
    the movie); capped at (n - 1) // 2 by mirroring alone, the edge frames saw only
    half the movie (least-squares predictors from context means on 24-frame synthetic
    movies: +0.8 dB counting, +1.4 dB linear mode, equal to averaging only the frames
    that exist).
    Raises InputError (a ValueError) when ``halo >= n`` (a window would wrap onto its
    own centre frame) or t is outside the movie.
    """
    t = np.arange(start, stop)[:, None]
    k = np.arange(-halo, halo + 1)[None, :]
    if halo >= n or (t < 0).any() or (t >= n).any():
        raise InputError(None, f"a {n}-frame movie is too short for temporal windows of {2 * halo + 1} "
                               f"frames (at least {halo + 1} frames)")
    idx = t + k
    out = (idx < 0) | (idx >= n)
    idx = np.where(out, t - k, idx)
    out = (idx < 0) | (idx >= n)
    idx = np.where(out, (t + k) % n, idx)
    return idx.astype(np.int64)


def window_frames(stack, t: int, halo: int, rows=slice(None), cols=slice(None)):
    """The input window of output frame ``t``: (2 halo + 1, Y', X') frames t - halo ..
    t + halo of a (T, Y, X) stack (NumPy, torch, Zarr, anything sliceable), frames outside
    the movie replaced by their mirror image about ``t`` (:func:`window_index`, what
    inference feeds the network), cut to ``rows`` x ``cols``.  One contiguous read; a
    window inside the movie is that very slice (a view of a NumPy / torch stack)."""
    idx = window_index(t, t + 1, int(stack.shape[0]), halo)[0]
    lo, hi = int(idx.min()), int(idx.max()) + 1
    block = stack[lo:hi, rows, cols]
    if hi - lo == len(idx):  # no mirrored frame: the slice itself
        return block
    return block[idx - lo]


def min_frames_for_windows(halo: int) -> int:
    """Smallest movie length for which every :func:`window_index` window exists: halo + 1."""
    return int(halo) + 1


def check_frame_count(n_frames: int, halo_t: int, source=None) -> None:
    """InputError(source, ...) unless every output frame of an ``n_frames`` movie has a
    temporal window of 2 * halo_t + 1 frames (:func:`window_index`)."""
    need = min_frames_for_windows(halo_t)
    if n_frames < need:
        raise InputError(source, f"a {n_frames}-frame movie is too short for temporal windows of "
                                 f"{2 * halo_t + 1} frames (at least {need} frames)")


def check_frame_size(shape_yx, halo_s: int, source=None) -> None:
    """Refuse frames too small for periodic wrapping of a ``halo_s`` px spatial halo.

    With Y or X <= 2*halo_s the wrapped halo folds a pixel back into its own receptive
    field (and, for a blind-spot model, into its own blind spot): the output would see
    the noise it should predict.  Raises ``InputError(source, ...)``.
    """
    y, x = (int(v) for v in shape_yx)
    if min(y, x) <= 2 * halo_s:
        raise InputError(source, f"frames of {y}x{x} px are too small for this model: its receptive field "
                                 f"is {2 * halo_s + 1} px wide and periodic padding would fold a pixel back "
                                 f"into its own blind spot; frames must be larger than {2 * halo_s} px "
                                 f"(use a model with a smaller receptive field, e.g. fewer SHINE blocks)")


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
    t_idx / y_idx / x_idx: integer index arrays (from :func:`window_index` /
    :func:`wrap_index`).  Time is read as one contiguous frame range (mirrored windows stay
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
def blend_tiles(predict, stack, *, halo_t: int, halo_s: int, tile: int = 1024, overlap: int = 256,
                padding: str = "valid", batch_frames: int = 8, out=None) -> np.ndarray:
    """Apply ``predict`` tile by tile and stitch: (T, Y, X) -> (T, Y, X) float32.

    Pure geometry: ``predict(frames, windows, spatial_padding)`` does the work, with
    frames (n_in, ty', tx') float32 (a tile plus its halo), windows (n_out, 2*halo_t+1)
    int indices into ``frames`` (from :func:`window_index`: mirrored about the centre
    frame at the movie's ends) and it returns (n_out, ty, tx) -- the tile without its
    halo for 'valid', the whole box for 'circular'.  ``emdenoise.infer.denoise_tiled``
    passes a network's prediction.
    stack: (T, Y, X) array in data units; NumPy, memmap or Zarr (only one tile and
        ``batch_frames`` output frames' windows are read at a time).
    tile / overlap: px, see :func:`tile_grid`.  padding: 'valid' (real-pixel halo of
        ``halo_s`` px, exact) or 'circular' (tile-local wrap, hidden by a guard band);
        see the module docstring.
    out: None (a new float32 array) or any writable (T, Y, X) array (a Zarr array, an
        ``io.ZarrStackWriter``), filled block of frames by block and returned.  Blocks
        are ``batch_frames`` frames, fewer when that many whole frames would exceed
        ``BLOCK_BYTES``: memory besides ``out`` is one such block plus one tile's
        windows, whatever T.  Every pixel sums its tiles in grid order in either case,
        so the values do not depend on the block size.
    Raises InputError for frames or tiles too small for the halo (a wrapped halo would
    fold a pixel into its own blind spot) and for movies too short for the windows.
    """
    if padding not in ("valid", "circular"):
        raise ValueError(f"padding must be 'valid' or 'circular', got {padding!r}")
    shape = tuple(int(n) for n in stack.shape)
    if len(shape) != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {shape}")
    t, y, x = shape
    ht, hs = int(halo_t), int(halo_s)
    check_frame_size((y, x), hs)
    windows = window_index(0, t, t, ht)
    guard = hs if padding == "circular" else 0
    grid = tile_grid((y, x), tile, overlap)
    if padding == "circular":
        check_frame_size((grid[0][0].stop - grid[0][0].start, grid[0][1].stop - grid[0][1].start), hs)
        if len(grid) > 1 and overlap < 2 * guard + 1:
            raise ValueError(f"padding='circular' needs overlap >= {2 * guard + 1} px (2*halo_s + 1), got {overlap}")
    out = np.empty(shape, dtype=np.float32) if out is None else out
    halo = hs if padding == "valid" else 0
    tiles, wsum = [], np.zeros((y, x), dtype=np.float32)
    for sy, sx in grid:
        w = blend_window((sy.stop - sy.start, sx.stop - sx.start), overlap, guard=guard,
                         sides=_tile_sides(sy, sx, (y, x)))
        tiles.append((sy, sx, w, wrap_index(sy.start - halo, sy.stop + halo, y),
                      wrap_index(sx.start - halo, sx.stop + halo, x)))
        wsum[sy, sx] += w
    # blocks of whole output frames: the stitched frames leave as soon as they are complete
    step = max(1, min(int(batch_frames), BLOCK_BYTES // (4 * y * x)))
    for s in range(0, t, step):
        e = min(t, s + step)
        win = windows[s:e]
        lo, hi = int(win.min()), int(win.max()) + 1
        acc = np.zeros((e - s, y, x), dtype=np.float32)
        for sy, sx, w, yi, xi in tiles:
            block = read_with_halo(stack, np.arange(lo, hi), yi, xi)
            acc[:, sy, sx] += w * predict(block, win - lo, padding)
        acc /= wsum  # every pixel has weight > 0: frame-border edges are never tapered
        out[s:e] = acc
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
