"""Temporal reach of the classical filters and the Gaussian 3D tuned without ground
truth (Noise2Self J-invariance)."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.config import SHINEParams, WCVDParams
from emdenoise.drift import apply_shifts
from emdenoise.errors import InputError
from emdenoise.filters import blind_gaussian3d, gaussian3d, gaussian_reach, normalised_gaussian3d, temporal_reach
from emdenoise.metrics import psnr
from emdenoise.noise import estimate_blindspot
from emdenoise.synthetic import simulate_movie


def test_temporal_reach_of_every_method():
    assert temporal_reach("raw") == 0 and temporal_reach("gaussian2d") == 0
    assert [gaussian_reach(s) for s in (0, 0.5, 0.7, 1, 1.5, 2, 3)] == [0, 1, 2, 2, 3, 4, 6]
    assert temporal_reach("gaussian3d", sigma=1.0) == 2
    assert temporal_reach("classical", sigma=(1.5, 1.0, 1.0)) == 3
    assert temporal_reach("wcvd", params=WCVDParams(kt=7)) == 3
    assert temporal_reach("wcvd", params=WCVDParams(dims=2)) == 0
    assert temporal_reach("shine", params=SHINEParams(frames=7)) == 3
    with pytest.raises(InputError):
        temporal_reach("wcvd")
    with pytest.raises(InputError):
        temporal_reach("gaussian3d", sigma=-1.0)


@pytest.mark.parametrize("sigma_t", [0.5, 1.0, 1.5])
def test_gaussian3d_output_depends_only_on_frames_within_its_reach(sigma_t):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(12, 16, 16)).astype(np.float32)
    reach, t = gaussian_reach(sigma_t), 5
    base = gaussian3d(y, (sigma_t, 1.0, 1.0))
    outside, inside = y.copy(), y.copy()
    outside[t + reach + 1] += 100.0
    outside[t - reach - 1] += 100.0
    inside[t + reach] += 100.0
    np.testing.assert_array_equal(gaussian3d(outside, (sigma_t, 1.0, 1.0))[t], base[t])
    assert np.abs(gaussian3d(inside, (sigma_t, 1.0, 1.0))[t] - base[t]).max() > 1e-3


@pytest.mark.parametrize("b", [0, 1, 2])
@pytest.mark.parametrize("p", [(0, 0, 0), (3, 7, 9), (7, 14, 1)])  # first frame / corner, interior, last frame / edge
def test_j_invariant_output_ignores_the_masked_region(b, p):
    rng = np.random.default_rng(1)
    y = rng.poisson(3.0, (8, 15, 17)).astype(np.float32)
    t, py, px = p
    ref = normalised_gaussian3d(y, 1.0, 1.0, blind_radius=b)
    changed = y.copy()
    window = changed[t, max(0, py - b):py + b + 1, max(0, px - b):px + b + 1]  # a view: clipped at the border
    window += rng.uniform(50, 100, size=window.shape).astype(np.float32)
    assert normalised_gaussian3d(changed, 1.0, 1.0, blind_radius=b)[p] == pytest.approx(ref[p], abs=1e-4)
    # ... while a pixel just outside the window, and the plain filter, do see it
    ring = y.copy()
    ring[t, py, px + b + 1] += 100.0
    assert abs(normalised_gaussian3d(ring, 1.0, 1.0, blind_radius=b)[p] - ref[p]) > 1e-3
    assert abs(normalised_gaussian3d(changed, 1.0, 1.0)[p] - normalised_gaussian3d(y, 1.0, 1.0)[p]) > 1e-3


def test_normalised_gaussian3d_keeps_a_constant_and_matches_scipy_inside():
    flat = np.full((9, 20, 20), 3.0, np.float32)
    np.testing.assert_allclose(normalised_gaussian3d(flat, 1.0, 1.0), 3.0, rtol=1e-6)
    np.testing.assert_allclose(normalised_gaussian3d(flat, 1.0, 1.0, blind_radius=1), 3.0, rtol=1e-6)
    rng = np.random.default_rng(2)
    y = rng.normal(size=(9, 20, 20)).astype(np.float32)
    inner = (4, slice(5, 15), slice(5, 15))  # kernel fully inside the movie: no border effect
    np.testing.assert_allclose(normalised_gaussian3d(y, 1.0, 1.0)[inner], gaussian3d(y, 1.0)[inner], atol=1e-5)


def _movies():
    """A counting movie (independent noise) and a linear-mode movie (PSF-correlated
    noise), both drifting 6 px and aligned by whole pixels, with their ground truth."""
    for kw in (dict(mode="counting", dose=1.0), dict(mode="linear", psf_sigma=1.0)):
        m = simulate_movie(16, (96, 96), max_drift=6.0, seed=5, **kw)
        y, _ = apply_shifts(m.noisy, m.shifts)
        x, _ = apply_shifts(m.clean, m.shifts)
        yield kw["mode"], np.asarray(y, np.float32), np.asarray(x, np.float32)


@pytest.mark.parametrize("output", ["plain", "jinv"])
def test_blind_tuning_is_within_0p3_db_of_the_oracle(output):
    for mode, y, x in _movies():
        b = estimate_blindspot(y)["blindspot"] // 2
        assert (b == 0) if mode == "counting" else (b >= 1)
        res = blind_gaussian3d(y, b, output=output)
        assert res.denoised.shape == y.shape and res.denoised.dtype == np.float32
        assert res.reach == gaussian_reach(res.sigma[0])
        scored = res.scores.dropna()
        # any reach is scored (up to the whole movie): the loss needs no unseen frames
        assert len(scored) >= 60 and scored.reach.max() >= y.shape[0]
        assert res.loss == pytest.approx(float(scored.loss.min()))
        oracle = max(psnr(normalised_gaussian3d(y, r.sigma_t, r.sigma_yx,
                                                blind_radius=b if output == "jinv" else None), x)
                     for r in scored.itertuples())
        blind = psnr(res.denoised, x)
        assert blind > oracle - 0.3, (mode, res.sigma, blind, oracle)
        # the non-J-invariant loss would pick the least smoothing (it rewards copying the noise)
        naive = min(scored.itertuples(), key=lambda r: np.mean((normalised_gaussian3d(y, r.sigma_t, r.sigma_yx) - y) ** 2))
        assert psnr(normalised_gaussian3d(y, naive.sigma_t, naive.sigma_yx), x) < oracle - 3.0


def test_blind_gaussian3d_rejects_bad_input():
    y = np.zeros((3, 8, 8), np.float32)
    with pytest.raises(InputError, match="max_reach"):
        blind_gaussian3d(y, max_reach=-1)
    with pytest.raises(InputError):
        blind_gaussian3d(np.zeros((8, 8)))
    with pytest.raises(InputError):
        blind_gaussian3d(np.zeros((6, 8, 8)), blind_radius=-1)
    with pytest.raises(InputError):
        blind_gaussian3d(np.zeros((6, 8, 8)), output="best")
