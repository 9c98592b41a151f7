"""Drift measurement and correction: sign convention, exactness, crop, accuracy."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emdenoise.drift import apply_shifts, drift_table, measure_drift, plot_drift
from emdenoise.errors import InputError
from emdenoise.filters import gaussian2d
from emdenoise.synthetic import simulate_movie


def _rms(a, b):
    return float(np.sqrt(np.mean(np.sum((np.asarray(a) - np.asarray(b)) ** 2, axis=1))))


def _two_frames_integer_shift(dy, dx, size=128):
    """Frame 1 = frame 0's specimen displaced by exactly (dy, dx), rendered analytically."""
    pad = 16
    big = simulate_movie(1, (size + 2 * pad, size + 2 * pad), max_drift=0, seed=4).clean[0]
    frame0 = big[pad:pad + size, pad:pad + size]
    frame1 = big[pad - dy:pad - dy + size, pad - dx:pad - dx + size]  # frame1[y, x] = frame0[y - dy, x - dx]
    return np.stack([frame0, frame1])


def test_known_integer_shift_recovered_exactly_with_documented_sign():
    stack = _two_frames_integer_shift(3, -5)
    for reference in ("auto", "first", "pairwise"):
        shifts = measure_drift(stack, reference=reference)
        np.testing.assert_allclose(shifts[0], [0, 0])
        np.testing.assert_allclose(shifts[1], [3.0, -5.0], atol=0.05)
    aligned, info = apply_shifts(stack, shifts)
    np.testing.assert_array_equal(info["applied"], [[0, 0], [3, -5]])
    # Exact integer shift: the aligned frames are identical on the common region.
    np.testing.assert_array_equal(aligned[1], aligned[0])


def test_synthetic_drift_sign_matches_measurement(counting_movie):
    shifts = measure_drift(gaussian2d(counting_movie.clean, 1.5))
    assert _rms(shifts, counting_movie.shifts) < 0.1  # noise-free: only precision limits


@pytest.mark.parametrize("seed", [0, 1])
def test_low_dose_drift_rms_below_quarter_pixel(seed):
    """1 count/px, drift up to 10 px, gaussian2d(1.5) prefilter: RMS error <= 0.25 px.

    256 px frames: the Cramer-Rao bound for the error relative to frame 0 is ~0.15 px
    here but ~0.2 px at 192 px and ~0.3 px at 128 px, so smaller frames cannot pass.
    """
    movie = simulate_movie(20, (256, 256), dose=1.0, max_drift=10.0, seed=seed)
    shifts = measure_drift(gaussian2d(movie.noisy, 1.5))
    assert _rms(shifts, movie.shifts) <= 0.25
    assert np.max(np.abs(shifts - movie.shifts)) < 1.0  # no lattice-peak jumps


def test_mean_reference_survives_where_frame0_reference_jumps():
    """0.5 count/px: against frame 0 alone some frames lock onto a wrong peak (~20 px
    off); the iterative mean reference ('auto') stays sub-pixel. Why 'auto' is the default."""
    movie = simulate_movie(20, (256, 256), dose=0.5, max_drift=10.0, seed=2)
    pre = gaussian2d(movie.noisy, 1.5)
    auto = measure_drift(pre)
    first = measure_drift(pre, reference="first", min_peak_z=0)  # the raw strategy, unchecked
    assert np.max(np.abs(auto - movie.shifts)) < 1.0 and _rms(auto, movie.shifts) < 0.35
    assert np.max(np.abs(first - movie.shifts)) > 5.0


def test_drift_without_a_significant_peak_is_not_applied():
    """Too little dose for phase correlation (0.1 count/px, static): the unchecked
    measurement returns noise maxima (jumps across the frame); the check finds no
    significant peak in most frames and returns no drift, saying so."""
    movie = simulate_movie(16, (128, 128), dose=0.1, max_drift=0.0, seed=3)
    pre = gaussian2d(movie.noisy, 1.5)
    assert np.max(np.abs(measure_drift(pre, min_peak_z=0))) > 5.0      # what it did before
    shifts, info = measure_drift(pre, return_info=True)
    assert info["status"] == "unmeasurable" and len(info["unreliable_frames"]) > 8
    np.testing.assert_array_equal(shifts, 0.0)
    assert sum(z < info["min_peak_z"] for z in info["peak_z"][1:]) > 7


def test_frames_without_a_peak_are_interpolated_in_time():
    """A drifting movie with three blank (noise-only) frames: those frames get the shift
    interpolated from their neighbours, the others keep their measurement."""
    movie = simulate_movie(20, (192, 192), dose=2.0, max_drift=6.0, seed=5)
    noisy = movie.noisy.copy()
    blank = [5, 6, 13]
    noisy[blank] = np.random.default_rng(0).poisson(2.0, (3, 192, 192))
    shifts, info = measure_drift(gaussian2d(noisy, 1.5), return_info=True)
    assert info["status"] == "interpolated" and info["unreliable_frames"] == blank
    good = [t for t in range(20) if t not in blank]
    assert np.max(np.abs(shifts[good] - movie.shifts[good])) < 1.0
    assert np.max(np.abs(shifts[blank] - movie.shifts[blank])) < 1.5   # smooth drift: interpolation is close


def test_max_shift_bounds_the_search(counting_movie):
    pre = gaussian2d(counting_movie.noisy, 1.5)
    free = measure_drift(pre)
    bounded = measure_drift(pre, max_shift=12)
    assert _rms(bounded, counting_movie.shifts) < 0.5
    assert _rms(bounded, free) < 0.3
    tight = measure_drift(pre, reference="first", max_shift=2)
    assert np.all(np.abs(tight) <= 2.0 + 1.0)  # integer bound plus at most 1 px refinement


def test_integer_mode_copies_raw_values_and_crops_common_region():
    rng = np.random.default_rng(0)
    stack = rng.poisson(1.0, size=(3, 20, 30)).astype(np.float32)
    shifts = np.array([[0.0, 0.0], [2.4, -3.6], [-1.2, 0.6]])
    aligned, info = apply_shifts(stack, shifts, mode="integer")
    np.testing.assert_array_equal(info["applied"], [[0, 0], [2, -4], [-1, 1]])
    np.testing.assert_allclose(info["residual"], [[0, 0], [0.4, 0.4], [-0.2, -0.4]], atol=1e-12)
    # Rows need y + dy in [0, 20) for dy in {0, 2, -1}: y in [1, 18). Columns, dx in
    # {0, -4, 1}: x in [4, 29).
    assert info["crop"] == [1, 18, 4, 29]
    assert aligned.shape == (3, 17, 25) and aligned.dtype == np.float32
    np.testing.assert_array_equal(aligned[0], stack[0, 1:18, 4:29])
    np.testing.assert_array_equal(aligned[1], stack[1, 3:20, 0:25])
    np.testing.assert_array_equal(aligned[2], stack[2, 0:17, 5:30])
    assert info["mode"] == "integer"


def test_integer_mode_without_crop_marks_missing_pixels_nan():
    stack = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    aligned, info = apply_shifts(stack, np.array([[0, 0], [1, 0]]), crop=False)
    assert aligned.shape == stack.shape
    np.testing.assert_array_equal(aligned[1, :5], stack[1, 1:])  # aligned[y] = raw[y + 1]
    assert np.all(np.isnan(aligned[1, 5]))
    assert info["crop"] == [0, 5, 0, 6]


@pytest.mark.parametrize("mode,tol", [("integer", 0.35), ("fourier", 0.08), ("spline", 0.03)])
def test_apply_shifts_aligns_onto_frame0(counting_movie, mode, tol):
    clean = counting_movie.clean
    aligned, info = apply_shifts(clean, counting_movie.shifts, mode=mode)
    y0, y1, x0, x1 = info["crop"]
    ref = clean[0, y0:y1, x0:x1]
    # Errors relative to the image's intensity range; integer mode leaves <= 0.5 px.
    err = np.abs(aligned - ref).max() / (ref.max() - ref.min())
    assert err < tol
    if mode != "integer":
        np.testing.assert_array_equal(info["residual"], 0)


def test_measured_shifts_feed_apply_shifts(counting_movie):
    pre = gaussian2d(counting_movie.noisy, 1.5)
    aligned, info = apply_shifts(counting_movie.noisy, measure_drift(pre))
    assert np.all(np.abs(info["residual"]) <= 0.5)
    clean_aligned, _ = apply_shifts(counting_movie.clean, info["applied"])
    y0, y1, x0, x1 = info["crop"]
    # Mean of the aligned clean frames is close to frame 0: alignment, not blur.
    ref = counting_movie.clean[0, y0:y1, x0:x1]
    assert np.corrcoef(clean_aligned.mean(0).ravel(), ref.ravel())[0, 1] > 0.95


def test_bad_input_raises_input_error():
    with pytest.raises(InputError, match="at least 2 frames"):
        measure_drift(np.zeros((1, 32, 32)))
    with pytest.raises(InputError):
        measure_drift(np.zeros((32, 32)))
    with pytest.raises(InputError):
        measure_drift(np.zeros((2, 32, 32)), reference="median")
    with pytest.raises(InputError, match="NaN"):
        measure_drift(np.full((2, 32, 32), np.nan))
    with pytest.raises(InputError):
        apply_shifts(np.zeros((2, 8, 8)), np.zeros((3, 2)))
    with pytest.raises(InputError):
        apply_shifts(np.zeros((2, 8, 8)), np.zeros((2, 2)), mode="linear")
    with pytest.raises(InputError, match="no region"):
        apply_shifts(np.zeros((2, 8, 8)), np.array([[0, 0], [9, 0]]))


def test_real_au_movie_drift_is_small(au_frames):
    """Real data (2.5 ms frames): over 4 frames the stage hardly moves."""
    shifts = measure_drift(gaussian2d(au_frames, 1.5))
    assert shifts.shape == (4, 2) and np.all(np.isfinite(shifts))
    assert np.max(np.abs(shifts)) < 2.0


def test_drift_table_and_plot(tmp_path):
    shifts = np.array([[0.0, 0.0], [0.6, -1.2], [1.4, -2.0]])
    applied = np.rint(shifts)
    df = drift_table(shifts, applied, shifts - applied)
    assert list(df.columns) == ["frame", "dy", "dx", "applied_dy", "applied_dx", "residual_dy", "residual_dx"]
    assert df["frame"].tolist() == [0, 1, 2]
    assert df.loc[1, "applied_dy"] == 1.0 and df.loc[2, "residual_dy"] == pytest.approx(0.4)
    png = tmp_path / "drift.png.tmp"
    plot_drift(df, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    df.to_csv(tmp_path / "drift.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "drift.csv"), df, check_dtype=False)


def test_whole_pixel_shifts_keep_a_static_movie_still():
    """Shifts measured against frame 0 carry frame 0's own error: a static movie read as a
    common 0.4 px offset +- 0.15 px. Rounding each frame (rint) splits it into 0 and 1 px
    offsets; rounding about the median keeps every frame where it is. A real drift is
    rounded as before (within the common offset)."""
    from emdenoise.drift import whole_pixel_shifts

    rng = np.random.default_rng(0)
    static = np.column_stack([np.zeros(30), 0.4 + rng.normal(0, 0.15, 30)])
    static[0] = 0.0  # frame 0 is the reference
    assert len(np.unique(np.rint(static[:, 1]))) == 2  # the naive rounding misaligns
    whole = whole_pixel_shifts(static)
    assert (whole == 0).all(), whole[:, 1]
    ramp = np.column_stack([np.linspace(0, 8, 30), np.linspace(0, -5, 30)]) + rng.normal(0, 0.1, (30, 2))
    assert np.abs(whole_pixel_shifts(ramp) - ramp).max() <= 0.5 + 0.3
    aligned, info = apply_shifts(np.zeros((30, 40, 40), np.float32), static, mode="integer")
    assert (info["applied"] == 0).all() and aligned.shape == (30, 40, 40)


def test_whole_pixel_shifts_keep_a_static_movie_still_at_low_dose_scatter():
    """At ~1 e-/px the per-frame scatter is ~0.2 px: the fractional parts of the raw
    shifts no longer agree (mean resultant length < 0.5), so rounding about their offset
    fell back to plain rint and split a static 50-frame movie read 0.62 px off frame 0
    into 0 and 1 px (-1 dB).  The offset of the smoothed trajectory agrees: the frames
    after frame 0 land on the same whole pixel but for the few measured more than half a
    pixel from it (frame 0, the reference, may differ by one: it is the one read off)."""
    from emdenoise.drift import whole_pixel_shifts

    rng = np.random.default_rng(3)
    static = np.column_stack([0.62 + rng.normal(0, 0.22, 50), 0.3 + rng.normal(0, 0.22, 50)])
    static[0] = 0.0
    ang = 2 * np.pi * static[:, 0]
    assert np.hypot(np.cos(ang).mean(), np.sin(ang).mean()) < 0.5  # the raw offsets disagree

    def off_majority(whole):  # frames after frame 0 not on the most common whole pixel
        rows, counts = np.unique(whole[1:], axis=0, return_counts=True)
        return 49 - counts.max()
    assert off_majority(np.rint(static)) >= 10  # plain rint splits the movie
    assert off_majority(whole_pixel_shifts(static)) <= 5  # only the outliers (> 0.5 px: ~2 % per axis)
    # a steady drift measured with the same scatter: every frame on the whole pixel nearest
    # its true position (within 0.5 px + the fit's error), where rounding each measurement misses
    true = np.column_stack([np.linspace(0, 6, 50), np.linspace(0, -3, 50)])
    measured = true + rng.normal(0, 0.22, (50, 2))
    assert np.abs(np.rint(measured) - true).max() > 0.75
    assert np.abs(whole_pixel_shifts(measured) - true).max() <= 0.65


def test_a_still_axis_is_not_shifted_even_when_its_scatter_rounds_frames_off(monkeypatch):
    """A movie without drift whose measurements scatter by 0.37 px about 0.4 px (the
    bench's 0.25 e-/px dynamic scene: moving particles pull the registration) is left
    still; without the stillness test the rounded trajectory moves frames by a pixel.
    A steady 2.5 px drift or a 3 px jump with the same scatter is still aligned."""
    from emdenoise import drift

    rng = np.random.default_rng(5)
    n = 50
    still = np.column_stack([0.1 + rng.normal(0, 0.2, n), 0.4 + rng.normal(0, 0.37, n)])
    still[0] = 0.0
    rec = drift.still_axes(still)
    assert rec["still"] == [True, True], rec
    assert 0.25 < rec["scatter_px"][1] < 0.5
    assert (drift.whole_pixel_shifts(still) == 0).all()
    monkeypatch.setattr(drift, "STILL_P", 1.1)  # test off: every axis "drifts"
    assert (drift.whole_pixel_shifts(still) != 0).any()  # what the test prevents
    monkeypatch.undo()

    ramp = np.column_stack([np.zeros(n), np.linspace(0, 2.5, n)]) + rng.normal(0, 0.37, (n, 2))
    rec = drift.still_axes(ramp)
    assert rec["still"] == [True, False], rec
    whole = drift.whole_pixel_shifts(ramp)
    assert (whole[:, 0] == 0).all() and whole[-1, 1] - whole[0, 1] >= 1
    jump = np.column_stack([np.where(np.arange(n) >= 25, 3.0, 0.0), np.zeros(n)]) + rng.normal(0, 0.2, (n, 2))
    rec = drift.still_axes(jump)
    assert rec["still"] == [False, True], rec
    assert np.abs(drift.whole_pixel_shifts(jump)[:, 0] - np.rint(jump[:, 0] - 0.0)).max() <= 1
    assert set(np.unique(drift.whole_pixel_shifts(jump)[:, 0])) >= {0, 3}
    # measurements come in 1/upsample px steps: a still movie read at 0.05 px steps with
    # 0.07 px scatter is still (the MAD of its differences, 0.052 px, called it drifting, p 2e-4)
    steps = np.round(np.random.default_rng(0).normal(0, 0.07, (n, 2)) * 20) / 20
    steps[0] = 0.0
    assert drift.still_axes(steps)["still"] == [True, True]
    # too few frames or exact shifts: not tested, rounded as before
    assert drift.still_axes(still[:5])["still"] == [False, False]
    exact = np.column_stack([np.zeros(n), np.full(n, 0.6)])
    assert drift.still_axes(exact)["p"] == [None, None]


def test_single_precision_registration_finds_the_double_precision_peak():
    """The registration runs in float32 / complex64 (half the memory at 4096² frames):
    on low-dose frames it must land on the same sub-pixel step as float64 would, the
    rounding being far below the shot noise (a fault - e.g. a lost window or a
    complex64 overflow - would move peaks by pixels)."""
    from scipy.signal.windows import tukey

    from emdenoise import drift

    movie = simulate_movie(6, (160, 160), dose=1.0, max_drift=5.0, seed=7)
    pre = gaussian2d(movie.noisy, 1.5)
    window = np.outer(tukey(160, 0.25), tukey(160, 0.25))

    def prepared64(f):
        f = np.asarray(f, np.float64)
        return (f - f.mean()) * window

    assert drift._prepare(pre[0]).dtype == np.float32
    for t in range(1, 6):
        single = drift._register(pre[0], pre[t], 20, None)
        double, _, _ = drift.phase_cross_correlation(prepared64(pre[0]), prepared64(pre[t]),
                                                     upsample_factor=20, normalization=None)
        np.testing.assert_allclose(single, -double, atol=0.05 + 1e-6)  # at most one 1/20 px step
        assert _rms([single], [movie.shifts[t] - movie.shifts[0]]) < 1.0  # and near the truth


def test_whole_pixel_shifts_of_whole_pixel_shifts_are_themselves():
    """The workflow's align_truth re-plans from the shifts the drift stage applied: rounding
    must give them back, whatever a test on them would say (a mostly still integer path
    with two 1 px steps reads 'still' to the chi-square test)."""
    from emdenoise.drift import still_axes, whole_pixel_shifts

    rng = np.random.default_rng(2)
    applied = np.column_stack([np.zeros(30), (rng.random(30) < 0.15).astype(float)])
    assert still_axes(applied)["still"][1] or still_axes(applied)["scatter_px"][1] is None
    np.testing.assert_array_equal(whole_pixel_shifts(applied), applied.astype(int))
    ramp = np.column_stack([np.arange(30) // 4, -(np.arange(30) // 7)]).astype(float)
    np.testing.assert_array_equal(whole_pixel_shifts(ramp), ramp.astype(int))
