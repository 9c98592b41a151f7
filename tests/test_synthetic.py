"""Synthetic movies: determinism, units, noise model and the drift sign convention."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise.errors import InputError
from emdenoise.synthetic import (_background_modes, _particle_columns, _render, simulate_movie, simulate_scene,
                                 simulate_tilt_series)


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


# --- realistic scenes (bench/bench_quality.py) -------------------------------------------

@pytest.mark.parametrize("dose", [0.25, 1.0, 4.0])
def test_scene_counting_truth_nonnegative_and_dose(dose):
    m = simulate_scene(4, (64, 80), dose=dose, seed=3)
    assert m.noisy.shape == m.clean.shape == (4, 64, 80) and m.clean.dtype == np.float32
    assert m.clean.min() > 0
    assert m.clean.mean() == pytest.approx(dose, rel=1e-5)  # mean electrons/px/frame
    assert np.all(m.noisy == np.round(m.noisy)) and m.noisy.min() >= 0
    assert m.noisy.mean() == pytest.approx(dose, rel=0.1)
    assert m.clean.std() > 0.1 * dose  # particles and support give real contrast


def test_scene_linear_uses_the_detector_model():
    m = simulate_scene(3, (64, 64), mode="linear", dose=2.0, psf_sigma=1.5, seed=4)
    assert m.clean.min() >= 100  # offset, non-negative signal on top
    noise = (m.noisy - m.clean)[0].astype(np.float64)
    n = noise - noise.mean()
    r1 = np.sum(n[:, :-1] * n[:, 1:]) / np.sum(n * n)
    assert r1 > 0.7  # PSF sigma 1.5 px correlates neighbours


def test_scene_drift_is_smooth_subpixel_and_bounded():
    m = simulate_scene(6, (64, 64), max_drift=7.3, seed=5)
    assert np.max(np.hypot(m.shifts[:, 0], m.shifts[:, 1])) == pytest.approx(7.3)
    assert np.any(np.abs(m.shifts[1:] - np.round(m.shifts[1:])) > 0.1)  # really sub-pixel
    np.testing.assert_array_equal(m.shifts[0], [0.0, 0.0])


def test_scene_drift_shifts_are_exact(monkeypatch):
    """clean[t](y, x) == clean[0](y - dy, x - dx), for whole and sub-pixel shifts alike.

    The path is forced so that frames 1 and 2 are both sub-pixel away from frame 0 but a
    whole number of pixels (3, -2) from each other, and frame 3 is (4, 5) from frame 0:
    then the relation can be checked pixel for pixel, with no interpolation in the test.
    """
    from emdenoise import synthetic

    path = np.array([[0.0, 0.0], [0.4, 0.7], [3.4, -1.3], [4.0, 5.0]])
    monkeypatch.setattr(synthetic, "drift_path", lambda n, d, rng: path.copy())
    m = synthetic.simulate_scene(4, (80, 72), max_drift=6.0, mode="counting", support_contrast=0.2, seed=8)
    np.testing.assert_array_equal(m.shifts, path)
    c = m.clean.astype(np.float64)
    np.testing.assert_allclose(c[2][3:, :-2], c[1][:-3, 2:], rtol=0, atol=2e-6)   # (3, -2)
    np.testing.assert_allclose(c[3][4:, 5:], c[0][:-4, :-5], rtol=0, atol=2e-6)   # (4, 5)
    assert np.abs(c[1] - c[0]).max() > 0.05  # a sub-pixel move does change the frame


def test_scene_dynamic_changes_between_frames_static_does_not():
    static = simulate_scene(5, (96, 96), seed=6)
    dyn = simulate_scene(5, (96, 96), dynamic=True, event_frames=4.0, seed=6)
    np.testing.assert_allclose(static.clean[4], static.clean[0], rtol=1e-5)
    change = np.abs(dyn.clean[1:] - dyn.clean[:-1]).max(axis=(1, 2))
    assert np.all(change > 0.05 * dyn.clean.mean())  # every frame differs from the last
    kinds = {p["kind"] for p in dyn.params["particles"]}
    assert {"move", "rotate", "grow"} <= kinds


def test_tilt_series_shape_angles_and_truth():
    ts = simulate_tilt_series(21, (48, 64), seed=7)
    assert ts.noisy.shape == ts.clean.shape == (21, 48, 64)
    assert ts.params["angles"][0] == -60 and ts.params["angles"][-1] == 60
    assert ts.clean.min() >= 100  # offset + non-negative electrons
    # Ice path grows as 1/cos(theta): the 0 deg view is the brightest on average.
    means = ts.clean.mean(axis=(1, 2))
    assert np.argmax(means) == 10 and means[10] > means[0]
    assert not np.allclose(ts.clean[0], ts.clean[-1])  # the views really differ
