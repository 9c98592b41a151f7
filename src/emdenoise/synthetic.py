"""Synthetic low-dose HRTEM movies with known ground truth and known drift.

A roughly circular crystalline nanoparticle (Gaussian atomic columns on a slightly
rotated square lattice) sits on a weak amorphous background. Every frame is rendered
analytically at its own continuous (sub-pixel) position, so the true drift is exact:
no interpolation ever touches the clean images. Two detector models:

- ``'counting'``: electron counting, ``noisy = Poisson(clean)``, ``clean`` in mean
  counts per pixel (``dose`` on average). Noise is independent between pixels.
- ``'linear'``: integrating detector, electrons are counted, blurred by the detector
  point-spread function (so the noise becomes spatially correlated), multiplied by a
  gain, offset, plus Gaussian read noise::

      noisy = gain * (Poisson(e) (*) PSF) + offset + Normal(0, read_noise)
      clean = gain * (e (*) PSF) + offset            # = E[noisy]

Sign convention of the drift (shared with :mod:`emdenoise.drift`): ``shifts[t] =
(dy, dx)`` is the displacement of the specimen in frame ``t`` relative to frame 0, in
pixels: ``clean[t](y, x) == clean[0](y - dy, x - dx)`` (away from the borders).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import erf

from .errors import InputError

__all__ = ["SyntheticMovie", "simulate_movie", "drift_path"]


@dataclass
class SyntheticMovie:
    """A simulated movie and its ground truth.

    Attributes
    ----------
    noisy : (T, Y, X) float32
        What the detector records.
    clean : (T, Y, X) float32
        Expected value of ``noisy`` (same units), i.e. the ground truth.
    shifts : (T, 2) float64
        True drift ``(dy, dx)`` in pixels of frame ``t`` relative to frame 0
        (``shifts[0] == 0``); see the module docstring for the sign.
    params : dict
        Every parameter used, including the seed, for provenance.
    """

    noisy: np.ndarray
    clean: np.ndarray
    shifts: np.ndarray
    params: dict = field(default_factory=dict)


def drift_path(n_frames: int, max_drift: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random sub-pixel drift path.

    The velocity does a random walk (a specimen stage drifts with inertia, it does not
    jump), the path is its cumulative sum, rescaled so that ``max_t |shift[t]|`` (the
    Euclidean length) equals ``max_drift``.

    Returns
    -------
    (n_frames, 2) float64 array of ``(dy, dx)`` in pixels, ``path[0] == (0, 0)``.
    """
    path = np.zeros((n_frames, 2))
    if n_frames < 2 or max_drift <= 0:
        return path
    velocity = rng.normal(size=2) + np.cumsum(rng.normal(scale=0.3, size=(n_frames - 1, 2)), axis=0)
    path[1:] = np.cumsum(velocity, axis=0)
    longest = np.max(np.hypot(path[:, 0], path[:, 1]))
    return path * (max_drift / longest) if longest > 0 else path


def _pixel_integrated_gaussian(coords: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """1D Gaussian of unit area integrated over each pixel [c - 0.5, c + 0.5].

    coords: (N,) pixel centres; centres: (K,) Gaussian centres. Returns (K, N).
    Integrating over the pixel rather than point-sampling keeps the total intensity of a
    column independent of its sub-pixel position, so drift changes nothing but position.
    """
    scale = 1.0 / (np.sqrt(2.0) * sigma)
    upper = (coords[None, :] + 0.5 - centres[:, None]) * scale
    lower = (coords[None, :] - 0.5 - centres[:, None]) * scale
    return 0.5 * (erf(upper) - erf(lower))


def _particle_columns(shape, spacing, radius, rotation, rng):
    """Atomic-column positions (K, 2) in frame-0 pixel coordinates and amplitudes (K,).

    The outline is a circle with small random low-order harmonics ("roughly circular");
    the amplitude grows with the projected thickness of a sphere, so the edge is faint.
    """
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    n = int(np.ceil(1.5 * radius / spacing)) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    cos_r, sin_r = np.cos(rotation), np.sin(rotation)
    # A small random origin offset so columns do not sit exactly on pixel centres.
    off = rng.uniform(0, spacing, size=2)
    ly = spacing * (cos_r * i - sin_r * j) + off[0]
    lx = spacing * (sin_r * i + cos_r * j) + off[1]
    theta = np.arctan2(ly, lx)
    harm = rng.normal(scale=0.04, size=4)
    outline = radius * (1 + harm[0] * np.cos(2 * theta) + harm[1] * np.sin(2 * theta)
                        + harm[2] * np.cos(3 * theta) + harm[3] * np.sin(3 * theta))
    dist = np.hypot(ly, lx)
    inside = dist < outline
    thickness = np.sqrt(np.clip(1.0 - (dist / outline) ** 2, 0.0, 1.0))
    amps = 0.35 + 0.65 * thickness
    pos = np.stack([ly[inside] + cy, lx[inside] + cx], axis=1)
    return pos, amps[inside]


def _background_modes(rng, n_modes=24):
    """Random low-frequency plane waves for the amorphous support (frequencies in cycles/px)."""
    freq = rng.uniform(0.01, 0.08, size=n_modes)
    angle = rng.uniform(0, 2 * np.pi, size=n_modes)
    k = np.stack([freq * np.sin(angle), freq * np.cos(angle)], axis=1)
    phase = rng.uniform(0, 2 * np.pi, size=n_modes)
    amp = rng.normal(size=n_modes) / np.sqrt(n_modes)
    return k, phase, amp


def _render(shape, pos, amps, sigma, modes, shift, background_contrast):
    """Noise-free relative intensity (Y, X) float64 with the specimen displaced by ``shift``.

    Columns are separable Gaussians, so the whole particle is one matrix product
    ``G_y^T diag(a) G_x`` - exact at any sub-pixel shift and fast.
    """
    yy = np.arange(shape[0], dtype=np.float64)
    xx = np.arange(shape[1], dtype=np.float64)
    gy = _pixel_integrated_gaussian(yy, pos[:, 0] + shift[0], sigma)
    gx = _pixel_integrated_gaussian(xx, pos[:, 1] + shift[1], sigma)
    # Normalise so a column's peak is about its amplitude above the background.
    peak = _pixel_integrated_gaussian(np.zeros(1), np.zeros(1), sigma)[0, 0] ** 2
    particle = (gy.T * (amps / peak)) @ gx
    # Plane waves cos(k.(p - shift) + phase) split with cos(a + b) = cos a cos b - sin a sin b
    # into separable factors, again a matrix product instead of a (modes, Y, X) array.
    k, phase, amp = modes
    ay = 2 * np.pi * k[:, 0, None] * (yy[None, :] - shift[0])
    ax = 2 * np.pi * k[:, 1, None] * (xx[None, :] - shift[1]) + phase[:, None]
    texture = (np.cos(ay).T * amp) @ np.cos(ax) - (np.sin(ay).T * amp) @ np.sin(ax)
    return 1.0 + background_contrast * texture + particle


def simulate_movie(
    n_frames: int = 20,
    shape: tuple[int, int] = (256, 256),
    *,
    mode: str = "counting",
    spacing: float = 9.0,
    column_sigma: float = 1.6,
    dose: float = 1.0,
    max_drift: float = 10.0,
    psf_sigma: float = 1.0,
    gain: float = 100.0,
    offset: float = 100.0,
    read_noise: float = 5.0,
    particle_radius: float = 0.3,
    rotation: float | None = None,
    background_contrast: float = 0.15,
    dynamics: float = 0.0,
    seed: int = 0,
) -> SyntheticMovie:
    """Simulate a drifting low-dose movie of a crystalline nanoparticle.

    Parameters
    ----------
    n_frames : int
        Number of frames ``T`` (>= 1).
    shape : (int, int)
        Frame size ``(Y, X)`` in pixels.
    mode : {'counting', 'linear'}
        Detector model, see the module docstring.
    spacing : float
        Distance between neighbouring atomic columns, pixels.
    column_sigma : float
        Standard deviation of each column's Gaussian, pixels.
    dose : float
        Mean electrons per pixel per frame (counting mode: mean counts/px of
        ``clean``; sensible range about 0.5-5).
    max_drift : float
        Largest drift ``|shift|`` along the path, pixels (0 = static scene).
    psf_sigma : float
        Linear mode only: sigma in pixels of the Gaussian detector PSF that blurs each
        electron over neighbouring pixels (makes the noise spatially correlated).
    gain, offset, read_noise : float
        Linear mode only: detector units per electron, constant offset, and standard
        deviation of the additive Gaussian read noise (detector units).
    particle_radius : float
        Particle radius as a fraction of ``min(Y, X)``.
    rotation : float or None
        Lattice rotation in radians; None draws a small random one from ``seed``.
    background_contrast : float
        Relative amplitude of the amorphous-support texture (1 = mean background).
    dynamics : float
        Relative standard deviation per frame of a random walk of each column's
        intensity (0 = static specimen apart from drift).
    seed : int
        Seed of everything random; the output is deterministic given it.

    Returns
    -------
    SyntheticMovie
        ``noisy`` and ``clean`` as ``(T, Y, X)`` float32, ``shifts`` ``(T, 2)`` float64.
    """
    if mode not in ("counting", "linear"):
        raise InputError(None, f"simulate_movie: mode must be 'counting' or 'linear', got {mode!r}")
    if n_frames < 1:
        raise InputError(None, f"simulate_movie: n_frames must be >= 1, got {n_frames}")
    if dose <= 0:
        raise InputError(None, f"simulate_movie: dose must be > 0, got {dose}")
    shape = (int(shape[0]), int(shape[1]))
    params = dict(n_frames=n_frames, shape=shape, mode=mode, spacing=spacing,
                  column_sigma=column_sigma, dose=dose, max_drift=max_drift,
                  psf_sigma=psf_sigma, gain=gain, offset=offset, read_noise=read_noise,
                  particle_radius=particle_radius, rotation=rotation,
                  background_contrast=background_contrast, dynamics=dynamics, seed=seed)

    rng = np.random.default_rng(seed)
    if rotation is None:
        rotation = float(rng.uniform(-0.3, 0.3))
        params["rotation_used"] = rotation
    radius = particle_radius * min(shape)
    pos, amps = _particle_columns(shape, spacing, radius, rotation, rng)
    modes = _background_modes(rng)
    shifts = drift_path(n_frames, max_drift, rng)

    relative = np.empty((n_frames,) + shape, dtype=np.float64)
    column_amps = amps.copy()
    for t in range(n_frames):
        if t > 0 and dynamics > 0:
            column_amps = np.clip(column_amps * (1 + rng.normal(scale=dynamics, size=amps.shape)), 0, None)
        relative[t] = _render(shape, pos, column_amps, column_sigma, modes, shifts[t], background_contrast)
    # Scale so that frame 0 averages `dose` electrons per pixel.
    electrons = np.clip(relative, 0, None) * (dose / relative[0].mean())

    counts = rng.poisson(electrons).astype(np.float64)
    if mode == "counting":
        clean, noisy = electrons, counts
    else:
        blur = (0.0, psf_sigma, psf_sigma)
        clean = gain * ndimage.gaussian_filter(electrons, blur, mode="reflect") + offset
        noisy = (gain * ndimage.gaussian_filter(counts, blur, mode="reflect") + offset
                 + rng.normal(scale=read_noise, size=counts.shape))
    return SyntheticMovie(noisy=noisy.astype(np.float32), clean=clean.astype(np.float32),
                          shifts=shifts, params=params)
