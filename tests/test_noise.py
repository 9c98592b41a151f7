"""Noise-correlation heatmaps and the blind-spot rule (SHINE)."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.errors import InputError
from emdenoise.noise import (choose_blindspot, correlation_heatmap, difference_heatmap,
                             estimate_blindspot, heatmap_table, plot_heatmaps)
from emdenoise.synthetic import simulate_movie


def _heat(values: dict, lag: int = 4) -> np.ndarray:
    """Heatmap with 1 in the centre and the given {(dy, dx): r}, mirrored."""
    h = np.zeros((2 * lag + 1, 2 * lag + 1))
    h[lag, lag] = 1.0
    for (dy, dx), r in values.items():
        h[lag + dy, lag + dx] = h[lag - dy, lag - dx] = r
    return h


def test_heatmap_uses_overlap_not_wraparound():
    # A linear ramp: the frame shifted by one column is the frame plus a constant on the
    # overlap, so r = 1 exactly; with wrap-around the last column would break that.
    frame = np.arange(16.0).reshape(4, 4)
    h = correlation_heatmap(frame, max_lag=1)
    np.testing.assert_allclose(h, np.ones((3, 3)), atol=1e-12)


@pytest.mark.parametrize("shape,lag", [((37, 50), 4), ((64, 33), 2), ((10, 12), 4)])
def test_heatmap_equals_pearson_over_each_overlap(shape, lag):
    """The FFT / integral-image heatmap equals the Pearson correlation computed pair by pair
    over each lag's overlap (the definition), also with a flat part and a signal."""
    rng = np.random.default_rng(1)
    frame = rng.poisson(3.0, shape).astype(float)
    frame[:, :3] = 5.0
    frame += np.linspace(0, 4, shape[1])[None, :]
    h = correlation_heatmap(frame, max_lag=lag)
    ny, nx = shape
    for dy in range(-lag, lag + 1):
        for dx in range(-lag, lag + 1):
            a = frame[max(0, -dy):ny - max(0, dy), max(0, -dx):nx - max(0, dx)]
            b = frame[max(0, dy):ny - max(0, -dy), max(0, dx):nx - max(0, -dx)]
            assert h[lag + dy, lag + dx] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-10)


def test_known_correlation_of_two_tap_kernel():
    # noise convolved with [1, 1] along x: r(0, +-1) = 1/2 exactly, 0 elsewhere.
    rng = np.random.default_rng(0)
    white = rng.normal(size=(256, 257))
    frame = white[:, :-1] + white[:, 1:]
    h = correlation_heatmap(frame, max_lag=3)
    assert h.shape == (7, 7)
    assert h[3, 3] == pytest.approx(1.0)
    assert h[3, 4] == pytest.approx(0.5, abs=0.02) and h[3, 2] == pytest.approx(0.5, abs=0.02)
    others = np.delete(np.abs(h).ravel(), [3 * 7 + 2, 3 * 7 + 3, 3 * 7 + 4])
    assert others.max() < 0.02
    np.testing.assert_allclose(h, h[::-1, ::-1])  # point symmetric
    assert choose_blindspot(h) == 3


def test_choose_blindspot_rule():
    assert choose_blindspot(_heat({})) == 1
    # The Au heatmap reported by SHINE: 0.28 at (1, 0), 0.12 diagonal, 0.05 at lag 2
    # (difference estimate here: 0.03 at lag 2).
    assert choose_blindspot(_heat({(1, 0): 0.28, (0, 1): 0.28, (1, 1): 0.12, (2, 0): 0.05})) == 3
    assert choose_blindspot(_heat({(2, 1): -0.2})) == 5  # negative correlation counts too
    assert choose_blindspot(_heat({(1, 0): 0.05})) == 1  # |r| == threshold (0.05) is negligible
    assert choose_blindspot(_heat({(3, 0): 0.09})) == 7  # the demo's linear-mode lag 3: not negligible
    assert choose_blindspot(_heat({(3, 0): 0.09}), threshold=0.1) == 1
    assert choose_blindspot(_heat({(3, 0): 0.3}), sizes=(1, 3, 5, 9)) == 9  # rounded up
    with pytest.warns(UserWarning, match="capped"):
        assert choose_blindspot(_heat({(3, 0): 0.3}), sizes=(1, 3, 5)) == 5
    with pytest.raises(InputError):
        choose_blindspot(np.zeros((4, 4)))


def test_independent_counting_noise_gives_1(counting_movie):
    result = estimate_blindspot(counting_movie.noisy[:4])
    assert result["blindspot"] == 1
    assert result["estimate_used"] == "difference"
    assert max(result["max_abs_offcentre_r"].values()) < 0.05


def test_difference_ignores_signal_that_fools_a_single_frame():
    # 20 counts/px: the lattice itself correlates neighbouring pixels of a single frame
    # (r ~ 0.28 at lag 1), but the noise is independent Poisson.
    movie = simulate_movie(4, (128, 128), dose=20.0, max_drift=0, seed=1)
    frame = estimate_blindspot(movie.noisy, estimate="frame")
    diff = estimate_blindspot(movie.noisy)
    assert frame["blindspot"] > 1
    assert diff["blindspot"] == 1


def test_psf_correlated_linear_noise_needs_a_blind_spot(linear_movie):
    result = estimate_blindspot(linear_movie.noisy)
    h = np.asarray(result["heatmap_difference"])
    # Gaussian PSF sigma 1: noise autocorrelation exp(-d^2 / 4) = 0.78 at d = 1,
    # slightly diluted by the independent read noise.
    assert h[4, 5] == pytest.approx(0.76, abs=0.05)
    assert result["max_abs_offcentre_r"]["2"] == pytest.approx(0.36, abs=0.05)  # exp(-1)
    assert result["blindspot"] >= 3
    # At d = 3, exp(-9/4) = 0.105 > 0.05 (the threshold), at d = 4 exp(-4) = 0.018: 7 x 7.
    assert result["blindspot"] == 7
    assert not result["capped"] and not result["at_edge"]


def test_result_contents_and_options(linear_movie):
    stack = linear_movie.noisy
    r = estimate_blindspot(stack, max_lag=3, frame_index=2)
    assert r["pairs"] == [[2, 3]] and r["frames"] == [2, 3]
    assert np.asarray(r["heatmap_frame"]).shape == (7, 7)
    assert set(r["max_abs_offcentre_r"]) == {"1", "2", "3"}
    assert r["threshold"] == 0.05 and "Chebyshev" in r["rule"]
    spread = estimate_blindspot(stack)
    assert spread["pairs"][0] == [0, 1] and spread["pairs"][-1] == [4, 5]
    single = estimate_blindspot(stack[:1])
    assert single["estimate_used"] == "frame" and single["heatmap_difference"] is None
    with pytest.raises(InputError):
        estimate_blindspot(stack[:1], estimate="difference")
    with pytest.raises(InputError):
        estimate_blindspot(stack, frame_index=5)
    with pytest.raises(InputError):
        difference_heatmap(stack[0], stack[1, :-1])
    nan_stack = stack.copy()
    nan_stack[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        estimate_blindspot(nan_stack)


def test_table_and_plot(tmp_path, linear_movie):
    r = estimate_blindspot(linear_movie.noisy[:2], max_lag=2)
    table = heatmap_table(r["heatmap_difference"])
    assert list(table.columns) == ["dy", "dx", "r"] and len(table) == 25
    assert table.query("dy == 0 and dx == 0")["r"].item() == pytest.approx(1.0)
    png = tmp_path / "noise.png"
    plot_heatmaps(r, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_real_au_movie_gives_3x3(au_frames):
    """The SHINE authors chose 3x3 for this movie (r ~ 0.28 at lag (+-1, 0))."""
    result = estimate_blindspot(au_frames)
    h = np.asarray(result["heatmap_difference"])
    assert result["blindspot"] == 3
    assert 0.2 < h[3, 4] < 0.35 and 0.2 < h[4, 3] < 0.35  # lag (-1, 0) and (0, -1)
    assert result["max_abs_offcentre_r"]["2"] < 0.1
    frame = np.asarray(result["heatmap_frame"])
    assert frame[3, 4] == pytest.approx(0.28, abs=0.03)  # the single-frame value SHINE reports
