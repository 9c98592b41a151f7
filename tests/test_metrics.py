"""uMSE / uPSNR (WCVD), neighbour SNR (SHINE), PSNR / SSIM."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.drift import apply_shifts
from emdenoise.errors import InputError
from emdenoise.filters import gaussian2d, gaussian3d
from emdenoise.metrics import compute_metrics, psnr, snr_neighbour, ssim, umse, upsnr


def _tiny():
    """T = 5 frames of 4x4: frame t = v[t] + P, denoised t = w[t] + P (P cancels)."""
    pattern = np.arange(16.0).reshape(4, 4)
    v = [1.0, 3.0, 2.0, 5.0, 4.0]
    w = [10.0, 5.0, 4.0, 7.0, 9.0]
    noisy = np.stack([vt + pattern for vt in v])
    denoised = np.stack([wt + pattern for wt in w])
    return denoised, noisy


def test_umse_by_hand():
    denoised, noisy = _tiny()
    # r = 0: output frames t = 1, 2 (t = 1 .. T-3); a = y[t-1], b = y[t+1], c = y[t+2].
    # t=1: f - a = 5 - 1 = 4, b - c = 2 - 5 = -3
    # t=2: f - a = 4 - 3 = 1, b - c = 5 - 4 = 1
    expected = (4 ** 2 + 1 ** 2) / 2 - 0.5 * ((-3) ** 2 + 1 ** 2) / 2  # 8.5 - 2.5 = 6.0
    assert umse(denoised, noisy) == pytest.approx(expected)
    assert expected == 6.0
    # peak M = max of the raw stack = 5 + 15 = 20
    assert upsnr(denoised, noisy) == pytest.approx(10 * np.log10(20.0 ** 2 / 6.0))
    assert upsnr(denoised, noisy, peak=100.0) == pytest.approx(10 * np.log10(100.0 ** 2 / 6.0))


def test_umse_temporal_radius_by_hand():
    denoised, noisy = _tiny()
    noisy = np.concatenate([noisy, noisy[:1] + 6.0])  # v[5] = 7
    denoised = np.concatenate([denoised, denoised[:1]])
    # r = 1, T = 6: only t = 2; a = y[0] (1), b = y[4] (4), c = y[5] (7); f[2] = 4.
    expected = (4 - 1) ** 2 - 0.5 * (4 - 7) ** 2  # 9 - 4.5
    assert umse(denoised, noisy, temporal_radius=1) == pytest.approx(expected)
    with pytest.raises(InputError, match="at least 8 frames"):
        umse(denoised, noisy, temporal_radius=2)


def test_negative_umse_gives_nan_upsnr():
    denoised, noisy = _tiny()
    denoised[1] = noisy[0]  # f = a exactly at t = 1
    denoised[2] = noisy[1]
    assert umse(denoised, noisy) == pytest.approx(-2.5)
    assert np.isnan(upsnr(denoised, noisy))


def test_umse_needs_four_frames_and_same_shape():
    denoised, noisy = _tiny()
    with pytest.raises(InputError, match="at least 4 frames"):
        umse(denoised[:3], noisy[:3])
    with pytest.raises(InputError):
        umse(denoised[:, :3], noisy)


def test_umse_is_unbiased_for_static_scene(static_counting_movie):
    """uMSE matches the true MSE against the clean movie (noise variance = dose = 2)."""
    m = static_counting_movie
    noisy, clean = m.noisy, m.clean.astype(np.float64)
    tol = 0.02 * 2.0  # ~4 standard errors of the estimate here
    t = np.arange(1, noisy.shape[0] - 2)  # the frames uMSE scores for r = 0
    for method in (noisy, gaussian2d(noisy, 1.0)):
        true = np.mean((method[t] - clean[t]) ** 2)
        assert umse(method, noisy) == pytest.approx(true, abs=tol)
    # A temporal filter sees a = y[t-1]: shared noise biases r = 0 low; r = 2 is right.
    g3 = gaussian3d(noisy, 1.0)
    t2 = np.arange(3, noisy.shape[0] - 4)
    true = np.mean((g3[t2] - clean[t2]) ** 2)
    assert umse(g3, noisy, temporal_radius=2) == pytest.approx(true, abs=tol)
    assert umse(g3, noisy, temporal_radius=0) < true - 3 * tol


def test_gaussian3d_beats_raw_in_upsnr(counting_movie):
    # Drifting movie, aligned with whole-pixel shifts as in the pipeline.
    aligned, _ = apply_shifts(counting_movie.noisy, counting_movie.shifts)
    raw_db = upsnr(aligned, aligned, temporal_radius=2)
    g3_db = upsnr(gaussian3d(aligned, 1.0), aligned, temporal_radius=2)
    assert g3_db > raw_db + 5.0


def test_snr_neighbour_matches_signal_to_noise_variance():
    rng = np.random.default_rng(3)
    signal = 2.0 * rng.normal(size=(192, 192))  # variance 4
    stack = signal + rng.normal(size=(4, 192, 192))  # noise variance 1
    assert snr_neighbour(stack) == pytest.approx(10 * np.log10(4.0), abs=0.2)
    flipping = signal * np.array([1.0, -1.0, 1.0])[:, None, None]  # p = -1
    assert np.isnan(snr_neighbour(flipping))
    with pytest.raises(InputError):
        snr_neighbour(stack[:1])


def test_psnr_and_ssim_against_truth():
    truth = np.linspace(0.0, 1.0, 3 * 32 * 32).reshape(3, 32, 32)  # data range exactly 1
    assert psnr(truth + 0.1, truth) == pytest.approx(10 * np.log10(1.0 / 0.01))
    assert ssim(truth, truth) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    assert ssim(truth + rng.normal(scale=0.3, size=truth.shape), truth) < 0.5


def test_compute_metrics_table(static_counting_movie):
    m = static_counting_movie
    stacks = {"raw": m.noisy, "gaussian3d": gaussian3d(m.noisy, 1.0)}
    df = compute_metrics(stacks, m.noisy, truth=m.clean)  # default temporal_radius=2
    assert list(df.columns) == ["method", "umse", "upsnr_db", "snr_db", "psnr_db", "ssim"]
    assert df["method"].tolist() == ["raw", "gaussian3d"]
    raw, g3 = df.iloc[0], df.iloc[1]
    assert g3.upsnr_db > raw.upsnr_db and g3.psnr_db > raw.psnr_db and g3.ssim > raw.ssim
    assert g3.snr_db > raw.snr_db
    no_truth = compute_metrics(stacks, m.noisy)
    assert no_truth["psnr_db"].isna().all() and no_truth["ssim"].isna().all()
    with pytest.raises(InputError):
        compute_metrics({"cropped": m.noisy[:, 1:]}, m.noisy)
