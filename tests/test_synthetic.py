"""Synthetic movies: determinism, units, noise model and the drift sign convention."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.errors import InputError
from emdenoise.synthetic import _background_modes, _particle_columns, _render, simulate_movie


def test_shapes_dtypes_and_drift_path(counting_movie):
    m = counting_movie
    assert m.noisy.shape == m.clean.shape == (12, 160, 160)
    assert m.noisy.dtype == m.clean.dtype == np.float32
    assert m.shifts.shape == (12, 2) and m.shifts.dtype == np.float64
    np.testing.assert_array_equal(m.shifts[0], [0.0, 0.0])
    assert np.max(np.hypot(m.shifts[:, 0], m.shifts[:, 1])) == pytest.approx(8.0)
    # Smooth path: no frame-to-frame jump close to the whole drift.
    assert np.max(np.abs(np.diff(m.shifts, axis=0))) < 4.0
    assert m.params["seed"] == 0 and m.params["mode"] == "counting"


def test_deterministic_given_seed():
    a = simulate_movie(3, (64, 64), seed=5)
    b = simulate_movie(3, (64, 64), seed=5)
    c = simulate_movie(3, (64, 64), seed=6)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    np.testing.assert_array_equal(a.shifts, b.shifts)
    assert not np.array_equal(a.noisy, c.noisy)


def test_counting_mode_is_poisson_at_the_dose(static_counting_movie):
    m = static_counting_movie
    assert m.clean[0].mean() == pytest.approx(2.0, rel=1e-4)  # dose = mean counts/px
    assert np.all(m.noisy == np.round(m.noisy)) and m.noisy.min() >= 0  # counts
    assert m.noisy.mean() == pytest.approx(m.clean.mean(), rel=0.01)
    # Poisson: variance of (noisy - clean) equals the mean.
    assert np.var(m.noisy - m.clean) == pytest.approx(m.clean.mean(), rel=0.03)
    # The particle is there: clean has real contrast, not a flat field.
    assert m.clean.std() > 0.1 * m.clean.mean()


def test_linear_mode_units_and_correlated_noise(linear_movie):
    m = linear_movie
    assert 100 < m.clean.min() and m.clean.max() < 1000  # offset 100, gain 100, dose 1
    noise = (m.noisy - m.clean).astype(np.float64)
    assert abs(noise.mean()) < 1.0  # clean is the expected value
    # PSF sigma 1 px: neighbouring noise strongly correlated, far noise not.
    n = noise[0] - noise[0].mean()
    r1 = np.sum(n[:, :-1] * n[:, 1:]) / np.sqrt(np.sum(n[:, :-1] ** 2) * np.sum(n[:, 1:] ** 2))
    r6 = np.sum(n[:, :-6] * n[:, 6:]) / np.sqrt(np.sum(n[:, :-6] ** 2) * np.sum(n[:, 6:] ** 2))
    assert r1 > 0.6 and abs(r6) < 0.05


def test_render_shift_sign_is_content_displacement():
    """clean[t](y, x) == clean[0](y - dy, x - dx): a feature moves by +shift."""
    rng = np.random.default_rng(0)
    shape = (96, 96)
    pos, amps = _particle_columns(shape, 9.0, 25.0, 0.1, rng)
    modes = _background_modes(rng)
    ref = _render(shape, pos, amps, 1.6, modes, (0.0, 0.0), 0.15)
    moved = _render(shape, pos, amps, 1.6, modes, (3.0, -5.0), 0.15)
    # moved[y, x] == ref[y - 3, x + 5] on the overlap
    np.testing.assert_allclose(moved[3:, :-5], ref[:-3, 5:], rtol=0, atol=1e-9)
    assert not np.allclose(moved[:-3, 5:], ref[3:, :-5], atol=1e-3)


def test_dynamics_changes_the_specimen():
    static = simulate_movie(3, (64, 64), max_drift=0, seed=1)
    moving = simulate_movie(3, (64, 64), max_drift=0, dynamics=0.2, seed=1)
    np.testing.assert_allclose(static.clean[2], static.clean[0], atol=1e-6)
    assert np.abs(moving.clean[2] - moving.clean[0]).max() > 0.05


@pytest.mark.parametrize("kwargs", [{"mode": "analog"}, {"n_frames": 0}, {"dose": 0.0}])
def test_bad_parameters_raise_input_error(kwargs):
    args = {"n_frames": 2, "shape": (32, 32)} | kwargs
    with pytest.raises(InputError):
        simulate_movie(**args)
