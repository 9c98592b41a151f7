"""NL-means of a temporal Gaussian average: the second classical filter of `model: auto`
(emdenoise.filters.blind_nlm / temporal_nlm, chosen by emdenoise.pipeline.classical_candidate)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emdenoise import filters, io, metrics, pipeline
from emdenoise.errors import InputError
from emdenoise.noise import estimate_blindspot
from emdenoise.synthetic import simulate_movie, simulate_tilt_series

SETTING = (5, 6, 1.0)  # patch, search distance, h


@pytest.fixture(scope="module")
def tilt():
    """A 21 x 64² cryo-ET-like tilt series (smooth objects, PSF-correlated noise)."""
    return simulate_tilt_series(21, (64, 64), dose=4.0, psf_sigma=1.0, seed=3)


@pytest.mark.parametrize("t", [0, 4, 9])  # first, interior and last frame
def test_blind_nlm_output_frame_never_depends_on_its_own_input_frame(t):
    rng = np.random.default_rng(0)
    y = rng.poisson(4.0, (10, 24, 24)).astype(np.float32)
    ref, _ = filters.temporal_nlm(y, 1.5, *SETTING, noise_sd=2.0, blind=True)
    changed = y.copy()
    changed[t] += rng.uniform(50, 100, changed[t].shape).astype(np.float32)  # the whole frame
    out, _ = filters.temporal_nlm(changed, 1.5, *SETTING, noise_sd=2.0, blind=True)
    np.testing.assert_array_equal(out[t], ref[t])
    # ... while the frames around it, and the plain version of frame t, do see it
    other = t + 1 if t + 1 < len(y) else t - 1
    assert np.abs(out[other] - ref[other]).max() > 1e-2
    plain_ref, _ = filters.temporal_nlm(y, 1.5, *SETTING, noise_sd=2.0)
    plain, _ = filters.temporal_nlm(changed, 1.5, *SETTING, noise_sd=2.0)
    assert np.abs(plain[t] - plain_ref[t]).max() > 1e-2


def test_blind_nlm_loss_is_the_mse_plus_the_noise_variance():
    """Noise2Self: the blind version's loss against the noisy frames = its MSE against the
    truth + the noise variance (independent noise), so it ranks settings by their MSE."""
    m = simulate_movie(12, (48, 48), dose=50.0, max_drift=0.0, seed=2)
    y, x = m.noisy.astype(np.float32), m.clean.astype(np.float64)
    out, loss = filters.temporal_nlm(y, 2.0, *SETTING, noise_sd=np.sqrt(50.0), blind=True)
    mse = np.mean((out - x) ** 2, axis=(1, 2))
    noise = np.mean((y - x) ** 2, axis=(1, 2))
    assert np.mean(loss) == pytest.approx(np.mean(mse + noise), rel=0.03)


def test_temporal_noise_factor_matches_the_average_of_pure_noise():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(9, 96, 96)).astype(np.float32)
    for blind in (False, True):
        avg = filters._temporal_average(y, 1.5, blind, None, None)
        fac = filters.temporal_noise_factor(9, 1.5, blind)
        np.testing.assert_allclose(avg.std(axis=(1, 2)), fac, rtol=0.05)
        if not blind:  # the plain average is the Gaussian 3D with sigma_yx 0
            np.testing.assert_allclose(avg, filters.normalised_gaussian3d(y, 1.5, 0.0), rtol=1e-5, atol=1e-6)
    assert filters.temporal_noise_factor(5, 0.5, True)[0] < np.inf


def test_nlm_beats_the_tuned_gaussian_on_a_tilt_series_and_is_chosen(tilt):
    y = tilt.noisy.astype(np.float32)
    b = estimate_blindspot(y)["blindspot"] // 2
    den, attrs = pipeline.classical_candidate(y, b)
    gauss, g_attrs = pipeline.classical_candidate(y, b, nlm=False)
    assert attrs["filter"] == "nlm" and attrs["nlm"]["chosen"] and g_attrs["filter"] == "gaussian3d"
    assert g_attrs["nlm"] == {"skipped": "off"}
    assert attrs["n2s_loss"] < attrs["gaussian"]["n2s_loss"] == pytest.approx(g_attrs["n2s_loss"])
    assert attrs["sigma"] == [attrs["nlm"]["sigma_t"], 0.0, 0.0]
    assert attrs["temporal_reach"] == filters.gaussian_reach(attrs["nlm"]["sigma_t"])
    assert len(attrs["n2s_loss_frames"]) == len(y) and len(attrs["nlm"]["scores"]) == 12
    # the truth agrees with the self-supervised choice (measured: 26.1 vs 25.0 dB)
    assert metrics.psnr(den, tilt.clean) > metrics.psnr(gauss, tilt.clean) + 0.5
    # the recorded blind version is the one scored
    blind = pipeline.classical_blind(y, attrs)
    assert metrics.self_supervised_loss(blind, y) == pytest.approx(attrs["n2s_loss"], rel=1e-6)


def test_the_gaussian_stays_where_nlm_is_not_better():
    """A low-dose counting movie: NL-means' patch distances drown in shot noise."""
    m = simulate_movie(16, (64, 64), dose=1.0, max_drift=0.0, seed=5)
    den, attrs = pipeline.classical_candidate(m.noisy.astype(np.float32), 0)
    assert attrs["filter"] == "gaussian3d" and not attrs["nlm"]["chosen"]
    assert attrs["nlm"]["n2s_loss"] >= attrs["gaussian"]["n2s_loss"] == attrs["n2s_loss"]
    np.testing.assert_array_equal(den, filters.normalised_gaussian3d(m.noisy, *attrs["sigma"][:2]))


def test_nlm_is_skipped_with_a_reason(monkeypatch):
    y = np.full((4, 16, 16), 3.0, dtype=np.float32)
    _, attrs = pipeline.classical_candidate(y, 0)
    assert attrs["filter"] == "gaussian3d" and "no measurable noise" in attrs["nlm"]["skipped"]
    monkeypatch.setattr(pipeline, "NLM_MAX_PIXELS", 100)
    rng = np.random.default_rng(0)
    _, attrs = pipeline.classical_candidate(rng.poisson(3.0, (4, 16, 16)).astype(np.float32), 0)
    assert "over 100 px" in attrs["nlm"]["skipped"]


def test_nlm_streams_zarr_to_zarr_with_the_in_memory_values(tmp_path, tilt):
    y = tilt.noisy.astype(np.float32)
    b = estimate_blindspot(y)["blindspot"] // 2
    ref, ref_attrs = pipeline.classical_candidate(y, b)
    io.write_zarr(tmp_path / "in.zarr", y, pyramid=False)
    lazy, _ = io.read_zarr(tmp_path / "in.zarr")
    record = pipeline.classical_zarr(lazy, b, tmp_path / "classical.zarr", pyramid=False)
    out, attrs = io.read_zarr(tmp_path / "classical.zarr")
    assert record["filter"] == attrs["filter"] == "nlm"
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert attrs["n2s_loss"] == pytest.approx(ref_attrs["n2s_loss"], rel=1e-9)
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.iterdir() if "scratch" in p.name]


def test_nlm_refuses_bad_settings():
    y = np.ones((4, 8, 8), dtype=np.float32)
    with pytest.raises(InputError, match="sigma_t > 0"):
        filters.temporal_nlm(y, 0.0, *SETTING, noise_sd=1.0)
    with pytest.raises(InputError, match="noise_sd"):
        filters.blind_nlm(y, 1.0, noise_sd=0.0)


def test_nlm_losses_over_a_region_are_the_metrics_ones(tilt):
    """What the chain compares on a drift canvas: the loss over the region every frame covers."""
    y = tilt.noisy.astype(np.float32)
    region = (slice(3, 60), slice(5, 50))
    blind, losses = filters.temporal_nlm(y, 2.0, *SETTING, noise_sd=50.0, blind=True, region=region)
    np.testing.assert_allclose(losses, metrics.self_supervised_loss_per_frame(blind, y, region), rtol=1e-6)
    attrs = {"filter": "nlm", "nlm": {"sigma_t": 2.0, "patch": 5, "distance": 6, "h": 1.0, "noise_sd": 50.0}}
    np.testing.assert_array_equal(pipeline.classical_blind(y, attrs), blind)


@pytest.mark.parametrize("shift, chosen", [(-0.5, "gaussian3d"), (-3.0, "nlm")])
def test_nlm_replaces_the_gaussian_only_when_significantly_lower(monkeypatch, shift, chosen):
    """The networks' rule (metrics.select_model): lower by SELECT_MIN_Z standard errors of the
    per-frame difference, else the Gaussian."""
    rng = np.random.default_rng(1)
    y = rng.poisson(3.0, (12, 32, 32)).astype(np.float32)
    g = filters.blind_gaussian3d(y, 0, output="none")
    d = rng.normal(size=len(y))
    d = (d - d.mean()) / d.std(ddof=1) * 1e-3 * g.loss  # per-frame differences of known spread
    frames = g.loss_frames + d + shift * 1e-3 * g.loss / np.sqrt(len(y))  # mean lower by |shift| SE

    def fake(stack, sigma_t, **kw):
        return filters.BlindNLM(sigma_t=sigma_t, patch=5, distance=6, h=1.0, noise_sd=kw["noise_sd"],
                                loss=float(frames.mean()), loss_frames=frames,
                                scores=pd.DataFrame(columns=["patch", "distance", "h", "loss"]))

    monkeypatch.setattr(filters, "blind_nlm", fake)
    _, attrs = pipeline.classical_candidate(y, 0)
    assert attrs["filter"] == chosen and attrs["nlm"]["chosen"] == (chosen == "nlm")
    assert attrs["nlm"]["z"] == pytest.approx(shift, abs=1e-6)


def test_the_report_says_what_nlm_did():
    from emdenoise.metrics import nlm_sentence as _nlm_sentence

    rec = {"sigma_t": 2.0, "patch": 13, "distance": 15, "h": 0.7, "z": -3.14, "chosen": True}
    assert _nlm_sentence(rec) == ("NL-means of the temporal average (sigma_t 2 frames), patch 13 px, search 15 px, "
                                  "h 0.7 × its noise SD, z -3.1 against the tuned Gaussian: chosen over the Gaussian")
    assert _nlm_sentence({**rec, "z": None, "chosen": False}).endswith("SD: not chosen")
    assert _nlm_sentence({"skipped": "off"}) == "NL-means not tried (off)"
