"""uMSE / uPSNR (WCVD), neighbour SNR (SHINE), PSNR / SSIM."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.drift import apply_shifts
from emdenoise.errors import InputError
from scipy import ndimage

from emdenoise.filters import gaussian2d, gaussian3d, temporal_reach
from emdenoise.metrics import (compute_metrics, neighbour_corr, psnr, select_model, self_supervised_loss,
                               snr_neighbour, ssim, umse, upsnr)
from emdenoise.synthetic import simulate_movie


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
    reaches = {"raw": 0, "gaussian3d": 2}
    df = compute_metrics(stacks, m.noisy, truth=m.clean, reaches=reaches)  # default temporal_radius=2
    assert list(df.columns) == ["method", "reach", "umse", "upsnr_db", "snr_db", "snr_corr", "psnr_db", "ssim",
                                "umse_radius", "snr_lag", "umse_valid"]
    assert df["method"].tolist() == ["raw", "gaussian3d"]
    assert (df.umse_radius == 2).all() and (df.snr_lag == 5).all() and df.umse_valid.all()
    raw, g3 = df.iloc[0], df.iloc[1]
    assert g3.upsnr_db > raw.upsnr_db and g3.psnr_db > raw.psnr_db and g3.ssim > raw.ssim
    assert g3.snr_db > raw.snr_db
    assert g3.snr_db == pytest.approx(10 * np.log10(g3.snr_corr / (1 - g3.snr_corr)))
    no_truth = compute_metrics(stacks, m.noisy, reaches=reaches)
    assert no_truth["psnr_db"].isna().all() and no_truth["ssim"].isna().all()
    with pytest.raises(InputError):
        compute_metrics({"cropped": m.noisy[:, 1:]}, m.noisy, reaches={"cropped": 0})
    with pytest.raises(InputError, match="no temporal reach"):
        compute_metrics(stacks, m.noisy, reaches={"raw": 0})
    # the widest reach that leaves MIN_SCORED_FRAMES (8) frames scored sets the radius for every method
    long = np.concatenate([m.noisy, m.noisy[::-1]])  # 32 frames: reach 4 leaves 32 - 11 = 21 scored
    wide = compute_metrics({k: np.concatenate([v, v[::-1]]) for k, v in stacks.items()}, long,
                           reaches={"raw": 0, "gaussian3d": 4})
    assert (wide.umse_radius == 4).all() and (wide.snr_lag == 9).all() and wide.umse_valid.all()
    # a reach the movie is too short for: the others keep their radius, it gets NaN, not a biased
    # score from one or two frames (16 frames, reach 4: 16 - 11 = 5 frames < 8)
    short = compute_metrics(stacks, m.noisy, reaches={"raw": 0, "gaussian3d": 4})
    assert (short.umse_radius == 2).all()
    assert short.umse_valid.tolist() == [True, False]
    assert np.isfinite(short.umse[0]) and np.isnan(short.umse[1]) and np.isnan(short.snr_db[1])


def _static_movie_and_two_candidates():
    """Static counting movie; a 7-frame temporal mean (reach 3, true MSE ~0.28) and a
    Gaussian 3D over 3 frames (sigma_t 0.5: reach 1, true MSE ~0.11)."""
    m = simulate_movie(16, (128, 128), mode="counting", dose=2.0, max_drift=0.0, seed=2)
    noisy = m.noisy.astype(np.float32)
    cands = {"mean7": ndimage.uniform_filter1d(noisy, 7, axis=0, mode="reflect"),
             "g3d_3frames": gaussian3d(noisy, (0.5, 1.0, 1.0))}
    reaches = {"mean7": 3, "g3d_3frames": temporal_reach("gaussian3d", sigma=(0.5, 1.0, 1.0))}
    return m, noisy, cands, reaches


def test_select_model_scores_any_reach_without_bias():
    """Noise2Self choice between J-invariant candidates: the 2 neighbouring frames (reach 1,
    true MSE ~1.1), a 7-frame window without the centre frame (reach 3, ~0.40) and the
    leave-one-out mean of all 16 frames (reach 15, ~0.13, the best on a static scene):
    the loss minus the noise variance estimates each true MSE, whatever the reach --
    uMSE could not score the last one on 16 frames (it needs T >= 2 * 15 + 4)."""
    m, noisy, _, _ = _static_movie_and_two_candidates()
    clean = m.clean.astype(np.float64)
    y = noisy.astype(np.float64)

    def without_centre(weights):  # temporal filter with the centre frame's weight removed
        w = np.asarray(weights, np.float64)
        w[len(w) // 2] = 0.0
        num = ndimage.correlate1d(y, w, axis=0, mode="constant")
        den = ndimage.correlate1d(np.ones_like(y), w, axis=0, mode="constant")
        return num / den

    g = np.exp(-0.5 * (np.arange(-1, 2) / 0.5) ** 2)
    cands = {"mean7": without_centre(np.ones(7)), "g3": without_centre(g), "all": without_centre(np.ones(31))}
    true = {k: float(np.mean((v - clean) ** 2)) for k, v in cands.items()}
    assert true["all"] < 0.5 * true["mean7"] and true["mean7"] < 0.5 * true["g3"], true
    losses = {k: self_supervised_loss(v, noisy) for k, v in cands.items()}
    res = select_model(losses)
    assert res["chosen"] == "all" and res["loss"] == losses and res["excess"]["all"] == 0.0
    noise_var = float(np.mean((y - clean) ** 2))
    for k in cands:  # unbiased: loss - noise variance = true MSE (within the estimate's scatter)
        assert losses[k] - noise_var == pytest.approx(true[k], rel=0.05, abs=0.005), (k, losses[k], true[k])
    assert sorted(losses, key=losses.get) == sorted(true, key=true.get)
    # a non-J-invariant candidate (the frame itself) would look perfect: never a candidate
    assert self_supervised_loss(noisy, noisy) == 0.0
    with pytest.raises(InputError, match="no candidates"):
        select_model({})
    with pytest.raises(InputError, match="no valid self-supervised loss"):
        select_model({"a": 1.0, "b": float("nan")})
    with pytest.raises(InputError, match="shape"):
        self_supervised_loss(noisy[:3], noisy)


def test_select_model_keeps_the_gaussian_unless_a_network_is_significantly_better():
    """A network replaces the tuned Gaussian ('classical') only when its loss is lower by
    more than SELECT_MIN_Z standard errors of the per-frame paired difference: two
    J-invariant candidates of the same true quality (the same filter on independent
    half-noise) must not flip to the network on noise; one clearly better must win."""
    from emdenoise.metrics import SELECT_MIN_Z, self_supervised_loss_per_frame

    m, noisy, _, _ = _static_movie_and_two_candidates()
    y = noisy.astype(np.float64)

    def loo_mean(radius):  # mean of frames t-r..t+r without t: J-invariant, reach r
        w = np.ones(2 * radius + 1)
        w[radius] = 0.0
        num = ndimage.correlate1d(y, w, axis=0, mode="constant")
        return num / ndimage.correlate1d(np.ones_like(y), w, axis=0, mode="constant")

    good, poor = loo_mean(7), loo_mean(1)
    # a "network" equal in truth to the Gaussian, its loss lower by luck: a tiny shift
    same = good + 1e-4 * np.random.default_rng(0).normal(size=good.shape)
    for net, want in ((same, "classical"), (poor, "classical")):
        fl = {"classical": self_supervised_loss_per_frame(good, noisy), "net": self_supervised_loss_per_frame(net, noisy)}
        losses = {k: float(np.mean(v)) for k, v in fl.items()}
        losses["net"] = min(losses["net"], losses["classical"] * (1 - 1e-9))  # the network "wins" by a hair
        res = select_model(losses, fl)
        assert res["chosen"] == want and res["significance"]["kept"] == "classical", res
        assert res["significance"]["z"] > -SELECT_MIN_Z and res["significance"]["frames"] == len(y)
    fl = {"classical": self_supervised_loss_per_frame(poor, noisy), "net": self_supervised_loss_per_frame(good, noisy)}
    res = select_model({k: float(np.mean(v)) for k, v in fl.items()}, fl)
    assert res["chosen"] == "net" and res["significance"]["z"] < -SELECT_MIN_Z, res
    # without per-frame losses: the lowest loss, as before
    assert select_model({"classical": 1.0, "net": 0.999})["chosen"] == "net"


def test_snr_column_does_not_reward_temporal_smoothing_of_noise():
    rng = np.random.default_rng(7)
    noise = rng.poisson(2.0, (20, 192, 192)).astype(np.float32)  # no signal at all
    methods = {"raw": (noise, 0), "gaussian2d": (gaussian2d(noise, 1.0), 0),
               "gaussian3d": (gaussian3d(noise, 1.0), 2),
               "gaussian3d_wide": (gaussian3d(noise, (2.0, 1.0, 1.0)), 4),
               "mean5": (ndimage.uniform_filter1d(noise, 5, axis=0, mode="reflect"), 2)}
    assert neighbour_corr(methods["gaussian3d"][0], 1) > 0.3  # what lag 1 (SHINE) measures: shared frames
    for name, (stack, reach) in methods.items():
        df = compute_metrics({name: stack}, noise, reaches={name: reach})
        assert df.snr_lag[0] == 2 * max(2, reach) + 1
        assert abs(df.snr_corr[0]) < 0.02, name
    table = compute_metrics({k: v[0] for k, v in methods.items()}, noise, reaches={k: v[1] for k, v in methods.items()})
    assert (table.snr_lag == 9).all() and (table.snr_corr.abs() < 0.02).all()


def test_snr_column_still_rewards_denoising_a_static_scene(static_counting_movie):
    m = static_counting_movie
    df = compute_metrics({"raw": m.noisy, "gaussian3d": gaussian3d(m.noisy, 1.0)}, m.noisy,
                         reaches={"raw": 0, "gaussian3d": 2}).set_index("method")
    assert df.loc["gaussian3d", "snr_db"] > df.loc["raw", "snr_db"] + 3.0


# --------------------------------------------------------------------------- per frame, residual
def test_umse_per_frame_averages_to_umse():
    from emdenoise.metrics import umse_per_frame, upsnr_per_frame

    denoised, noisy = _tiny()
    per = umse_per_frame(denoised, noisy)
    # frames 1, 2 scored (t = r+1 .. T-r-3), by hand as in test_umse_by_hand: 16 - 4.5, 1 - 0.5
    np.testing.assert_allclose(per, [np.nan, 11.5, 0.5, np.nan, np.nan])
    assert np.nanmean(per) == pytest.approx(umse(denoised, noisy))
    np.testing.assert_allclose(upsnr_per_frame(denoised, noisy, peak=20.0)[1:3], 10 * np.log10(400 / per[1:3]))
    rng = np.random.default_rng(0)
    y = rng.normal(size=(14, 16, 16))
    f = 0.5 * y
    for r in (0, 2, 5):
        assert np.nanmean(umse_per_frame(f, y, temporal_radius=r)) == pytest.approx(umse(f, y, temporal_radius=r))
        assert np.isfinite(umse_per_frame(f, y, temporal_radius=r)).sum() == 14 - 2 * r - 3
    with pytest.raises(InputError, match="at least 16 frames"):
        umse_per_frame(f, y, temporal_radius=6)


def test_noise_length_white_and_psf_correlated():
    from emdenoise.metrics import noise_length

    rng = np.random.default_rng(1)
    white = rng.normal(size=(8, 64, 64))
    assert noise_length(white) == 0
    blurred = ndimage.gaussian_filter(white, (0, 1.5, 1.5))  # detector PSF: noise correlated over ~3 px
    assert 2 <= noise_length(blurred) <= 5


def moving_particles(n_frames=24, shape=(64, 64), dose=4.0, speed=1.5, seed=0):
    """A lattice (simulate_movie) with 3 bright particles moving ``speed`` px/frame:
    (noisy counting movie, clean movie)."""
    rng = np.random.default_rng(seed)
    base = simulate_movie(1, shape, dose=dose, max_drift=0.0, seed=seed).clean[0].astype(np.float64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    clean = np.repeat(base[None], n_frames, axis=0)
    for _ in range(3):
        c = rng.uniform(16, shape[0] - 16, 2)
        v = rng.normal(size=2)
        v *= speed / np.linalg.norm(v)
        for t in range(n_frames):
            cy, cx = c + v * (t - n_frames / 2)
            clean[t] += dose * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0 ** 2))
    return rng.poisson(clean).astype(np.float32), clean.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_residual_structure_flags_temporal_over_smoothing_of_a_dynamic_scene(seed):
    from emdenoise.metrics import residual_structure

    noisy, clean = moving_particles(seed=seed)
    smooth = gaussian3d(noisy, (6.0, 0.0, 0.0))  # averages ~25 frames: the moving particles smear
    good = clean + np.random.default_rng(9).normal(scale=0.3, size=clean.shape).astype(np.float32)
    bad = residual_structure(smooth, noisy, lag=13)  # > its temporal reach, ceil(2 x 6)
    assert bad["structure"], bad
    assert bad["spatial"] > 0.25
    ok = residual_structure(good, noisy, lag=13)
    assert not ok["structure"], ok
    assert abs(ok["spatial"]) < 0.15 and abs(ok["signal_share"]) < 0.1
    # per frame: every frame of the over-smoothed movie holds the particles
    assert np.mean([v > 0.1 for v in bad["spatial_frames"].values()]) > 0.5


def test_residual_structure_share_of_a_removed_lattice():
    """A spatial blur that removes lattice contrast puts a persistent share of the signal in
    the residual (the low-pass check cannot see fringes finer than its sigma); the
    estimate is unbiased by spatially correlated (PSF) noise."""
    from emdenoise.metrics import residual_structure

    movie = simulate_movie(16, (96, 96), mode="linear", dose=4.0, max_drift=0.0, seed=4)
    blurred = gaussian2d(movie.noisy, 2.5)
    res = residual_structure(blurred, movie.noisy, lag=1)
    assert res["structure"] and res["signal_share"] > 0.2, res
    clean = residual_structure(movie.clean, movie.noisy, lag=1)
    assert not clean["structure"] and abs(clean["signal_share"]) < 3 * clean["signal_share_se"] + 0.02, clean


def test_residual_share_allows_the_shrinkage_every_denoiser_applies():
    """At low dose every good denoiser removes the weak fine detail (a Wiener filter would):
    the tuned Gaussian 3D leaves 9-24 % of the persistent signal in its residual, which the
    check without a reference flagged (share > 0.05 and > 3 standard errors, as on the real
    Au movie for every method); measured against the share an ideal linear filter over the
    same frames leaves (signal_share_ref), it is not flagged -- while a spatial blur that
    removes lattice contrast beyond it still is (previous test)."""
    from emdenoise.filters import blind_gaussian3d
    from emdenoise.metrics import residual_structure

    m = simulate_movie(24, (96, 96), mode="linear", dose=4.0, max_drift=0.0, seed=4)
    y = m.noisy.astype(np.float32)
    tuned = blind_gaussian3d(y, 2, max_reach=6)
    res = residual_structure(tuned.denoised, y, lag=tuned.reach + 1, reach=tuned.reach)
    assert res["signal_share"] > max(0.05, 3 * res["signal_share_se"]), res  # the old rule's flag
    assert res["signal_share_ref"] > 0.02 and not res["structure"], res
    blurred = residual_structure(gaussian2d(y, 2.5), y, lag=1, reach=0)
    assert blurred["structure"] and blurred["signal_share"] - blurred["signal_share_ref"] > 0.05, blurred


def test_checks_on_large_frames_measure_their_central_region(monkeypatch):
    """Frames above metrics.CHECK_PX pixels: the noise-length and residual checks measure
    the central region (memory bounded whatever the frame size), giving exactly what they
    give on that region cut out, and say which region; smaller frames are measured whole."""
    from emdenoise import metrics
    from emdenoise.metrics import noise_length, residual_structure

    movie = simulate_movie(12, (96, 80), mode="linear", dose=4.0, max_drift=0.0, seed=5)
    blurred = gaussian2d(movie.noisy, 2.0)
    whole = residual_structure(blurred, movie.noisy, lag=2)
    assert whole["region"] is None
    monkeypatch.setattr(metrics, "CHECK_PX", 48 * 40)
    part = residual_structure(blurred, movie.noisy, lag=2)
    y0, y1, x0, x1 = part["region"]
    assert (y1 - y0) * (x1 - x0) <= 48 * 40 and (y0, x0) == ((96 - (y1 - y0)) // 2, (80 - (x1 - x0)) // 2)
    monkeypatch.setattr(metrics, "CHECK_PX", 10**9)
    cut = residual_structure(blurred[:, y0:y1, x0:x1], movie.noisy[:, y0:y1, x0:x1], lag=2)
    assert {k: v for k, v in part.items() if k != "region"} == {k: v for k, v in cut.items() if k != "region"}
    assert part != whole  # another region: other numbers (the test would pass on whole frames otherwise)
    monkeypatch.setattr(metrics, "CHECK_PX", 48 * 40)
    assert noise_length(movie.noisy) == noise_length(movie.noisy[:, y0:y1, x0:x1])
