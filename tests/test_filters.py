"""FFT low-pass (WCVD paper SM 2): mean kept, high frequencies removed, low ones passed,
per-axis normalised frequencies on non-square frames, no wrap-around ringing."""
import numpy as np
import pytest

from emdenoise.filters import fft_lowpass


def _wave(shape, freq, axis):
    """cos(2 pi f (i + 0.5)) along one axis -- aligned with the DCT, so the mirror
    extension is smooth and the tests see the mask, not the edge handling."""
    n = shape[axis]
    c = np.cos(2 * np.pi * freq * (np.arange(n) + 0.5)).astype(np.float32)
    return np.broadcast_to(c[:, None] if axis == 0 else c[None, :], shape).copy()


@pytest.mark.parametrize("pad", ["symmetric", "periodic"])
@pytest.mark.parametrize("diameter", [None, 1 / 3])
def test_keeps_the_mean_of_every_frame(pad, diameter):
    rng = np.random.default_rng(0)
    stack = rng.poisson(2.0, (3, 40, 52)).astype(np.float32) + np.arange(3, dtype=np.float32)[:, None, None]
    out = fft_lowpass(stack, diameter, pad=pad)
    assert out.shape == stack.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(axis=(1, 2)), stack.mean(axis=(1, 2)), rtol=1e-5)
    assert out.std(axis=(1, 2)).max() < 0.6 * stack.std(axis=(1, 2)).min()  # and it smooths the noise


@pytest.mark.parametrize("pad", ["symmetric", "periodic"])
def test_removes_high_and_passes_low_frequencies(pad):
    shape = (64, 64)
    # paper default diameter N/7: cutoff 1/14 cycles/px
    hi = _wave(shape, 8 / 64, 1)       # period 8 px: above the cutoff
    lo = _wave(shape, 2 / 64, 1)       # period 32 px: below it
    out_hi = fft_lowpass(hi[None], None, pad=pad)[0]
    out_lo = fft_lowpass(lo[None], None, pad=pad)[0]
    assert np.abs(out_hi).max() < 1e-4
    np.testing.assert_allclose(out_lo, lo, atol=1e-4)
    # the released code's N/3 (cutoff 1/6 cycles/px, our default) passes the 8 px period
    np.testing.assert_allclose(fft_lowpass(hi[None], pad=pad)[0], hi, atol=1e-4)
    np.testing.assert_allclose(fft_lowpass(hi[None], 1 / 3, pad=pad)[0], hi, atol=1e-4)
    assert np.abs(fft_lowpass(_wave(shape, 12 / 64, 1)[None], pad=pad)).max() < 1e-4  # 5.3 px period
    # diameter=None: the paper rule N/ks_max; N/5 (cutoff 1/10) removes the 8 px period, N/3 keeps it
    assert np.abs(fft_lowpass(hi[None], None, ks_max=5, pad=pad)).max() < 1e-4
    np.testing.assert_allclose(fft_lowpass(hi[None], None, ks_max=3, pad=pad)[0], hi, atol=1e-4)


def test_non_square_frames_use_cycles_per_pixel_on_both_axes():
    shape = (48, 96)  # cutoff (N/7) = 1/14 = 0.0714 cycles/px on both axes
    for axis in (0, 1):
        n = shape[axis]
        passed = _wave(shape, 3 / 48, axis)   # 0.0625 cycles/px
        removed = _wave(shape, 4 / 48, axis)  # 0.0833 cycles/px
        np.testing.assert_allclose(fft_lowpass(passed[None], None)[0], passed, atol=1e-4,
                                   err_msg=f"axis {axis}, n={n}")
        assert np.abs(fft_lowpass(removed[None], None)[0]).max() < 1e-4, f"axis {axis}"


def test_diagonal_frequency_uses_the_radius():
    # (0.06, 0.06) cycles/px: each axis below 1/14 but the radius 0.085 is above it
    y = (np.arange(64) + 0.5)[:, None]
    x = (np.arange(64) + 0.5)[None, :]
    img = (np.cos(2 * np.pi * 0.0625 * y) * np.cos(2 * np.pi * 0.0625 * x)).astype(np.float32)
    assert np.abs(fft_lowpass(img, None)).max() < 1e-4


def test_no_wraparound_ringing_on_a_ramp():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))[None]
    sym = fft_lowpass(ramp, None)  # mirror extension: no jump between opposite edges
    per = fft_lowpass(ramp, None, pad="periodic")  # the FFT sees a sawtooth
    assert np.abs(sym - ramp).max() < 0.02
    assert np.abs(per - ramp).max() > 0.3  # what the test protects against


def test_symmetric_mode_equals_fft_of_the_mirrored_frame():
    rng = np.random.default_rng(1)
    img = rng.random((1, 30, 44)).astype(np.float32)
    ext = np.pad(img[0], ((0, 30), (0, 44)), mode="symmetric")  # (60, 88), periodic and even
    fy, fx = np.fft.fftfreq(60), np.fft.fftfreq(88)
    mask = np.hypot(fy[:, None], fx[None, :]) <= (1 / 3) / 2
    ref = np.real(np.fft.ifft2(np.fft.fft2(ext) * mask))[:30, :44]
    np.testing.assert_allclose(fft_lowpass(img, 1 / 3)[0], ref, atol=1e-5)


def test_soft_edge_and_2d_input_and_errors():
    rng = np.random.default_rng(2)
    img = rng.random((32, 32)).astype(np.float32)
    soft = fft_lowpass(img, 1 / 3, edge_width=0.5)
    assert soft.shape == img.shape
    assert not np.allclose(soft, fft_lowpass(img, 1 / 3))
    with pytest.raises(ValueError):
        fft_lowpass(img, pad="reflect-ish")
    with pytest.raises(ValueError):
        fft_lowpass(img, 0.0)
    with pytest.raises(ValueError):
        fft_lowpass(np.zeros((2, 2, 2, 2)))
