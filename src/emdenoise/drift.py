"""Drift measurement (sub-pixel phase correlation) and drift correction.

Sign convention, used everywhere in emdenoise (and by :mod:`emdenoise.synthetic`):
``shifts[t] = (dy, dx)`` in pixels is the displacement of the *specimen* in frame ``t``
relative to frame 0, i.e. ``frame[t](y, x) ~= frame[0](y - dy, x - dx)``: a feature at
``(y, x)`` in frame 0 is at ``(y + dy, x + dx)`` in frame ``t``. ``shifts[0] == (0, 0)``.
:func:`apply_shifts` *undoes* such shifts, so ``apply_shifts(stack,
measure_drift(prefiltered))`` aligns every frame onto frame 0's grid.

Strategy of :func:`measure_drift` (``reference='auto'``), chosen by measurement:
registering each frame to frame 0 alone is limited by frame 0's noise and breaks when
the specimen evolves or the dose is very low - it locks onto a neighbouring lattice
peak (jumps up to 20 px on synthetic movies at 0.5 count/px; 42 of 100 frames of the
real Au liquid-cell movie off by up to 280 px). Cumulative pairwise registration
accumulates a random walk of errors. So the frame-0 estimate only initialises an
iteration in which every frame is re-registered to the mean of all *other* frames
aligned with the current estimates (leave-one-out, so a frame's own noise cannot pull
the peak towards its previous estimate), until no estimate changes by more than one
sub-pixel step (at most 5 rounds). Synthetic counting movies, 20 frames, drift up to
10 px, gaussian2d(sigma=1.5) prefilter, RMS error over 8 seeds (min / median / max):

    256 px, 1 count/px:    auto 0.10/0.14/0.17   first 0.19/0.24/0.30   pairwise 0.22/0.51/0.90
    192 px, 1 count/px:    auto 0.18/0.23/0.30   first 0.27/0.36/2.0    pairwise 0.40/0.90/1.7
    256 px, 0.5 count/px:  auto 0.19/0.28/0.37   first 0.41/0.52/4.6    pairwise 0.93/2.0/21

'auto' sits near the Cramer-Rao bound for an error measured relative to one noisy
frame 0 (about 0.15 px at 256 px and 0.2 px at 192 px, 1 count/px).
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError

__all__ = ["measure_drift", "peak_significance", "apply_shifts", "plan_shifts", "aligned_shape", "aligned_blocks",
           "whole_pixel_shifts", "still_axes", "drift_table", "plot_drift", "valid_crop"]

#: A frame's shift is trusted when its cross-correlation peak against the mean of the
#: other aligned frames stands this many robust standard deviations (1.4826 MAD) above
#: the median of the correlation surface.  Measured on 24 x 128^2 synthetic movies
#: (gaussian2d 1.5 px prefilter): frames with real signal score 7.8-11 (counting 1 e-/px,
#: drifting; linear mode PSF 1.5 px); counting 0.1-0.25 e-/px and pure noise score 2.3-4.8,
#: where the "measured" shifts were random jumps of up to 125 px.
MIN_PEAK_Z = 6.0

_MODES = ("integer", "fourier", "spline")


def _check_stack(stack, what: str, min_frames: int = 1):
    """The (T, Y, X) stack itself when it is array-like (NumPy, a Zarr array,
    ``io.LazyStack``: then read frame by frame, never whole), else ``np.asarray`` of it."""
    if not (hasattr(stack, "shape") and hasattr(stack, "__getitem__")):
        stack = np.asarray(stack)
    shape = tuple(int(n) for n in stack.shape)
    if len(shape) != 3:
        raise InputError(None, f"{what}: expected a (T, Y, X) stack, got shape {shape}")
    if shape[0] < min_frames:
        raise InputError(None, f"{what}: needs at least {min_frames} frames, got {shape[0]}")
    return stack


@functools.lru_cache(maxsize=4)
def _window(shape: tuple[int, int]) -> np.ndarray:
    """The 2D Tukey (tapered cosine, alpha 0.25) window of a frame, float32, made once per
    frame shape (a 4096² window is 67 MB).  ``scipy.signal`` is imported here, on first
    use: it costs ~0.4 s at start-up of every command, for this alone."""
    from scipy.signal.windows import tukey

    window = np.outer(tukey(shape[0], 0.25), tukey(shape[1], 0.25)).astype(np.float32)
    window.flags.writeable = False  # shared by every call
    return window


def phase_cross_correlation(*args, **kwargs):
    """skimage.registration.phase_cross_correlation, imported on first use (start-up time
    of commands that never register frames, e.g. ``emdenoise denoise --no-drift``)."""
    from skimage.registration import phase_cross_correlation as pcc
    return pcc(*args, **kwargs)


def _prepare(frame: np.ndarray) -> np.ndarray:
    """Zero-mean, Tukey-windowed float32 copy: the frame edges would otherwise wrap around
    in the FFT and add a correlation peak at zero shift that biases towards no drift.

    float32 on purpose: scipy.fft keeps single precision (complex64 spectra), which halves
    the ~8 frame-sized spectra of one registration (2.2 GB peak at 4096² frames in
    float64).  Peak positions are unchanged: the float32 rounding (~1e-7 relative) is
    orders of magnitude below the shot noise that limits them (see tests/test_drift.py)."""
    out = np.array(frame, dtype=np.float32)  # always a copy: the caller's frame stays as it is
    out -= out.mean(dtype=np.float64)
    out *= _window(out.shape)
    return out


def _register(reference: np.ndarray, moving: np.ndarray, upsample: int, max_shift: float | None) -> np.ndarray:
    """Displacement (dy, dx) of the content of ``moving`` relative to ``reference``, px.

    phase_cross_correlation returns the shift that *registers* moving onto reference,
    i.e. minus the content displacement, hence the sign flip. With ``max_shift`` the
    integer peak is searched only within ``|dy|, |dx| <= max_shift`` and then refined on
    the overlapping crops (whose residual shift is below a pixel).
    """
    ref, mov = _prepare(reference), _prepare(moving)
    if max_shift is None:
        shift, _, _ = phase_cross_correlation(ref, mov, upsample_factor=upsample, normalization=None)
        return -np.asarray(shift, dtype=np.float64)
    guess = _masked_integer_peak(ref, mov, max_shift)
    dy, dx = int(guess[0]), int(guess[1])
    ny, nx = reference.shape
    # Overlap: reference[y, x] matches moving[y + dy, x + dx].
    ref_crop = reference[max(0, -dy):ny - max(0, dy), max(0, -dx):nx - max(0, dx)]
    mov_crop = moving[max(0, dy):ny - max(0, -dy), max(0, dx):nx - max(0, -dx)]
    if min(ref_crop.shape) < 8:
        return guess.astype(np.float64)
    fine, _, _ = phase_cross_correlation(_prepare(ref_crop), _prepare(mov_crop),
                                         upsample_factor=upsample, normalization=None)
    fine = -np.asarray(fine, dtype=np.float64)
    # A refinement beyond one pixel means it jumped to another peak: keep the integer one.
    return guess + fine if np.all(np.abs(fine) <= 1.0) else guess.astype(np.float64)


def _masked_integer_peak(ref: np.ndarray, mov: np.ndarray, max_shift: float) -> np.ndarray:
    """Integer content displacement maximising the cross-correlation within the bound."""
    cc = _cross_correlation(ref, mov)
    ny, nx = cc.shape
    lag_y = np.fft.fftfreq(ny, 1.0 / ny)
    lag_x = np.fft.fftfreq(nx, 1.0 / nx)
    allowed = (np.abs(lag_y)[:, None] <= max_shift) & (np.abs(lag_x)[None, :] <= max_shift)
    cc = np.where(allowed, cc, -np.inf)
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)
    return np.array([lag_y[iy], lag_x[ix]])


def _cross_correlation(ref: np.ndarray, mov: np.ndarray) -> np.ndarray:
    """Circular cross-correlation surface (Y, X) of two prepared float32 frames, float32
    (scipy.fft keeps single precision; numpy.fft would make complex128)."""
    from scipy import fft

    spectrum = fft.fft2(mov)
    spectrum *= np.conj(fft.fft2(ref))
    return fft.ifft2(spectrum, overwrite_x=True).real


def _shift_for_reference(frame: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Move a frame back by ``shift`` for building a reference only (measurement, never
    output data, so linear interpolation is fine; 'nearest' avoids dark wrap-in edges).
    float32 (Y, X): it is summed into a float64 running total."""
    return ndimage.shift(np.asarray(frame, dtype=np.float32), -shift, order=1, mode="nearest")


def _register_to_first(stack, upsample, max_shift):
    ref = np.asarray(stack[0])  # read once (a lazy stack would decode it T times)
    return np.array([_register(ref, np.asarray(stack[t]), upsample, max_shift) for t in range(stack.shape[0])])


def _register_pairwise(stack, upsample, max_shift):
    steps, prev = [np.zeros(2)], np.asarray(stack[0])
    for t in range(1, stack.shape[0]):  # each frame read once, two in memory
        cur = np.asarray(stack[t])
        steps.append(_register(prev, cur, upsample, max_shift))
        prev = cur
    return np.cumsum(steps, axis=0)


def _leave_one_out_references(stack, shifts):
    """Yield (t, frame t, mean of all frames but t aligned with ``shifts``) for every
    frame: a running sum (float64), each frame re-shifted when needed, so a few frames
    of memory whatever T; every frame is read twice per call (once for the sum)."""
    n = stack.shape[0]
    total = np.zeros(stack.shape[1:], dtype=np.float64)
    for t in range(n):
        total += _shift_for_reference(stack[t], shifts[t])
    ref = np.empty(stack.shape[1:], dtype=np.float32)  # reused: the caller is done with it
    for t in range(n):
        frame = np.asarray(stack[t])
        np.subtract(total, _shift_for_reference(frame, shifts[t]), out=ref, casting="same_kind")
        ref /= n - 1
        yield t, frame, ref


def _register_to_mean(stack, upsample, max_shift, max_iter=5):
    """Iterative leave-one-out mean reference, initialised by registration to frame 0.

    Stops when no shift moves by more than one sub-pixel step (1/upsample px): the
    estimates are quantised to that step, so smaller changes cannot happen. The mean is
    a running sum and each frame is re-shifted when needed instead of stored, so the
    extra memory is a few frames whatever T is.
    """
    shifts = _register_to_first(stack, upsample, max_shift)
    for _ in range(max_iter):
        new = np.array([_register(ref, frame, upsample, max_shift)
                        for t, frame, ref in _leave_one_out_references(stack, shifts)])
        new -= new[0]  # the mean reference sits near frame 0's grid; make frame 0 exact
        change = np.max(np.abs(new - shifts))
        shifts = new
        if change <= 1.0 / upsample + 1e-9:
            break
    return shifts


def measure_drift(stack, *, upsample: int = 20, reference: str = "auto", max_shift: float | None = None,
                  min_peak_z: float = MIN_PEAK_Z, return_info: bool = False):
    """Measure the drift of each frame relative to frame 0 by phase correlation.

    Measure on a pre-filtered stack (gaussian2d with sigma 1-2 px, or a WCID model):
    on raw low-dose frames the correlation peak drowns in noise.

    Parameters
    ----------
    stack : (T, Y, X) array
        Pre-filtered frames, T >= 2: NumPy, or a Zarr / lazy array read frame by frame
        (never whole; each frame about 2 + 2 x rounds times).
    upsample : int
        Sub-pixel precision 1/upsample px (Guizar-Sicairos upsampled DFT).
    reference : {'auto', 'mean', 'first', 'pairwise'}
        'auto' = 'mean': iterative leave-one-out mean of the aligned frames (see the
        module docstring for why); 'first': every frame against frame 0; 'pairwise':
        each frame against the previous one, cumulated.
    max_shift : float or None
        Largest ``|dy|`` and ``|dx|`` (px) allowed for one registration (frame against
        its reference); None = anywhere in the frame. Guards against jumps to a
        neighbouring lattice peak when the drift is known to be small.
    min_peak_z : float
        Reliability check (:func:`peak_significance`): a frame whose correlation peak
        scores below this is not trusted; its shift is interpolated in time from the
        trusted frames.  When fewer than half of the frames (after frame 0) are trusted
        the drift is *unmeasurable* (too little dose or contrast) and all shifts are 0:
        an unaligned movie is better than one scrambled by random jumps.  0 = off.
    return_info : bool
        Also return a record: 'peak_z' (T,), 'min_peak_z', 'unreliable_frames',
        'status' ('measured' | 'interpolated' | 'unmeasurable'; 'unchecked' when min_peak_z is 0).

    Returns
    -------
    shifts : (T, 2) float64
        ``(dy, dx)`` in px of frame ``t``'s content relative to frame 0
        (``shifts[0] == 0``); sign convention in the module docstring.
        With ``return_info``: ``(shifts, info)``.

    Memory: independent of T -- the leave-one-out mean is a running float64 sum, and
    each registration holds about ten float32 / complex64 frame-sized arrays (single
    precision: see ``_prepare``), plus 2 x T shifts: the drift stage peaked at 1.37 GB
    RSS on 20 x 4096² frames (2.2-2.3 GB in double precision).
    """
    stack = _check_stack(stack, "measure_drift", min_frames=2)  # frames go to float64 one at a time
    if not all(np.all(np.isfinite(stack[t])) for t in range(stack.shape[0])):
        raise InputError(None, "measure_drift: stack contains NaN or inf")
    if reference in ("auto", "mean"):
        shifts = _register_to_mean(stack, upsample, max_shift)
    elif reference == "first":
        shifts = _register_to_first(stack, upsample, max_shift)
    elif reference == "pairwise":
        shifts = _register_pairwise(stack, upsample, max_shift)
    else:
        raise InputError(None, "measure_drift: reference must be 'auto', 'mean', 'first' or "
                               f"'pairwise', got {reference!r}")
    shifts = np.asarray(shifts, dtype=np.float64)
    shifts = shifts - shifts[0]
    if min_peak_z <= 0:  # check off: the measurement as it is
        info = {"peak_z": None, "min_peak_z": 0.0, "unreliable_frames": [], "status": "unchecked"}
        return (shifts, info) if return_info else shifts
    z = peak_significance(stack, shifts)
    ok = z >= min_peak_z
    ok[0] = True  # frame 0 defines the grid
    info = {"peak_z": [round(float(v), 2) for v in z], "min_peak_z": float(min_peak_z),
            "unreliable_frames": [int(t) for t in np.flatnonzero(~ok)]}
    if ok[1:].sum() < max(1, (stack.shape[0] - 1) / 2):
        # no usable correlation peak in most frames: the "shifts" would be noise maxima
        # (random jumps across the frame); leave the movie as it is and say so
        shifts = np.zeros_like(shifts)
        info["status"] = "unmeasurable"
    elif not ok.all():
        # drift is smooth in time: interpolate the frames without a significant peak
        t = np.arange(stack.shape[0])
        shifts = np.stack([np.interp(t, t[ok], shifts[ok, k]) for k in range(2)], axis=1)
        info["status"] = "interpolated"
    else:
        info["status"] = "measured"
    return (shifts, info) if return_info else shifts


def peak_significance(stack, shifts) -> np.ndarray:
    """(T,) robust z-score of each frame's cross-correlation peak against the mean of the
    *other* frames aligned with ``shifts`` ((T, 2) px): (max - median) / (1.4826 MAD) of
    the integer correlation surface.  Noise alone gives ~3-5 (the largest of ~10^4
    values); a frame that shares structure with the others gives a clear outlier
    (see ``MIN_PEAK_Z``).  ``stack`` may be a Zarr / lazy array: read frame by frame,
    memory a few float64 / complex128 frames whatever T."""
    stack = _check_stack(stack, "peak_significance", min_frames=2)
    z = np.empty(stack.shape[0])
    for t, frame, ref in _leave_one_out_references(stack, shifts):
        cc = _cross_correlation(_prepare(ref), _prepare(frame))
        med = np.median(cc)
        mad = 1.4826 * np.median(np.abs(cc - med))
        z[t] = (cc.max() - med) / mad if mad > 0 else np.inf
    return z


def valid_crop(applied, shape) -> list[int]:
    """Region ``[y0, y1, x0, x1]`` (half-open, frame-0 pixel grid) that has data in every
    frame after undoing ``applied`` shifts ((T, 2) px) on frames of ``shape`` (Y, X).

    Aligned frame ``t`` samples raw frame ``t`` at ``(y + dy_t, x + dx_t)``; that lies
    inside ``[0, Y-1]`` for all t iff ``-min dy <= y <= Y - 1 - max dy`` (rounded inwards
    for fractional shifts).
    """
    applied = np.asarray(applied, dtype=np.float64)
    ny, nx = shape
    y0 = int(np.ceil(max(0.0, -applied[:, 0].min()) - 1e-9))
    y1 = int(ny - np.ceil(max(0.0, applied[:, 0].max()) - 1e-9))
    x0 = int(np.ceil(max(0.0, -applied[:, 1].min()) - 1e-9))
    x1 = int(nx - np.ceil(max(0.0, applied[:, 1].max()) - 1e-9))
    if y1 - y0 < 1 or x1 - x0 < 1:
        raise InputError(None, f"apply_shifts: drift up to {np.abs(applied).max():.1f} px leaves no "
                               f"region common to all frames of size {shape}")
    return [y0, y1, x0, x1]


def apply_shifts(stack, shifts, *, mode: str = "integer", crop: bool = True) -> tuple[np.ndarray, dict]:
    """Undo measured drift so every frame lies on frame 0's grid.

    Parameters
    ----------
    stack : (T, Y, X) array
        Frames to align (the RAW frames in the pipeline).
    shifts : (T, 2) array
        Content displacement ``(dy, dx)`` px of each frame relative to frame 0, as
        returned by :func:`measure_drift`.
    mode : {'integer', 'fourier', 'spline'}
        'integer' (default): round the shifts and move whole pixels by slicing. Output
        values are exactly input values - interpolation would correlate neighbouring
        pixels' noise, which a blind-spot network then cannot tell from signal.
        The sub-pixel remainder (<= 0.5 px) is left in the data and reported.
        'fourier': exact sub-pixel shift by ``scipy.ndimage.fourier_shift`` (periodic:
        content wraps around, hidden by the crop). 'spline': cubic spline
        (``ndimage.shift(order=3)``).
    crop : bool
        Crop to the region that has data in every frame (default). Without cropping,
        'integer' fills missing pixels with NaN, 'fourier' wraps content around and
        'spline' repeats the nearest edge value.

    Returns
    -------
    aligned : (T, Y', X') float32
    info : dict
        'applied' (T, 2) shifts actually undone, 'residual' (T, 2) ``shifts - applied``
        (non-zero only in integer mode), 'crop' ``[y0, y1, x0, x1]`` valid region in the
        un-cropped frame-0 grid (half-open), 'mode'.

    Memory: the whole output (T, Y', X') float32 plus one float64 frame; for bounded
    memory use :func:`plan_shifts` + :func:`aligned_blocks` (same values, by blocks).
    """
    stack = _check_stack(stack, "apply_shifts")
    info = plan_shifts(shifts, stack.shape, mode=mode)
    out = np.empty(aligned_shape(info, stack.shape, crop), dtype=np.float32)
    for t in range(stack.shape[0]):
        out[t] = _align_frame(stack, t, info, crop)
    return out, info


def plan_shifts(shifts, shape, *, mode: str = "integer") -> dict:
    """What :func:`apply_shifts` will undo, without touching any pixel.

    shifts: (T, 2) content displacements (px, :func:`measure_drift`); shape: the stack's
    (T, Y, X); mode as in :func:`apply_shifts`.  Returns its ``info`` dict ('applied',
    'residual', 'crop', 'mode'); InputError for bad shifts or a mode it does not know.
    """
    shifts = np.asarray(shifts, dtype=np.float64)
    n = int(shape[0])
    if shifts.shape != (n, 2):
        raise InputError(None, f"apply_shifts: shifts must have shape ({n}, 2), got {shifts.shape}")
    if not np.all(np.isfinite(shifts)):
        raise InputError(None, "apply_shifts: shifts contain NaN or inf")
    if mode not in _MODES:
        raise InputError(None, f"apply_shifts: mode must be one of {_MODES}, got {mode!r}")
    applied = whole_pixel_shifts(shifts) + 0.0 if mode == "integer" else shifts.copy()  # + 0.0: no "-0.0"
    box = valid_crop(applied, tuple(int(v) for v in shape[1:]))
    return {"applied": applied, "residual": shifts - applied, "crop": box, "mode": mode}


def aligned_shape(info: dict, shape, crop: bool = True) -> tuple[int, int, int]:
    """(T, Y', X') of the aligned stack for a :func:`plan_shifts` record and the input's
    (T, Y, X) shape."""
    y0, y1, x0, x1 = info["crop"]
    return (int(shape[0]), y1 - y0, x1 - x0) if crop else tuple(int(v) for v in shape)


def aligned_blocks(stack, info: dict, *, crop: bool = True, frames: int = 1):
    """:func:`apply_shifts` streamed: yield ``(a, block)``, block = aligned frames
    ``[a, a + frames)`` as float32 (frames, Y', X'), for a :func:`plan_shifts` record.

    stack: (T, Y, X) NumPy, Zarr or any lazy array, read one frame at a time ('integer'
    with crop reads only the cropped window).  Values identical to :func:`apply_shifts`.
    Memory: one output block (``frames`` float32 frames) plus, for 'fourier' / 'spline',
    a few float64 / complex128 copies of one frame; independent of T.
    """
    stack = _check_stack(stack, "aligned_blocks")
    n, k = stack.shape[0], max(1, int(frames))
    for a in range(0, n, k):
        yield a, np.stack([_align_frame(stack, t, info, crop) for t in range(a, min(n, a + k))])


def _align_frame(stack, t: int, info: dict, crop: bool) -> np.ndarray:
    """Aligned frame t, float32 (Y', X'): pure slicing in integer mode (aligned[y, x] =
    stack[t, y + dy, x + dx], no arithmetic on values); one frame read."""
    y0, y1, x0, x1 = info["crop"]
    if info["mode"] == "integer":
        dy, dx = (int(v) for v in info["applied"][t])
        if crop:
            return np.asarray(stack[t, y0 + dy:y1 + dy, x0 + dx:x1 + dx], dtype=np.float32)
        ny, nx = stack.shape[1:]
        out = np.full((ny, nx), np.nan, dtype=np.float32)
        ys, xs = slice(max(0, -dy), min(ny, ny - dy)), slice(max(0, -dx), min(nx, nx - dx))
        out[ys, xs] = stack[t, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
        return out
    frame = np.asarray(stack[t], dtype=np.float64)
    if info["mode"] == "fourier":
        spectrum = ndimage.fourier_shift(np.fft.fft2(frame), -info["applied"][t])
        out = np.fft.ifft2(spectrum).real.astype(np.float32)
    else:
        out = ndimage.shift(frame, -info["applied"][t], order=3, mode="nearest").astype(np.float32)
    return out[y0:y1, x0:x1] if crop else out


#: Frames of the local quadratic fit that :func:`whole_pixel_shifts` rounds (odd; at most
#: half the movie).  Monte Carlo on the synthetic drift paths (velocity random walk, 0-20 px,
#: 12-50 frames, 0.2 px measurement scatter): frames misaligned by a pixel 0-3 % with it,
#: 2-6.5 % rounding each measurement about their common offset.
WHOLE_PIXEL_WINDOW = 9


#: An axis of a measured trajectory counts as drifting only when a constant explains its
#: measurements worse than this (the chi-square p-value of :func:`still_axes`).  Measured on
#: the bench's 0.25 e-/px dynamic scene (no stage drift, particles that move): x read
#: 0.1-1.35 px with 0.33 px scatter (p 0.13), and rounding that trajectory shifted 3 of 50
#: frames by a pixel, costing the tuned Gaussian 0.15 dB.  The price: a slow real drift
#: hidden in that much scatter may be left as it is.  Simulated (1000 / 200 trials): at
#: 0.37 px scatter a steady drift over 50 frames is detected in 41 % (1 px), 93 % (1.5 px)
#: and 100 % (2.5 px) of movies (an undetected one leaves frames <= ~0.75 px off); a still
#: axis reads as drifting -- and is rounded as before -- in 0.2 % of 50-frame movies, 5 % at 10.
STILL_P = 1e-3
#: Fewest frames the stillness test is made on (below, the trajectory is rounded as measured).
STILL_MIN_FRAMES = 8


#: Share of the largest squared frame-to-frame differences :func:`still_axes` leaves out.
_TRIM = 0.05


@functools.lru_cache(maxsize=1)
def _trimmed_variance_factor() -> float:
    """E[Z^2 | Z^2 below its (1 - _TRIM) quantile] for a standard normal Z (0.759 at 5 %)."""
    from scipy.stats import norm

    c = float(norm.ppf(1.0 - _TRIM / 2))
    return 1.0 - 2.0 * c * float(norm.pdf(c)) / (1.0 - _TRIM)


def still_axes(shifts) -> dict:
    """Is each axis of a measured drift trajectory consistent with no drift at all?

    shifts: (T, 2) measured shifts (px, :func:`measure_drift`).  The measurement scatter
    s of one frame is estimated from the first differences of the measurements, which a
    smooth drift leaves almost untouched: their mean square about their median, the
    largest ``_TRIM`` of them left out (a jump or an excursion of a frame) and corrected
    for that cut (normal errors), / 2.  Not the MAD: measurements come in steps of
    1/upsample px, and at 0.05 px steps the MAD of a static movie's differences read
    0.052 px against an SD of 0.073 (a 'drift' at p 2e-6).  Then
    chi2 = sum_t (m_t - mean m)^2 / s^2 with T - 2 degrees of freedom tests the constant
    trajectory over frames 1..T-1.  Frame 0 is left out: its shift is 0 by definition, so
    its own registration error offsets every other frame's measurement and it alone reads
    as an outlier (the bench's 200-frame static counting movie: p ~0 with it).  An axis is
    *still* when its p-value is at least ``STILL_P``: scatter alone explains the spread;
    a steady drift of a few px, a jump or an excursion of a frame is far beyond it.
    Fewer than ``STILL_MIN_FRAMES`` frames, or no scatter at all: not tested (both False).
    Returns {'still': [bool, bool] (y, x), 'p': [..], 'chi2': [..], 'scatter_px': [..],
    'dof': T - 2, 'min_p': STILL_P}.
    """
    from scipy.stats import chi2  # imported on first use (start-up time)

    s = np.asarray(shifts, dtype=np.float64)
    n = len(s)
    rec = {"still": [False, False], "p": [None, None], "chi2": [None, None], "scatter_px": [None, None],
           "dof": max(n - 2, 0), "min_p": STILL_P}
    if n < STILL_MIN_FRAMES or s.ndim != 2 or s.shape[1] != 2:
        return rec
    for k in range(2):
        m = s[1:, k]  # frame 0 is the reference (see above)
        d = np.diff(m)
        d2 = (d - np.median(d)) ** 2
        d2 = d2[d2 <= np.quantile(d2, 1.0 - _TRIM)]
        scatter = float(np.sqrt(d2.mean() / (2.0 * _trimmed_variance_factor())))
        if not scatter > 0:
            continue  # exact (synthetic) shifts: nothing to test against
        q = float(np.sum((m - m.mean()) ** 2) / scatter ** 2)
        p = float(chi2.sf(q, n - 2))
        rec["still"][k], rec["p"][k] = bool(p >= STILL_P), round(p, 6)
        rec["chi2"][k], rec["scatter_px"][k] = round(q, 3), round(float(scatter), 4)
    return rec


def whole_pixel_shifts(shifts) -> np.ndarray:
    """(T, 2) measured shifts (px) -> (T, 2) whole-pixel shifts: the drift trajectory,
    rounded about its common sub-pixel offset: rint(m - f), f the circular mean of the
    trajectory's fractional parts (per axis) where they agree (mean resultant length >
    0.5), else 0.  The trajectory m is a quadratic fitted to each ``WHOLE_PIXEL_WINDOW``
    frames around t (Savitzky-Golay; at most half the movie's frames, and in movies
    under 10 frames the measurements themselves; the end frames on the fit of the first
    / last window), except where a frame lies further from it than max(4 x the robust SD of
    that distance, 1 px): that frame moved (a jump, an excursion) and keeps its own value.

    Why not rint(s): each frame's measurement scatters (+-0.2 px at 1 e-/px on 128 px
    frames) and all are measured against frame 0, whose own error offsets the others.
    Rounded one by one, a static movie splits into 0 and 1 px offsets (-1 dB for a
    50-frame static counting movie read 0.6 px off frame 0), and every frame measured
    more than half a pixel off (~2 % of them) is misaligned by a pixel: ~-0.4 dB for one
    such frame of 50 (its output then mixes its neighbours' content one pixel off).
    Drift is smooth in time: the local quadratic halves the scatter without bias on a
    steady or accelerating drift, so the static movie's fractional parts agree and no
    frame rounds alone.  On exact shifts the result is within ~0.05 px of rint about f
    (the quadratic's deviation from a smooth path); frames within a few frames of a
    jump of 1-2 px may be rounded one pixel off.

    An axis whose measurements a constant explains (:func:`still_axes`: the spread is the
    measurement's own scatter) is not shifted at all: rounding a noisy trajectory about
    a fractional offset near 0.5 px moves some frames by a pixel for nothing.

    Whole-pixel input comes back unchanged (the rule is idempotent: re-planning from the
    shifts a stage applied, as ``align_truth`` does, gives those shifts again)."""
    s = np.asarray(shifts, dtype=np.float64)
    if not len(s):
        return np.zeros((0, 2), dtype=int)
    if np.all(s == np.rint(s)):
        return s.astype(int)
    still = np.array(still_axes(s)["still"], dtype=bool)
    size = min(WHOLE_PIXEL_WINDOW, len(s) // 2 - (1 - (len(s) // 2) % 2))  # odd, at most T / 2
    m = s
    if size >= 5:
        from scipy.signal import savgol_filter  # imported on first use (start-up time)

        fit = savgol_filter(s, size, 2, axis=0, mode="interp")
        dev = np.abs(s - fit)
        m = np.where(dev <= np.maximum(4 * 1.4826 * np.median(dev, axis=0), 1.0), fit, s)
    ang = 2 * np.pi * m
    c, sn = np.cos(ang).mean(axis=0), np.sin(ang).mean(axis=0)
    f = np.where(np.hypot(c, sn) > 0.5, np.arctan2(sn, c) / (2 * np.pi), 0.0)
    whole = np.rint(m - f).astype(int)
    whole[:, still] = 0
    return whole


def drift_table(shifts, applied, residual, check: dict | None = None) -> pd.DataFrame:
    """Per-frame drift table for drift.csv.

    All arguments are (T, 2) arrays of (dy, dx) in px. Columns: frame, dy, dx,
    applied_dy, applied_dx, residual_dy, residual_dx; with ``check`` (the record of
    ``measure_drift(..., return_info=True)``) also peak_z and trusted (bool: the frame's
    own measurement was used, not an interpolation or the 'unmeasurable' zero).
    """
    shifts, applied, residual = (np.asarray(a, dtype=np.float64) for a in (shifts, applied, residual))
    df = pd.DataFrame({
        "frame": np.arange(len(shifts)),
        "dy": shifts[:, 0], "dx": shifts[:, 1],
        "applied_dy": applied[:, 0], "applied_dx": applied[:, 1],
        "residual_dy": residual[:, 0], "residual_dx": residual[:, 1],
    })
    if check and check.get("peak_z") is not None:
        df["peak_z"] = check["peak_z"]
        bad = set(check["unreliable_frames"])
        df["trusted"] = [check["status"] != "unmeasurable" and t not in bad for t in range(len(df))]
        df.loc[0, "trusted"] = True
    return df


def plot_drift(df: pd.DataFrame, png_path: str | os.PathLike) -> None:
    """Plot a :func:`drift_table` (dy, dx and applied shifts vs frame, and the x-y path)
    to ``png_path`` (written directly; the caller renames atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_xy) = plt.subplots(1, 2, figsize=(10, 4))
    for col, colour in (("dy", "C0"), ("dx", "C1")):
        ax_t.plot(df["frame"], df[col], color=colour, label=f"{col} measured")
        ax_t.step(df["frame"], df[f"applied_{col}"], where="mid", color=colour, ls=":", label=f"{col} applied")
    ax_t.set_xlabel("frame")
    ax_t.set_ylabel("drift (px)")
    ax_t.legend(fontsize=8)
    ax_xy.plot(df["dx"], df["dy"], ".-")
    ax_xy.plot(df["dx"].iloc[:1], df["dy"].iloc[:1], "o", color="k", label="frame 0")
    ax_xy.set_xlabel("dx (px)")
    ax_xy.set_ylabel("dy (px)")
    ax_xy.invert_yaxis()  # image convention: y grows downwards
    ax_xy.set_aspect("equal", adjustable="datalim")
    ax_xy.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100, format="png")
    plt.close(fig)
