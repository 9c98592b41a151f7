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

__all__ = ["SyntheticMovie", "simulate_movie", "simulate_scene", "simulate_tilt_series", "drift_path"]


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


def _detect(electrons: np.ndarray, mode: str, psf_sigma: float, gain: float, offset: float,
            read_noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Detector model shared by every simulator: ``(clean, noisy)`` float64 (T, Y, X).

    electrons: (T, Y, X) float64 mean electrons per pixel (>= 0).  Counting mode:
    ``clean = electrons``, ``noisy = Poisson(electrons)`` (counts/px).  Linear mode
    (detector units): ``clean = gain * (electrons (*) PSF) + offset`` and ``noisy = gain *
    (Poisson(electrons) (*) PSF) + offset + Normal(0, read_noise)``, the PSF a per-frame
    Gaussian of ``psf_sigma`` px (reflected borders), so the shot noise is spatially
    correlated exactly as a scintillator / integrating camera correlates it.
    """
    counts = rng.poisson(electrons).astype(np.float64)
    if mode == "counting":
        return electrons, counts
    blur = (0.0, psf_sigma, psf_sigma)
    clean = gain * ndimage.gaussian_filter(electrons, blur, mode="reflect") + offset
    noisy = (gain * ndimage.gaussian_filter(counts, blur, mode="reflect") + offset
             + rng.normal(scale=read_noise, size=counts.shape))
    return clean, noisy


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

    clean, noisy = _detect(electrons, mode, psf_sigma, gain, offset, read_noise, rng)
    return SyntheticMovie(noisy=noisy.astype(np.float32), clean=clean.astype(np.float32),
                          shifts=shifts, params=params)


# ----------------------------------------------------------------------------------------
# Realistic scenes for the ground-truth benchmark (bench/bench_quality.py)
# ----------------------------------------------------------------------------------------

def _fourier_field(canvas: tuple[int, int], rng: np.random.Generator, sigma_fine: float,
                   sigma_coarse: float | None) -> np.ndarray:
    """rfft2 coefficients of a random, strictly band-limited, zero-mean, unit-variance field.

    White Gaussian noise on the periodic ``canvas`` (Yc, Xc) filtered by the radial band-pass
    ``exp(-2 pi^2 sigma_fine^2 k^2) - exp(-2 pi^2 sigma_coarse^2 k^2)`` (k in cycles/px;
    ``sigma_coarse=None``: low-pass only), set to zero above 0.4 cycles/px.  Being
    band-limited and periodic, the field has an exact continuous interpolant, so a
    sub-pixel shift (a phase ramp, :func:`_shifted_field`) is exact, not an interpolation.
    """
    ky = np.fft.fftfreq(canvas[0])[:, None]
    kx = np.fft.rfftfreq(canvas[1])[None, :]
    k2 = ky ** 2 + kx ** 2
    h = np.exp(-2 * np.pi ** 2 * sigma_fine ** 2 * k2)
    if sigma_coarse is not None:
        h = h - np.exp(-2 * np.pi ** 2 * sigma_coarse ** 2 * k2)
    h[k2 > 0.4 ** 2] = 0.0
    h[0, 0] = 0.0
    spec = np.fft.rfft2(rng.normal(size=canvas)) * h
    std = np.fft.irfft2(spec, s=canvas).std()
    return spec / (std if std > 0 else 1.0)


def _shifted_field(spec: np.ndarray, canvas: tuple[int, int], shape: tuple[int, int], margin: int,
                   shift) -> np.ndarray:
    """(Y, X) float64 view of a band-limited periodic field displaced by ``shift`` = (dy, dx) px.

    ``out[y, x] == field(y + margin - dy, x + margin - dx)`` for the field's exact
    (trigonometric) interpolant; needs ``|dy|, |dx| <= margin`` so nothing wraps into view.
    """
    ky = np.fft.fftfreq(canvas[0])[:, None]
    kx = np.fft.rfftfreq(canvas[1])[None, :]
    ramp = np.exp(-2j * np.pi * (ky * shift[0] + kx * shift[1]))
    full = np.fft.irfft2(spec * ramp, s=canvas)
    return full[margin:margin + shape[0], margin:margin + shape[1]]


@dataclass
class _Particle:
    """One crystalline particle, in frame-0 specimen pixel coordinates (before stage drift)."""

    centre: np.ndarray      # (2,) y, x px
    radius: float           # px, at full size
    spacing: float          # lattice-fringe period, px
    angle: float            # fringe orientation, rad
    lattice: str            # 'square' (two fringe sets at 90 deg), 'hex' (three at 60 deg), 'fringes' (one)
    amp: float              # fringe contrast (relative intensity) at full thickness
    absorb: float           # mass-thickness darkening at full thickness
    phase: np.ndarray       # (3,) fringe phases
    # dynamics, in units of s = t / event_frames
    kind: str = "static"    # 'move' | 'rotate' | 'grow' | 'dissolve' | 'static'
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))   # px per unit s (oscillation amplitude)
    wobble: float = 1.0      # oscillation period of the motion, units of s
    omega: float = 0.0       # rotation, rad per unit s
    s_end: float = np.inf    # dissolve: radius -> 0 at s = s_end
    s_grow: float = 1.0      # grow: radius 0.3 -> 1 of full over s in [0, s_grow]

    def state(self, s: float):
        """(centre, radius, angle) at time s."""
        c = self.centre + self.velocity * self.wobble / (2 * np.pi) * np.sin(2 * np.pi * s / self.wobble)
        r = self.radius
        if self.kind == "dissolve":
            r = self.radius * np.sqrt(max(0.0, 1.0 - s / self.s_end))
        elif self.kind == "grow":
            r = self.radius * min(1.0, 0.3 + 0.7 * s / self.s_grow)
        return c, r, self.angle + self.omega * s


def _render_particle(out: np.ndarray, yy: np.ndarray, xx: np.ndarray, p: _Particle, s: float,
                     contrast: np.ndarray) -> None:
    """Add one particle's relative intensity to ``out`` (Y, X) in place.

    Projected thickness of a sphere ``sqrt(1 - rho^2 / r^2)`` times (``-absorb`` +
    ``amp * contrast * lattice``), the lattice a sum of cosines of period ``spacing``
    evaluated analytically at the pixel centres ``(yy, xx)`` (already in specimen
    coordinates, i.e. with the stage drift removed) - exact at any position and angle.
    """
    c, r, ang = p.state(s)
    if r < 0.5:
        return
    y0, y1 = np.searchsorted(yy, [c[0] - r - 1, c[0] + r + 2])
    x0, x1 = np.searchsorted(xx, [c[1] - r - 1, c[1] + r + 2])
    if y1 <= y0 or x1 <= x0:
        return
    dy = (yy[y0:y1] - c[0])[:, None]
    dx = (xx[x0:x1] - c[1])[None, :]
    thick = np.sqrt(np.clip(1.0 - (dy ** 2 + dx ** 2) / r ** 2, 0.0, 1.0))
    n_sets = {"fringes": 1, "square": 2, "hex": 3}[p.lattice]
    step = np.pi / 2 if p.lattice == "square" else np.pi / 3
    lat = np.zeros_like(thick)
    for i in range(n_sets):
        a = ang + i * step
        lat += np.cos(2 * np.pi * (dy * np.sin(a) + dx * np.cos(a)) / p.spacing + p.phase[i])
    lat /= n_sets
    out[y0:y1, x0:x1] += thick * (-p.absorb + p.amp * contrast[y0:y1, x0:x1] * lat)


def _make_particles(shape, rng, n_particles, spacings, dynamic) -> list[_Particle]:
    """Non-overlapping (at t = 0) particles of random size, lattice, spacing and orientation."""
    lo = min(shape)
    particles: list[_Particle] = []
    kinds = ["move", "rotate", "grow", "dissolve"]
    for tries in range(400):
        if len(particles) >= n_particles:
            break
        radius = float(rng.uniform(0.06, 0.14) * lo)
        centre = rng.uniform([radius + 4, radius + 4], [shape[0] - radius - 4, shape[1] - radius - 4])
        if any(np.hypot(*(centre - q.centre)) < radius + q.radius + 6 for q in particles):
            continue
        i = len(particles)
        p = _Particle(centre=centre, radius=radius, spacing=float(spacings[i % len(spacings)]),
                      angle=float(rng.uniform(0, np.pi)), lattice=["square", "hex", "fringes"][int(rng.integers(3))],
                      amp=float(rng.uniform(0.15, 0.45)), absorb=float(rng.uniform(0.1, 0.3)),
                      phase=rng.uniform(0, 2 * np.pi, size=3))
        if dynamic:
            p.kind = kinds[i % len(kinds)]
            p.wobble = float(rng.uniform(0.8, 2.0))
            speed = 8.0 if p.kind == "move" else 1.5          # px per unit s
            p.velocity = rng.normal(size=2) / np.sqrt(2) * speed
            p.omega = float(rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)) if p.kind == "rotate" else \
                float(rng.normal(scale=0.05))                  # rad per unit s (15-30 deg)
            p.s_end = float(rng.uniform(0.4, 1.2))
            p.s_grow = float(rng.uniform(0.5, 1.0))
        particles.append(p)
    return particles


def simulate_scene(
    n_frames: int = 30,
    shape: tuple[int, int] = (192, 192),
    *,
    mode: str = "counting",
    dose: float = 1.0,
    max_drift: float = 0.0,
    dynamic: bool = False,
    event_frames: float = 40.0,
    n_particles: int | None = None,
    spacings: tuple[float, ...] = (3.5, 5.0, 7.0, 9.5),
    support_contrast: float = 0.12,
    psf_sigma: float = 1.0,
    gain: float = 100.0,
    offset: float = 100.0,
    read_noise: float = 5.0,
    seed: int = 0,
) -> SyntheticMovie:
    """A realistic HRTEM field of view: amorphous support, several crystalline particles.

    How each element is made, and why (the scene should flatter no denoiser):

    - **Amorphous support**: white Gaussian noise band-pass filtered (:func:`_fourier_field`,
      grain ~1-6 px, nothing above 0.4 cycles/px), i.e. random texture with no repeats,
      which non-local methods (BM4D) cannot match against copies and which a spatial
      Gaussian blurs away. Amplitude ``support_contrast`` (relative intensity).
    - **Contrast varying across the field**: a second, smooth field (~25 px) modulates
      the support texture and the particles' fringe contrast (0.3-1.6 x), plus a weak
      mass-thickness variation of the mean, so no single global filter strength is right
      everywhere.
    - **Crystalline particles** (``n_particles``, default one per ~5000 px^2): projected
      spheres (radius 6-14 % of the frame) that darken by mass thickness and carry lattice
      fringes - one set, a square (90 deg) or a hexagonal (60 deg) lattice - with periods
      cycling through ``spacings`` (px; 3.5 px is near the highest frequency a detector
      PSF lets through) at random orientations, evaluated analytically at pixel centres.
    - **Dynamics** (``dynamic=True``): each particle does one thing, cycling through
      *move* (oscillates ~8 px per ``event_frames``), *rotate* (15-30 deg per
      ``event_frames``), *grow* (radius 30 % -> 100 %) and *dissolve* (radius -> 0 after
      0.4-1.2 ``event_frames``), all others jitter slightly. Rates are per frame, so a
      long movie sees more change: averaging many frames blurs the fringes of a rotating
      or moving particle, and a video denoiser must follow the scene.
    - **Stage drift** (``max_drift`` px, 0 = static): the whole specimen moves along
      :func:`drift_path` (smooth, sub-pixel). Exact: particles are analytic functions
      evaluated at ``(y - dy, x - dx)``; support and contrast fields are band-limited
      and periodic on a padded canvas and shifted by a Fourier phase ramp, so with
      ``dynamic=False`` ``clean[t](y, x) == clean[0](y - dy, x - dx)`` (same sign as
      :func:`simulate_movie`) up to floating point, away from the borders.
    - **Dose**: the relative intensity (clipped at 0.05) is scaled so that the mean of
      ``clean`` over the whole movie is ``dose`` electrons/px/frame (counting mode); the
      incident dose is the same in every frame, so a dissolving particle brightens its
      frame slightly, as on a real detector.
    - **Detector**: :func:`_detect`, the same models as :func:`simulate_movie`: counting
      (Poisson, independent noise; e.g. 0.25 / 1 / 4 e-/px) or linear (gain, offset,
      read noise, Gaussian PSF ``psf_sigma`` 0.7-1.5 px correlating the noise).

    Returns
    -------
    SyntheticMovie
        ``noisy`` / ``clean`` (T, Y, X) float32 (counts/px or detector units), ``shifts``
        (T, 2) float64 stage drift in px; ``params`` holds every setting and, under
        ``'particles'``, each particle's lattice, spacing and dynamics.
    """
    if mode not in ("counting", "linear"):
        raise InputError(None, f"simulate_scene: mode must be 'counting' or 'linear', got {mode!r}")
    if n_frames < 1:
        raise InputError(None, f"simulate_scene: n_frames must be >= 1, got {n_frames}")
    if dose <= 0:
        raise InputError(None, f"simulate_scene: dose must be > 0, got {dose}")
    shape = (int(shape[0]), int(shape[1]))
    params = dict(kind="scene", n_frames=n_frames, shape=shape, mode=mode, dose=dose, max_drift=max_drift,
                  dynamic=dynamic, event_frames=event_frames, n_particles=n_particles,
                  spacings=tuple(spacings), support_contrast=support_contrast, psf_sigma=psf_sigma,
                  gain=gain, offset=offset, read_noise=read_noise, seed=seed)
    rng = np.random.default_rng(seed)
    if n_particles is None:
        n_particles = max(3, int(round(shape[0] * shape[1] / 5000)))
    shifts = drift_path(n_frames, max_drift, rng)
    from scipy.fft import next_fast_len
    margin = int(np.ceil(max_drift)) + 8
    canvas = (next_fast_len(shape[0] + 2 * margin, real=True), next_fast_len(shape[1] + 2 * margin, real=True))
    support = _fourier_field(canvas, rng, 0.9, 6.0)
    modulation = _fourier_field(canvas, rng, 25.0, None)
    thickness = _fourier_field(canvas, rng, 12.0, None)
    particles = _make_particles(shape, rng, n_particles, spacings, dynamic)
    params["particles"] = [dict(kind=p.kind, lattice=p.lattice, spacing=p.spacing, radius=round(p.radius, 2),
                                centre=[round(float(v), 2) for v in p.centre]) for p in particles]

    relative = np.empty((n_frames,) + shape, dtype=np.float64)
    y_img = np.arange(shape[0], dtype=np.float64)
    x_img = np.arange(shape[1], dtype=np.float64)
    for t in range(n_frames):
        shift = shifts[t]
        contrast = np.clip(1.0 + 0.35 * _shifted_field(modulation, canvas, shape, margin, shift), 0.3, 1.6)
        frame = (1.0 + 0.05 * _shifted_field(thickness, canvas, shape, margin, shift)
                 + support_contrast * contrast * _shifted_field(support, canvas, shape, margin, shift))
        s = t / event_frames if dynamic else 0.0
        for p in particles:  # specimen coordinates of the pixel centres: (y - dy, x - dx)
            _render_particle(frame, y_img - shift[0], x_img - shift[1], p, s, contrast)
        relative[t] = frame
    electrons = np.clip(relative, 0.05, None)
    electrons *= dose / electrons.mean()
    clean, noisy = _detect(electrons, mode, psf_sigma, gain, offset, read_noise, rng)
    return SyntheticMovie(noisy=noisy.astype(np.float32), clean=clean.astype(np.float32),
                          shifts=shifts, params=params)


def simulate_tilt_series(
    n_tilts: int = 41,
    shape: tuple[int, int] = (128, 128),
    *,
    max_tilt: float = 60.0,
    thickness: float = 48.0,
    dose: float = 4.0,
    psf_sigma: float = 1.0,
    gain: float = 100.0,
    offset: float = 100.0,
    read_noise: float = 5.0,
    seed: int = 0,
) -> SyntheticMovie:
    """A cryo-ET-like tilt series: exact projections of a 3D phantom, linear-mode noise.

    The phantom is a slab of ice ``thickness`` px thick (z) holding spheres of three kinds:
    ~20 "macromolecules" (radius 3-7 px, weak density), 2-3 "vesicles" (spherical shells,
    radius 12-22 px, 2.5 px wall) and 4 gold fiducials (radius 2.5 px, very dense). The
    projection at tilt ``theta`` about the y axis is computed analytically (line integral
    of a ball of radius R at distance d from its centre: ``2 sqrt(R^2 - d^2)``; of the slab:
    ``thickness / cos(theta)``), supersampled 2 x 2 per pixel, so no rotate-and-sum
    interpolation ever touches the truth. Intensity is amplitude contrast,
    ``exp(-0.01 * projected density)`` x ``dose`` electrons/px, so high tilts are darker
    and noisier, as in real data. The detector is the linear model of :func:`_detect`
    (PSF-correlated shot noise, gain, offset, read noise). Adjacent "frames" are views a few
    degrees apart, so temporal averaging blurs anything off the tilt axis.

    Returns
    -------
    SyntheticMovie
        ``noisy`` / ``clean`` (n_tilts, Y, X) float32 in detector units, ``shifts`` zeros
        (n_tilts, 2); ``params['angles']`` the tilt angles in degrees (-max_tilt..max_tilt).
    """
    if n_tilts < 1:
        raise InputError(None, f"simulate_tilt_series: n_tilts must be >= 1, got {n_tilts}")
    if dose <= 0:
        raise InputError(None, f"simulate_tilt_series: dose must be > 0, got {dose}")
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    angles = np.linspace(-max_tilt, max_tilt, n_tilts)
    half_z = thickness / 2
    balls = []  # (y, x, z, radius, density); a shell is a ball minus a smaller one
    for _ in range(20):
        r = rng.uniform(3, 7)
        balls.append((rng.uniform(0, shape[0]), rng.uniform(-0.4, 0.4) * shape[1],
                      rng.uniform(-half_z + r, half_z - r), r, rng.uniform(0.6, 1.5)))
    for _ in range(int(rng.integers(2, 4))):
        r = rng.uniform(12, min(22, half_z - 1))
        y, x, z = rng.uniform(0, shape[0]), rng.uniform(-0.3, 0.3) * shape[1], rng.uniform(-half_z + r, half_z - r)
        balls += [(y, x, z, r, 1.2), (y, x, z, r - 2.5, -1.2)]
    for _ in range(4):
        balls.append((rng.uniform(0, shape[0]), rng.uniform(-0.35, 0.35) * shape[1],
                      rng.uniform(-half_z + 3, half_z - 3), 2.5, 30.0))
    sub = np.array([-0.25, 0.25])
    ys = (np.arange(shape[0])[:, None] + sub[None, :]).ravel()            # (2Y,)
    xs = (np.arange(shape[1])[:, None] + sub[None, :]).ravel() - (shape[1] - 1) / 2
    proj = np.empty((n_tilts,) + shape, dtype=np.float64)
    for i, theta in enumerate(np.deg2rad(angles)):
        acc = np.full((ys.size, xs.size), 0.3 * thickness / np.cos(theta))  # ice
        for y, x, z, r, rho in balls:
            xp = x * np.cos(theta) + z * np.sin(theta)
            d2 = (ys[:, None] - y) ** 2 + (xs[None, :] - xp) ** 2
            acc += rho * 2.0 * np.sqrt(np.clip(r * r - d2, 0.0, None))
        proj[i] = acc.reshape(shape[0], 2, shape[1], 2).mean(axis=(1, 3))
    electrons = dose * np.exp(-0.01 * proj)
    clean, noisy = _detect(electrons, "linear", psf_sigma, gain, offset, read_noise, rng)
    params = dict(kind="tilt_series", n_tilts=n_tilts, shape=shape, max_tilt=max_tilt, thickness=thickness,
                  dose=dose, psf_sigma=psf_sigma, gain=gain, offset=offset, read_noise=read_noise, seed=seed,
                  angles=angles.tolist())
    return SyntheticMovie(noisy=noisy.astype(np.float32), clean=clean.astype(np.float32),
                          shifts=np.zeros((n_tilts, 2)), params=params)
