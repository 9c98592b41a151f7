"""Human-readable results: preview images, the combined metrics table, Markdown and HTML.

The HTML page embeds its images (base64) so it can be mailed or archived as one file.
"""
from __future__ import annotations

import base64
import html
import io as _bytesio
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from scipy import ndimage  # noqa: E402

from . import metrics as _metrics  # noqa: E402
from .io import atomic_path  # noqa: E402
from .stage import disk_usage  # noqa: E402

METRIC_COLUMNS = ["dataset", "method", "umse", "upsnr_db", "snr_db", "psnr_db", "ssim", "umse_radius"]


#: Pixels drawn by the display range's percentiles per panel: a strided sample above it
#: (every frame up to 1024² exactly; a 4096² frame's whole pixels of every method,
#: concatenated, took GBs).
RANGE_SAMPLE_PX = 2**20
#: Longest side of a frame handed to matplotlib in the preview (area-averaged down to it):
#: each panel is ~290 px wide in the PNG, and imshow keeps float64 copies of what it gets.
PREVIEW_PX = 1024


def display_range(stacks: Mapping[str, np.ndarray], frame: int) -> tuple[float, float]:
    """One (low, high) display range for every panel of a preview.

    Taken from the 1st and 99th percentiles of the *denoised* panels (all of them
    together) so that every method, and the raw frame, is shown at the same contrast;
    raw noise then clips, which is the honest comparison.  Frames above
    ``RANGE_SAMPLE_PX`` pixels contribute a strided sample of that many.
    """
    pool = [_sample(s[frame]) for name, s in stacks.items() if name != "raw"]
    if not pool:
        pool = [_sample(stacks["raw"][frame])]
    lo, hi = np.percentile(np.concatenate(pool), [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _sample(image) -> np.ndarray:
    """The pixels of an image, flattened, every k-th when it has more than
    ``RANGE_SAMPLE_PX`` (at most that many): what display ranges are taken from."""
    flat = np.asarray(image).ravel()
    return flat[::max(1, -(-flat.size // RANGE_SAMPLE_PX))]


def shrink(image, max_px: int = PREVIEW_PX) -> np.ndarray:
    """(Y, X) image area-averaged by the smallest whole factor that brings its longer
    side to ``max_px`` or less (float32; the last rows / columns that do not fill a
    block are dropped); the image itself when it is that small already."""
    img = np.asarray(image)
    f = -(-max(img.shape) // max_px)
    if f <= 1:
        return img
    ny, nx = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:ny, :nx].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3), dtype=np.float32)


def plot_preview(stacks: Mapping[str, np.ndarray], png_path: str | os.PathLike, *,
                 truth: np.ndarray | None = None, title: str = "", frame: int | None = None) -> None:
    """Middle frame of every (T, Y, X) stack side by side, same grey scale; PNG.  Frames
    larger than ``PREVIEW_PX`` are area-averaged down first (:func:`shrink`)."""
    panels = dict(stacks)
    if truth is not None:
        panels["ground truth"] = truth
    t = panels["raw"].shape[0] // 2 if frame is None else frame
    lo, hi = display_range(panels, t)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], panels.items()):
        ax.imshow(shrink(s[t]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}  frame {t}  (display range {lo:.3g}–{hi:.3g} for all panels)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90, format="png")
    plt.close(fig)


def collect_metrics(csv_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-dataset metrics tables; guarantees the standard columns."""
    table = pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True)
    for col in METRIC_COLUMNS:
        if col not in table:
            table[col] = np.nan
    rest = [c for c in table.columns if c not in METRIC_COLUMNS]
    return table[METRIC_COLUMNS + rest]


def _fmt(table: pd.DataFrame) -> pd.DataFrame:
    return table.round({"umse": 5, "upsnr_db": 2, "snr_db": 2, "snr_corr": 4, "psnr_db": 2, "ssim": 4})


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)
    except ImportError:
        return False
    return True


# =========================================================================== diagnostics
# Computed by the `metrics` rule (it holds every method's stack) and written as small
# files into {ds}/diagnostics/; the `report` rule embeds them. index.json lists them.

#: Classical (non-network) methods: the "best classical" reference of the report.
CLASSICAL = ("gaussian2d", "gaussian3d", "classical")
#: Longest side in px of a full-frame thumbnail (area-averaged); crops are native pixels.
THUMB_PX = 160
CROP_PX = 64
#: Overview warnings: largest drift |shift| (px) and blind-spot edge (px) still accepted.
DRIFT_WARN_PX = 10.0
BLINDSPOT_WARN = 7


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = np.array(img, np.float64)  # a copy, then in place: one float64 frame, not five
    scaled -= lo
    scaled /= hi - lo if hi > lo else 1.0
    scaled *= 255
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def _write_gray_png(path, img: np.ndarray, lo: float, hi: float, max_px: int | None = None) -> None:
    """8-bit greyscale PNG, ``lo``..``hi`` mapped to black..white (small: no colour map),
    area-averaged down to ``max_px`` on its longest side when larger."""
    from PIL import Image

    im = Image.fromarray(_to_uint8(img, lo, hi), mode="L")
    if max_px and max(im.size) > max_px:
        f = max_px / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BOX)
    im.save(path, format="PNG", optimize=True)


def thumb_scale(shape, max_px: int = THUMB_PX) -> float:
    """Native px per thumbnail px of a frame of ``shape`` (>= 1)."""
    return max(1.0, max(shape) / max_px)


def crop_box(image: np.ndarray, size: int = CROP_PX) -> tuple[int, int, int, int]:
    """(y0, x0, h, w): the ``size`` square (clipped to the frame) where the image varies
    most (largest local variance after a 1 px Gaussian that tames the noise)."""
    img = ndimage.gaussian_filter(np.asarray(image, np.float64), 1.0)
    ny, nx = img.shape
    h, w = min(size, ny), min(size, nx)
    mean = ndimage.uniform_filter(img, (h, w), mode="nearest")
    np.multiply(img, img, out=img)  # img is not needed after this: its square in place
    var = ndimage.uniform_filter(img, (h, w), mode="nearest")
    del img
    np.multiply(mean, mean, out=mean)
    var -= mean  # in place, the same values: frames of 4096² are 134 MB in float64
    # window centres whose window lies inside the frame
    cy0, cx0 = h // 2, w // 2
    valid = var[cy0: ny - (h - cy0) + 1, cx0: nx - (w - cx0) + 1]
    iy, ix = np.unravel_index(int(np.argmax(valid)), valid.shape)
    return int(iy), int(ix), int(h), int(w)


def radial_spectrum(frames, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of frames (mean removed, Hann window), averaged
    over the frames: (frequency in cycles/px at the bin centres, power).

    frames: (T, Y, X) array or any iterable of (Y, X) frames (read one at a time: memory
    a few float64 frames, whatever T).  The half-plane ``rfft2`` with the columns that
    stand for two conjugate frequencies counted twice gives the full plane's ring means.
    """
    from scipy import fft

    power = None
    count = 0
    for f in frames:
        f = np.array(f, dtype=np.float64)  # a copy: changed in place below
        if power is None:
            ny, nx = f.shape
            wy, wx = np.hanning(ny)[:, None], np.hanning(nx)[None, :]  # the 2D Hann window, separable
            power = np.zeros((ny, nx // 2 + 1))
        f -= f.mean()
        f *= wy
        f *= wx
        power += _metrics.abs_squared(fft.rfft2(f))
        del f
        count += 1
    if power is None:
        raise ValueError("radial_spectrum: no frames")
    power /= count * float(np.sum(wy ** 2) * np.sum(wx ** 2))
    weight = np.full(power.shape[1], 2.0)  # columns 1 .. nx/2 - 1 stand for +k and -k
    weight[0] = 1.0
    if nx % 2 == 0:
        weight[-1] = 1.0  # the Nyquist column has no mirror
    k = np.hypot(np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :])
    n_bins = n_bins or min(ny, nx) // 2
    edges = np.linspace(0, 0.5, n_bins + 1)
    idx = np.digitize(k, edges) - 1
    keep = (idx >= 0) & (idx < n_bins)
    w = np.broadcast_to(weight, power.shape)[keep]
    sums = np.bincount(idx[keep], power[keep] * w, n_bins)
    counts = np.bincount(idx[keep], w, n_bins)
    with np.errstate(invalid="ignore"):
        return 0.5 * (edges[1:] + edges[:-1]), np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def lattice_peak(image: np.ndarray, k_min: float = 0.03) -> dict:
    """The strongest non-DC peak of an image's power spectrum (a lattice's main reflection).

    Frequencies below ``k_min`` cycles/px (background, the window's leakage) are ignored.
    Returns ky, kx (cycles/px), period_px, angle_deg (of the wave vector: the direction
    *across* the fringes) and contrast (peak power / median power at that |k|; a clear
    lattice gives tens or more).
    """
    from scipy import fft

    img = np.array(image, np.float64)  # a copy, windowed in place
    ny, nx = img.shape
    img -= img.mean()
    img *= np.hanning(ny)[:, None]
    img *= np.hanning(nx)[None, :]
    # half plane (rfft2): a real image's power is symmetric, P(k) = P(-k), so every
    # reflection is there once, with kx >= 0 (half the memory of the full plane)
    power = _metrics.abs_squared(fft.rfft2(img))
    del img
    fy, fx = np.fft.fftfreq(ny), np.fft.rfftfreq(nx)
    k = np.hypot(fy[:, None], fx[None, :])
    i = np.unravel_index(int(np.argmax(np.where(k >= k_min, power, 0.0))), power.shape)
    kk = float(k[i])
    ring = np.abs(k - kk) <= 1.0 / min(ny, nx)
    # the full plane's ring: the columns that stand for +k and -k count twice
    mirrored = slice(1, (nx + 1) // 2)
    values = np.concatenate([power[ring], power[:, mirrored][ring[:, mirrored]]])
    background = float(np.median(values)) if values.size else 0.0
    ky, kx = float(fy[i[0]]), float(fx[i[1]])
    return {"ky": ky, "kx": kx, "period_px": 1.0 / kk if kk > 0 else float("nan"),
            "angle_deg": float(np.degrees(np.arctan2(ky, kx))),
            "contrast": float(power[i] / background) if background > 0 else float("inf")}


def line_profile(image: np.ndarray, centre, direction, length: float, width: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Intensity along a line through ``centre`` (y, x) in ``direction`` (dy, dx), ``length``
    px long, sampled every px (bilinear) and averaged over ``width`` parallel lines
    (1 px apart, perpendicular offsets: along lattice fringes when the line crosses
    them). Returns (position px from the centre, values)."""
    d = np.asarray(direction, np.float64)
    d = d / (np.linalg.norm(d) or 1.0)
    perp = np.array([-d[1], d[0]])
    s = np.arange(-(length // 2), length // 2 + 1, dtype=np.float64)
    offsets = np.arange(width) - (width - 1) / 2
    cy, cx = float(centre[0]), float(centre[1])
    ys = cy + s[None, :] * d[0] + offsets[:, None] * perp[0]
    xs = cx + s[None, :] * d[1] + offsets[:, None] * perp[1]
    vals = ndimage.map_coordinates(np.asarray(image, np.float64), [ys.ravel(), xs.ravel()], order=1, mode="nearest")
    return s, vals.reshape(len(offsets), len(s)).mean(axis=0)


def temporal_mean(stack) -> np.ndarray:
    """Mean over frames of a (T, Y, X) array-like: (Y, X) float64, accumulated frame by
    frame in order (the same sums as ``stack.mean(axis=0, dtype=float64)``), so a lazy
    (Zarr) stack is read one frame at a time."""
    if isinstance(stack, np.ndarray):
        return stack.mean(axis=0, dtype=np.float64)
    acc = np.zeros(tuple(stack.shape[1:]), dtype=np.float64)
    for t in range(stack.shape[0]):
        acc += np.asarray(stack[t], dtype=np.float64)
    return acc / stack.shape[0]


def write_diagnostics(out_dir, stacks: Mapping[str, np.ndarray], *, table: pd.DataFrame,
                      truth: np.ndarray | None = None, peak: float | None = None, frame: int | None = None,
                      frame_losses: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Everything the report shows about one dataset that needs the stacks.

    Parameters
    ----------
    out_dir : path
        Folder to create (must not exist); written in full or not at all by the caller.
    stacks : mapping name -> (T, Y, X)
        ``raw`` (the aligned noisy movie) and every denoised method.
    table : DataFrame
        The dataset's metrics (``emdenoise.metrics.compute_metrics``): the uMSE radius
        r and which methods are valid come from it, so the per-frame uPSNR averages to
        the table's; the residual check of each method uses lag max(r, its reach) + 1
        (its template frames lie outside what the method saw).
    truth : (T, Y, X) or None
    peak : float or None
        uPSNR's M (None: max of raw), as for the table.
    frame : int or None
        Frame shown (None: the middle one).
    frame_losses : mapping name -> T floats, or None
        ``auto``'s candidates' self-supervised loss per frame (what the model choice
        compared, recorded by the stage that made each: ``n2s_loss_frames``), written to
        ``per_frame_loss.csv`` for every candidate whatever its temporal reach (uPSNR per
        frame needs frames outside it).

    Writes ``index.json`` and small PNG / CSV files (see the keys of index.json); returns
    the index.

    The stacks (and ``truth``) may be lazy array-likes (Zarr): they are read frame by
    frame.  Memory: per method a (Y, X) float64 temporal mean and the shown frame's
    residual, 8 frames per method for the spectra and up to ~12 raw frames for the
    noise and residual checks (float64), whatever the number of frames.
    """
    out = Path(out_dir)
    out.mkdir(parents=True)
    raw = stacks["raw"]
    n = raw.shape[0]
    t = n // 2 if frame is None else int(frame)
    r = int(table.umse_radius.iloc[0])
    valid = dict(zip(table.method, table.umse_valid.astype(bool)))
    umse_by = dict(zip(table.method, table.umse))
    methods = [m for m in stacks if m != "raw"]
    panels = dict(stacks)
    if truth is not None:
        panels["truth"] = truth
    # crop where the best-scoring denoised frame varies most
    ranked = sorted((m for m in methods if valid.get(m) and umse_by.get(m) == umse_by.get(m)), key=umse_by.get)
    ref = np.asarray(panels[ranked[0] if ranked else ("truth" if truth is not None else "raw")][t], np.float64)
    y0, x0, h, w = crop_box(ref)
    lo, hi = display_range(panels, t)
    files = {"full": {}, "crop": {}, "residual": {}, "residual_mean": {}}
    for name, s in panels.items():
        f = np.asarray(s[t], np.float64)
        _write_gray_png(out / f"full_{name}.png", f, lo, hi, THUMB_PX)
        _write_gray_png(out / f"crop_{name}.png", f[y0:y0 + h, x0:x0 + w], lo, hi)
        files["full"][name], files["crop"][name] = f"full_{name}.png", f"crop_{name}.png"
    # residuals raw - denoised: one symmetric range (from the frame's raw noise) for all
    # only what is shown is kept: the crop of each frame residual, each mean residual as
    # float32, and a strided sample of those for their display range (frames of 4096²
    # and more: whole float64 residuals of every method, concatenated, took GBs)
    box = (slice(y0, y0 + h), slice(x0, x0 + w))
    raw_c = np.array(np.asarray(raw[t], np.float64)[box])  # a copy: not a view that keeps the frame
    res_t = {m: raw_c - np.asarray(stacks[m][t], np.float64)[box] for m in methods}  # crops, not views of frames
    raw_mean = temporal_mean(raw)
    res_mean = {}
    for m in methods:
        mean_m = temporal_mean(stacks[m])
        np.subtract(raw_mean, mean_m, out=mean_m)
        res_mean[m] = mean_m.astype(np.float32)
        del mean_m
    spread = float(np.percentile(np.abs(np.concatenate([v.ravel() for v in res_t.values()])), 99)) if res_t else 1.0
    spread_mean = float(np.percentile(np.abs(np.concatenate([_sample(v) for v in res_mean.values()])), 99.5)) \
        if res_mean else 1.0
    for m in methods:
        _write_gray_png(out / f"residual_{m}.png", res_t[m], -spread, spread)
        _write_gray_png(out / f"residual_mean_{m}.png", res_mean[m], -spread_mean, spread_mean, THUMB_PX)
        files["residual"][m], files["residual_mean"][m] = f"residual_{m}.png", f"residual_mean_{m}.png"
    # residual structure, at lag max(r, reach) + 1 (beyond the method's reach: also for a
    # method whose reach is too long for uMSE, e.g. the tuned Gaussian on a short movie)
    length = _metrics.noise_length(raw)
    reach_by = dict(zip(table.method, table.reach))
    residual = {}
    for m in methods:
        if m not in reach_by or n < 2:
            continue
        rs = _metrics.residual_structure(stacks[m], raw, lag=max(r, int(reach_by[m])) + 1, length=length,
                                         reach=int(reach_by[m]))
        rs["spatial_frames"] = {str(k): v for k, v in rs["spatial_frames"].items()}
        residual[m] = rs
    # per-frame uPSNR with the table's radius and peak
    pk = _metrics.stack_max(raw) if peak is None else float(peak)
    rows = []
    for name, s in stacks.items():
        if not valid.get(name, False):
            continue
        err = _metrics.umse_per_frame(s, raw, temporal_radius=r)
        ups = _metrics.upsnr_per_frame(s, raw, pk, temporal_radius=r)
        rows += [{"frame": i, "method": name, "umse": e, "upsnr_db": u} for i, (e, u) in enumerate(zip(err, ups))
                 if e == e]
    pd.DataFrame(rows, columns=["frame", "method", "umse", "upsnr_db"]).to_csv(out / "per_frame.csv", index=False)
    # per-frame self-supervised loss of the candidates (any reach)
    loss_rows = [{"frame": i, "method": name, "loss": float(v)}
                 for name, per in (frame_losses or {}).items() for i, v in enumerate(per)]
    pd.DataFrame(loss_rows, columns=["frame", "method", "loss"]).to_csv(out / "per_frame_loss.csv", index=False)
    # spectra (up to 8 frames spread over the movie)
    idx = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
    spec = []
    for name, s in panels.items():
        freq, power = radial_spectrum(s[int(i)] for i in idx)  # one frame at a time
        spec += [{"method": name, "freq": fq, "power": p} for fq, p in zip(freq, power)]
    pd.DataFrame(spec).to_csv(out / "spectra.csv", index=False)
    # line profile across the strongest lattice direction, through the crop centre
    peak_info = lattice_peak(raw_mean)
    centre = (y0 + h / 2 - 0.5, x0 + w / 2 - 0.5)
    period = peak_info["period_px"]
    length_px = int(min(max(h, w), max(16, 6 * period))) if period == period else min(h, w)
    prof = {}
    for name, s in panels.items():
        pos, vals = line_profile(np.asarray(s[t], np.float64), centre, (peak_info["ky"], peak_info["kx"]), length_px)
        prof["position_px"], prof[name] = pos, vals
    pd.DataFrame(prof).to_csv(out / "profile.csv", index=False)
    index = {
        "frame": t, "n_frames": n, "shape": list(raw.shape[1:]), "display_range": [lo, hi],
        "residual_range": [-spread, spread], "residual_mean_range": [-spread_mean, spread_mean],
        "crop": [y0, x0, h, w], "thumb_scale": thumb_scale(raw.shape[1:]),
        "methods": methods, "truth": truth is not None, "files": files, "umse_radius": r,
        "residual_lag": r + 1, "noise_length": length, "residual": residual, "lattice": peak_info,
        "profile": {"centre": list(centre), "length_px": length_px, "width_px": 5},
        "tables": {"per_frame": "per_frame.csv", "per_frame_loss": "per_frame_loss.csv", "spectra": "spectra.csv",
                   "profile": "profile.csv"},
    }
    (out / "index.json").write_text(json.dumps(index, indent=1, default=float))
    return index


# =========================================================================== the page
def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _small_png(path_or_bytes, max_width: int | None = None, colors: int = 64) -> bytes:
    """A PNG re-encoded small for embedding: palette of ``colors`` (plots: lossless in
    practice), optionally shrunk to ``max_width`` px. Greyscale images pass unchanged."""
    from PIL import Image

    data = Path(path_or_bytes).read_bytes() if not isinstance(path_or_bytes, bytes) else path_or_bytes
    im = Image.open(_bytesio.BytesIO(data))
    if im.mode == "L" and max_width is None:
        return data
    if max_width and im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    im = im.convert("RGB").quantize(colors=colors)
    buf = _bytesio.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _img_tag(data: bytes, alt: str, *, cls: str = "", scale: float = 1.0) -> str:
    from PIL import Image

    w, h = Image.open(_bytesio.BytesIO(data)).size
    return (f'<img src="{_png_uri(data)}" alt="{html.escape(alt)}" width="{round(w * scale)}" '
            f'height="{round(h * scale)}" decoding="async"' + (f' class="{cls}"' if cls else "") + ">")


def _fig_png(fig) -> bytes:
    buf = _bytesio.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return _small_png(buf.getvalue(), colors=48)


_COLOURS = {"raw": "#999999", "gaussian2d": "#8c6d31", "gaussian3d": "#1f77b4", "classical": "#17becf",
            "wcvd": "#d62728", "shine": "#9467bd", "truth": "#000000"}


def _style(name: str, chosen: str | None) -> dict:
    return {"color": _COLOURS.get(name, None), "lw": 2.2 if name == chosen else 1.0,
            "ls": "--" if name == "truth" else "-", "label": name + (" (chosen)" if name == chosen else "")}


def _plot_spectra(spec: pd.DataFrame, shown: list[str], chosen, lattice: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for name in shown:
        d = spec[spec.method == name]
        if len(d):
            ax.semilogy(d.freq, d.power, **_style(name, chosen))
    k = math.hypot(lattice.get("ky", 0.0), lattice.get("kx", 0.0))
    if k > 0:
        ax.axvline(k, color="#e377c2", lw=0.8, ls=":", label=f"lattice peak ({1 / k:.3g} px)")
    ax.set(xlabel="spatial frequency (cycles/px)", ylabel="power", title="radially averaged power spectrum")
    ax.legend(fontsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _fig_png(fig)


def _plot_profile(prof: pd.DataFrame, shown: list[str], chosen, lattice: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for name in shown:
        if name in prof:
            ax.plot(prof.position_px, prof[name], **_style(name, chosen))
    ax.set(xlabel=f"px across the fringes ({lattice.get('angle_deg', 0):.0f}°)", ylabel="intensity",
           title="line profile through the crop centre")
    ax.legend(fontsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _fig_png(fig)


def _plot_per_frame(per: pd.DataFrame, chosen, radius: int) -> bytes:
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for name, d in per.groupby("method", sort=False):
        ax.plot(d.frame, d.upsnr_db, marker="o", ms=2.5, **_style(name, chosen))
    ax.set(xlabel="frame", ylabel="uPSNR (dB)", title=f"uPSNR per frame (radius {radius})")
    ax.legend(fontsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _fig_png(fig)


def _plot_per_frame_loss(per: pd.DataFrame, chosen) -> bytes:
    """Each candidate's per-frame self-supervised loss relative to the lowest candidate's in
    that frame (%): the noise variance, the same for all, cancels in the ranking; a frame
    where a model fails (a sudden event) stands out."""
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    wide = per.pivot(index="frame", columns="method", values="loss")
    best = wide.min(axis=1)
    for name in wide.columns:
        ax.plot(wide.index, 100 * (wide[name] / best - 1), marker="o", ms=2.5, **_style(name, chosen))
    ax.set(xlabel="frame", ylabel="loss above the lowest (%)", title="self-supervised loss per frame")
    ax.legend(fontsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _fig_png(fig)


def _plot_training(logs: Mapping[str, pd.DataFrame], chosen) -> bytes:
    fig, ax = plt.subplots(figsize=(3.6, 2.6))
    for name, log in logs.items():
        st = _style(name, chosen)
        ax.plot(log.epoch, log.val_loss, color=st["color"], lw=st["lw"], label=f"{st['label']} val")
        ax.plot(log.epoch, log.train_loss, color=st["color"], lw=0.8, ls=":", label=f"{name} train")
    ax.set(xlabel="epoch", ylabel="loss", title="training curves")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.title.set_fontsize(8)
    fig.tight_layout()
    return _fig_png(fig)


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _f(x, fmt: str = ".2f", na: str = "–") -> str:
    v = _num(x)
    return na if v != v else format(v, fmt)


def footprint(results_dir, input_path) -> dict:
    """Disk use of one dataset's results folder against its input: {'bytes', 'files',
    'input_bytes', 'x_input'} (``stage.disk_usage``; x_input NaN for an empty input)."""
    used, files = disk_usage(results_dir)
    inp, _ = disk_usage(input_path)
    return {"bytes": used, "files": files, "input_bytes": inp, "x_input": used / inp if inp else float("nan")}


def dataset_summary(name: str, table: pd.DataFrame, *, choice: dict | None, index: dict | None,
                    drift: pd.DataFrame | None, blindspot: dict | None, footprint: dict | None = None,
                    drift_warn_px: float = DRIFT_WARN_PX, blindspot_warn: int = BLINDSPOT_WARN,
                    min_umse_frames: int = 5) -> dict:
    """One overview row: status, chosen model, gain over the best classical method, warnings.

    gain_db = uPSNR(chosen) - max uPSNR over CLASSICAL methods (those with a uPSNR); NaN
    when the tuned Gaussian (``classical``) has none (its reach exceeds what uMSE can
    score on this movie: a gain over the weaker baselines would flatter the model); 0
    when the tuned Gaussian is the choice.  warnings: residual structure in the chosen
    output; a chosen network without uMSE (only its self-supervised loss vouches for
    it), a baseline without uMSE, or uMSE from fewer than ``min_umse_frames`` frames; drift larger than ``drift_warn_px``; a blind spot larger
    than ``blindspot_warn``.  footprint: {'bytes', 'files', 'input_bytes'} of the dataset's
    results folder (``disk_x_input``: its size as a multiple of the input's).
    """
    rows = table[table.dataset == name]
    ups = dict(zip(rows.method, rows.upsnr_db))
    chosen = choice.get("chosen") if choice else None
    classical = {m: _num(ups.get(m)) for m in CLASSICAL if m in ups and _num(ups.get(m)) == _num(ups.get(m))}
    best = max(classical, key=classical.get) if classical else None
    up_chosen = _num(ups.get(chosen)) if chosen else float("nan")
    tuned_unscored = "classical" in ups and "classical" not in classical
    gain = (up_chosen - classical[best] if best and up_chosen == up_chosen and not tuned_unscored
            else float("nan"))
    if chosen == "classical":  # no network beat the tuned Gaussian: it is the best classical method
        best, gain = "classical", 0.0
    warnings = []
    n = int(index["n_frames"]) if index else None
    residual = (index or {}).get("residual", {}).get(chosen) if chosen else None
    if residual and residual.get("structure"):
        warnings.append(f"residual structure in {chosen} (low-pass excess {_f(residual['spatial'])}, "
                        f"signal share {_f(residual['signal_share'], '.3f')})")
    r = _umse_radius(rows)
    if chosen and chosen != "classical" and chosen in ups and up_chosen != up_chosen:
        # a network no independent check vouches for (a linear filter cannot invent structure)
        reach = rows.loc[rows.method == chosen, "reach"]
        warnings.append(f"{chosen} reaches {int(reach.iloc[0]) if len(reach) else '?'} frames each side: too few "
                        f"frames ({n}) for uMSE to check it (chosen by its self-supervised loss)")
    if "umse_valid" in rows:  # auto's candidates are compared by their loss; the baselines need uMSE
        candidates = set((choice or {}).get("loss", {})) | {"classical"}
        bad = [m for m in rows.method[~rows.umse_valid.astype(bool)] if m != chosen and m not in candidates]
        if bad:
            warnings.append(f"too few frames ({n}) for uMSE radius of {', '.join(bad)}: no uMSE")
    if r is not None and n is not None and n - 2 * r - 3 < min_umse_frames:
        warnings.append(f"uMSE from {max(0, n - 2 * r - 3)} frame(s) only (T = {n}, radius {r})")
    if choice and _disagreement(rows, choice):
        warnings.append(f"uMSE and the self-supervised loss disagree on {chosen} vs classical (see the dataset's first paragraph)")
    max_drift = float("nan")
    if drift is not None and len(drift):
        max_drift = float(np.max(np.hypot(drift.dy, drift.dx)))
        if max_drift > drift_warn_px:
            warnings.append(f"drift {max_drift:.1f} px > {drift_warn_px:g} px")
        if "trusted" in drift and not drift.trusted.iloc[1:].all():
            n_bad = int((~drift.trusted.astype(bool)).sum())
            warnings.append("drift not measurable (no significant correlation peak): frames left unaligned"
                            if n_bad >= len(drift) - 1 else
                            f"drift interpolated in {n_bad} frame(s) without a significant correlation peak")
    spot = blindspot.get("blindspot") if blindspot else None
    if spot is not None and int(spot) > blindspot_warn:
        warnings.append(f"blind spot {spot}×{spot} > {blindspot_warn}×{blindspot_warn}")
    status = "baselines only" if not chosen else ("check" if warnings else "ok")
    return {"dataset": name, "status": status, "frames": n, "chosen": chosen, "upsnr_db": up_chosen,
            "best_classical": best, "gain_db": gain, "residual_spatial": _num((residual or {}).get("spatial")),
            "residual_share": _num((residual or {}).get("signal_share")), "max_drift_px": max_drift,
            "blindspot": spot, "disk_x_input": _num((footprint or {}).get("x_input")),
            "disk_files": (footprint or {}).get("files"), "warnings": warnings}


def _umse_radius(rows: pd.DataFrame) -> int | None:
    """The uMSE radius of one dataset's metrics rows (None when none is recorded)."""
    if "umse_radius" not in rows or not rows.umse_radius.notna().any():
        return None
    return int(rows.umse_radius.dropna().iloc[0])


def _unscored(rows: pd.DataFrame, choice: dict, n_frames: int | None) -> str | None:
    """:func:`metrics.unscored_sentence` for one dataset's metrics rows (method column)."""
    c = rows[rows.method == "classical"]
    if not len(c) or "reach" not in c or _num(c.upsnr_db.iloc[0]) == _num(c.upsnr_db.iloc[0]):
        return None  # no classical row, or it has a uPSNR: the gain is there
    return _metrics.unscored_sentence(choice, int(c.reach.iloc[0]), n_frames, _umse_radius(rows))


def _disagreement(rows: pd.DataFrame, choice: dict) -> str | None:
    """:func:`metrics.disagreement_sentence` for one dataset's metrics rows (method column)."""
    umse = dict(zip(rows.method, rows.umse)) if "umse" in rows else {}
    return _metrics.disagreement_sentence(choice, umse, _umse_radius(rows))


_OVERVIEW_COLUMNS = [  # (key, header, type)
    ("dataset", "Dataset", "text"), ("status", "Status", "text"), ("frames", "Frames", "num"),
    ("chosen", "Chosen", "text"), ("upsnr_db", "uPSNR (dB)", "num"), ("best_classical", "Best classical", "text"),
    ("gain_db", "Gain (dB)", "num"), ("residual_spatial", "Residual low-pass", "num"),
    ("residual_share", "Residual share", "num"),
    ("max_drift_px", "Max drift (px)", "num"), ("blindspot", "Blind spot", "num"),
    ("disk_x_input", "Disk (× input)", "num"), ("warnings", "Warnings", "num"),
]


def _overview_html(rows: list[dict]) -> str:
    head = "".join(f'<th data-type="{t}" title="click to sort">{html.escape(h)}</th>' for _, h, t in _OVERVIEW_COLUMNS)
    body = []
    for row in rows:
        cells = []
        for key, _, typ in _OVERVIEW_COLUMNS:
            v = row.get(key)
            if key == "dataset":
                cells.append(f'<td data-sort="{html.escape(v)}"><a href="#ds-{html.escape(v)}">{html.escape(v)}</a></td>')
            elif key == "warnings":
                text = "<br>".join(html.escape(w) for w in v) if v else "–"
                cells.append(f'<td data-sort="{len(v)}" class="{"warn" if v else ""}">{text}</td>')
            elif key == "status":
                cells.append(f'<td data-sort="{html.escape(v)}" class="st-{v.split()[0]}">{html.escape(v)}</td>')
            elif typ == "num":
                x = _num(v)
                shown = "–" if x != x else (str(int(x)) if key in ("frames", "blindspot") else
                                            _f(x, ".3f" if key == "residual_share" else ".2f"))
                cells.append(f'<td data-sort="{"" if x != x else repr(x)}">{shown}</td>')
            else:
                cells.append(f'<td data-sort="{html.escape(str(v or ""))}">{html.escape(str(v or "–"))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="overview-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _shown_methods(index: dict, chosen: str | None, table: pd.DataFrame | None = None) -> list[str]:
    """Panels: raw, the Gaussian 3D baseline, the blind-tuned classical candidate, the
    chosen model (when another; when a classical filter was chosen, the network with the
    best uPSNR instead, to see what it lost on), ground truth."""
    methods = index["methods"]
    shown = ["raw"] + [m for m in ("gaussian3d", "classical") if m in methods]
    extra = chosen
    if (chosen is None or chosen in CLASSICAL) and table is not None:
        nets = table[table.method.isin([m for m in methods if m not in CLASSICAL])]
        nets = nets[nets.upsnr_db.notna()].sort_values("upsnr_db", ascending=False)
        extra = nets.method.iloc[0] if len(nets) else None
    if extra and extra not in shown and extra in methods:
        shown.append(extra)
    if index.get("truth"):
        shown.append("truth")
    return shown


def _label(m: str, chosen: str | None) -> str:
    return {"raw": "raw", "truth": "ground truth"}.get(m, m) + (" ★ chosen" if m == chosen else "")


def _dataset_html(name: str, diag_dir: Path, index: dict, summary: dict, table: pd.DataFrame,
                  choice: dict | None, logs: Mapping[str, pd.DataFrame], line: str,
                  extra_images: Sequence[tuple[str, str]]) -> str:
    chosen = summary["chosen"]
    shown = _shown_methods(index, chosen, table[table.dataset == name])
    files = index["files"]
    y0, x0, h, w = index["crop"]
    k = index["thumb_scale"]
    zoom = 2 if max(index["shape"]) / k < 100 else 1  # tiny frames: show the thumbnails x2
    lo, hi = index["display_range"]
    out = [f'<section class="dataset" id="ds-{html.escape(name)}">',
           f'<h2>{html.escape(name)} <span class="badge st-{summary["status"].split()[0]}">'
           f'{html.escape(summary["status"])}</span> <a class="up" href="#overview">↑ overview</a></h2>',
           f"<p>{html.escape(line)}</p>"]
    if summary["warnings"]:
        out.append('<ul class="warnings">' + "".join(f"<li>{html.escape(x)}</li>" for x in summary["warnings"])
                   + "</ul>")
    # model choice with its evidence
    rows = table[table.dataset == name].set_index("method")
    if choice:
        loss = choice.get("loss", {})
        excess = choice.get("excess", {})
        reaches = choice.get("reaches", {})
        own = choice.get("unblind", {})
        trs = []
        for m in choice.get("candidates", list(loss)):
            r = rows.loc[m] if m in rows.index else None
            trs.append(f"<tr{' class=chosen' if m == chosen else ''}><td>{html.escape(m)}</td>"
                       f"<td>{reaches.get(m, '–')}</td><td>{_f(loss.get(m), '.6g')}</td>"
                       f"<td>{_f(own.get(m), '.3f')}</td>"
                       f"<td>{_f(100 * _num(excess.get(m)), '+.2f')}</td>"
                       f"<td>{_f(r.upsnr_db if r is not None else None)}</td>"
                       f"<td>{_f(r.psnr_db if r is not None else None)}</td>"
                       f"<td>{'★' if m == chosen else ''}</td></tr>")
        extra = ", ".join(f"{k2} {html.escape(str(choice[k2]))}" for k2 in ("kind", "filter", "sigma", "shine_size",
                                                                              "checkpoint")
                          if choice.get(k2) is not None)
        if choice.get("nlm"):
            extra += f". {html.escape(_metrics.nlm_sentence(choice['nlm']))}"
        if choice.get("mix"):
            extra += f". {html.escape(_metrics.mix_sentence(choice['mix']))}"
        if choice.get("ensemble"):
            extra += f". {html.escape(_metrics.ensemble_sentence(choice['ensemble']))}"
        if choice.get("reach_choice"):
            extra += f". {html.escape(_metrics.reach_sentence(choice['reach_choice']))}"
        out.append(f"<h3>Model choice</h3><p>{html.escape(choice.get('rule', ''))}. {extra}</p>"
                   "<table class=small><thead><tr><th>candidate</th><th>reach</th><th>N2S loss (select)</th>"
                   "<th title='weight of the pixel&#39;s own value given back after inference (pipeline.unblind)'>"
                   "own pixel</th>"
                   "<th>excess (%)</th>"
                   "<th>uPSNR (dB)</th><th>PSNR vs truth</th><th>chosen</th></tr></thead><tbody>"
                   + "".join(trs) + "</tbody></table>")
    # images at one contrast
    out.append(f"<h3>Frame {index['frame']} at one contrast ({lo:.4g} – {hi:.4g} for every panel)</h3>"
               '<div class="grid">')
    for m in shown:
        full = (diag_dir / files["full"][m]).read_bytes()
        crop = (diag_dir / files["crop"][m]).read_bytes()
        box = (f'<span class="box" style="top:{y0 * zoom / k:.0f}px;left:{x0 * zoom / k:.0f}px;'
               f'width:{w * zoom / k:.0f}px;height:{h * zoom / k:.0f}px"></span>')
        out.append(f'<figure><figcaption>{html.escape(_label(m, chosen))}</figcaption>'
                   f'<div class="frame">{_img_tag(full, f"{name} {m} full frame", cls="px", scale=zoom)}{box}</div>'
                   f'{_img_tag(crop, f"{name} {m} crop", cls="px", scale=2)}</figure>')
    out.append(f"</div><p class=note>Full frames{f' area-averaged ×{k:.3g}' if k > 1 else ''}"
               f"{' shown ×2' if zoom > 1 else ''}; the box marks "
               f"the crop ({w}×{h} px at native pixels, shown ×2) where the signal varies most.</p>")
    # residuals
    res = index.get("residual", {})
    rmethods = [m for m in shown if m in files["residual"]]
    rlo, rhi = index["residual_mean_range"]
    out.append("<h3>Residual raw − denoised</h3><div class=grid>")
    for m in rmethods:
        mean = (diag_dir / files["residual_mean"][m]).read_bytes()
        crop = (diag_dir / files["residual"][m]).read_bytes()
        rs = res.get(m)
        flag = (' <b class="warn">structure</b>' if rs and rs["structure"] else "") if rs else " (no uMSE radius)"
        out.append(f'<figure><figcaption>{html.escape(_label(m, chosen))}{flag}</figcaption>'
                   f'{_img_tag(mean, f"{name} {m} mean residual", cls="px", scale=zoom)}'
                   f'{_img_tag(crop, f"{name} {m} residual crop", cls="px", scale=2)}</figure>')
    out.append(f"</div><p class=note>Top: residual averaged over all frames (±{rhi:.3g}; static structure "
               f"stands out of the noise); bottom: frame {index['frame']} in the crop "
               f"(±{index['residual_range'][1]:.3g}). Mid-grey = 0.</p>")
    trs = []
    for m, rs in res.items():
        trs.append(f"<tr{' class=chosen' if m == chosen else ''}><td>{html.escape(m)}</td>"
                   f"<td>{_f(rs['spatial'])}</td><td>{_f(rs['signal_share'], '.3f')} ± "
                   f"{_f(rs['signal_share_se'], '.3f')}</td><td>{_f(rs.get('signal_share_ref'), '.3f')}</td>"
                   f"<td>{_f(rs['temporal'], '.3f')}</td>"
                   f"<td class={'warn' if rs['structure'] else 'ok'}>{'structure' if rs['structure'] else 'noise-like'}"
                   "</td></tr>")
    if trs:
        any_rs = next(iter(res.values()))
        out.append("<table class=small><thead><tr><th>method</th><th>low-pass excess</th><th>signal share</th>"
                   "<th>Wiener share</th><th>temporal corr.</th><th>verdict</th></tr></thead><tbody>"
                   + "".join(trs) + "</tbody></table>"
                   f"<p class=note>Noise correlation length {any_rs['length']} px. Low-pass excess: the "
                   f"residual's power after a Gaussian low-pass of σ = {any_rs['sigma']:g} px (its spatial "
                   "autocorrelation beyond the noise's) over the noise's (adjacent-frame differences), − 1: "
                   f"≈ 0 or below for noise, warning above {_metrics.RESIDUAL_SPATIAL_WARN}. Signal share: "
                   "covariance of the residual of frame t with raw frames beyond the method's reach (noise "
                   "independent) over that of the raw frames: the share of the persistent signal in the "
                   "residual. Wiener share: what an ideal linear filter over the frames the method sees "
                   "would leave (every denoiser shrinks detail that is weak against the noise); warning "
                   f"when the signal share exceeds it by {_metrics.RESIDUAL_SHARE_WARN} (and 3 standard errors). "
                   f"Temporal corr.: residual frames t, t + {any_rs['lag']}.</p>")
    # curves
    spec = pd.read_csv(diag_dir / index["tables"]["spectra"])
    prof = pd.read_csv(diag_dir / index["tables"]["profile"])
    per = pd.read_csv(diag_dir / index["tables"]["per_frame"])
    plots = [("power spectra", _plot_spectra(spec, shown, chosen, index["lattice"])),
             ("line profile", _plot_profile(prof, shown, chosen, index["lattice"]))]
    if len(per):
        plots.append(("uPSNR per frame", _plot_per_frame(per, chosen, index["umse_radius"])))
    loss_csv = diag_dir / index["tables"].get("per_frame_loss", "per_frame_loss.csv")
    per_loss = pd.read_csv(loss_csv) if loss_csv.exists() else pd.DataFrame()
    if per_loss["method"].nunique() > 1 if len(per_loss) else False:
        plots.append(("self-supervised loss per frame", _plot_per_frame_loss(per_loss, chosen)))
    if logs:
        plots.append(("training curves", _plot_training(logs, chosen)))
    lat = index["lattice"]
    out.append("<h3>Spectra, line profile, uPSNR over time, training</h3><div class=grid>"
               + "".join(f"<figure>{_img_tag(data, f'{name} {label}')}</figure>" for label, data in plots)
               + f"</div><p class=note>Strongest non-DC spectral peak of the time-averaged raw movie: period "
               f"{lat['period_px']:.3g} px at {lat['angle_deg']:.0f}° (peak/background {lat['contrast']:.3g}); "
               f"the profile crosses it over {index['profile']['length_px']} px, averaged over "
               f"{index['profile']['width_px']} px along the fringes. uPSNR per frame: the metrics table's "
               f"reference frames (radius {index['umse_radius']}), frames with reference frames on both "
               "sides only. Self-supervised loss per frame: what the model choice compares, for every "
               "candidate whatever its reach, relative to the lowest candidate in each frame.</p>")
    for label, path in extra_images:
        out.append(f"<details><summary>{html.escape(label)}</summary>"
                   f"{_img_tag(_small_png(path, max_width=720), f'{name} {label}')}</details>")
    out.append("</section>")
    return "\n".join(out)


_CSS = """
body{font-family:sans-serif;font-size:14px;max-width:1240px;margin:auto;padding:0 12px;color:#222}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f2f2f2}table.sortable th{cursor:pointer}table.sortable th[aria-sort=ascending]::after{content:" ▲"}
table.sortable th[aria-sort=descending]::after{content:" ▼"}table.small{font-size:12px}
.warn{color:#b00}.ok{color:#060}.st-ok{color:#060}.st-check{color:#b00;font-weight:bold}.st-baselines{color:#666}
.badge{font-size:13px;border:1px solid currentColor;border-radius:4px;padding:0 4px;vertical-align:middle}
tr.chosen{background:#fff6d5}section.dataset{border-top:2px solid #888;margin-top:24px}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}figure{margin:0}
figcaption{font-size:12px;font-weight:bold}.frame{position:relative;line-height:0}
.box{position:absolute;border:1px solid #ff0;box-sizing:border-box}
img{display:block;margin-bottom:4px}img.px{image-rendering:pixelated}
.note{font-size:12px;color:#555}ul.warnings{color:#b00}a.up{font-size:12px;font-weight:normal}
"""

# Sortable tables; #section=NAME shows one dataset alone; #selftest checks the page (a
# browser test reads the result from <pre id="test-results">).
_JS_HEAD = """
window.__errors=[];
if(location.hash==='#selftest'){
 window.addEventListener('error',function(e){window.__errors.push('error: '+e.message);},true);
 window.addEventListener('securitypolicyviolation',function(e){window.__errors.push('csp: '+e.blockedURI);});
 ['error','warn'].forEach(function(k){var f=console[k];console[k]=function(){
  window.__errors.push(k+': '+Array.prototype.join.call(arguments,' '));f.apply(console,arguments);};});
}
"""

_JS = """
(function(){
function key(td,type){var v=td.getAttribute('data-sort');if(v===null)v=td.textContent.trim();
 if(type==='num'){var x=parseFloat(v);return isNaN(x)?-Infinity:x;}return v.toLowerCase();}
function sortBy(table,col){var th=table.tHead.rows[0].cells[col],type=th.getAttribute('data-type')||'text';
 var dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
 Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.removeAttribute('aria-sort');});
 th.setAttribute('aria-sort',dir===1?'ascending':'descending');
 var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){var x=key(a.cells[col],type),y=key(b.cells[col],type);return (x<y?-1:x>y?1:0)*dir;});
 rows.forEach(function(r){body.appendChild(r);});}
Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(t){
 Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){th.addEventListener('click',function(){sortBy(t,i);});});});
function showHash(){var m=/^#section=(.+)$/.exec(location.hash),only=m?decodeURIComponent(m[1]):null;
 Array.prototype.forEach.call(document.querySelectorAll('.top, section.dataset'),function(el){
  el.style.display=(!only||el.id==='ds-'+only)?'':'none';});}
window.addEventListener('hashchange',showHash);showHash();
function values(t,col){var type=t.tHead.rows[0].cells[col].getAttribute('data-type');
 return Array.prototype.map.call(t.tBodies[0].rows,function(r){return key(r.cells[col],type);});}
function sorted(v,dir){for(var i=1;i<v.length;i++){if((v[i]<v[i-1]?-1:v[i]>v[i-1]?1:0)*dir<0)return false;}return true;}
function selftest(){var t=document.getElementById('overview-table'),out={errors:window.__errors,images:[],sort:[]};
 Array.prototype.forEach.call(document.images,function(im){
  out.images.push({alt:im.alt,complete:im.complete,naturalWidth:im.naturalWidth});});
 var ths=t.tHead.rows[0].cells;
 for(var i=0;i<ths.length;i++){ths[i].click();var a=sorted(values(t,i),1);ths[i].click();var d=sorted(values(t,i),-1);
  out.sort.push({column:ths[i].textContent,ascending:a,descending:d});}
 ths[ths.length-1].click();ths[ths.length-1].click();
 var gain=Array.prototype.map.call(ths,function(th){return th.textContent;}).indexOf('Gain (dB)');
 if(gain>=0){ths[gain].click();out.final_sort='Gain (dB)';}
 var pre=document.getElementById('test-results');pre.textContent=JSON.stringify(out);pre.hidden=false;}
if(location.hash==='#selftest'){window.addEventListener('load',selftest);}
})();
"""

#: No network: images only from data: URIs, no external script, style, font or frame.
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")


def write_report(datasets: Sequence[str], inputs, outputs, choices: Mapping[str, str] | None = None,
                 train_logs: Mapping[str, Mapping[str, str]] | None = None,
                 footprints: Mapping[str, dict] | None = None) -> list[dict]:
    """Write the combined CSV, report.md and report.html; returns the overview rows
    (:func:`dataset_summary`).

    inputs: object with lists ``metrics``, ``previews``, ``drift``, ``noise``,
    ``blindspot`` and (optionally) ``diagnostics`` (the metrics rule's folders) and
    ``drift_csv``, ordered like ``datasets``; outputs: ``table``, ``markdown``, ``html``;
    choices: dataset -> model_choice.json (which model denoised it, and why);
    train_logs: dataset -> {model: train_log.csv}; footprints: dataset -> {'bytes',
    'files', 'input_bytes'} (:func:`footprint`), shown as the disk use per dataset.

    The HTML page is one self-contained file (images as base64 PNG, inline CSS and a few
    lines of JavaScript, a Content-Security-Policy that forbids any network access): an
    overview table (one row per dataset, sortable by clicking a header), then one section
    per dataset.
    """
    table = collect_metrics(inputs.metrics)
    with atomic_path(outputs.table) as tmp:
        table.to_csv(tmp, index=False)
    spots = [json.loads(Path(p).read_text()) for p in inputs.blindspot]
    diags = list(getattr(inputs, "diagnostics", []) or [])
    drift_csvs = list(getattr(inputs, "drift_csv", []) or [])
    md_dir = Path(outputs.markdown).parent
    summaries, sections, md_sections = [], [], []
    for i, name in enumerate(datasets):
        spot = spots[i]
        line = (f"Blind spot chosen: {spot.get('blindspot')}×{spot.get('blindspot')} "
                f"(estimate: {spot.get('estimate_used')}; rule: {spot.get('rule', '')})")
        radius = table.loc[table.dataset == name, "umse_radius"].dropna() if "umse_radius" in table else []
        if len(radius):
            r = int(radius.iloc[0])
            line += (f" uMSE radius {r}: reference frames t−{r + 1}, t+{r + 1}, t+{r + 2}; "
                     f"SNR from frames t and t+{2 * r + 1}.")
        index = json.loads((Path(diags[i]) / "index.json").read_text()) if diags else None
        choice = None
        if choices and name in choices:
            choice = json.loads(Path(choices[name]).read_text())
            evidence = ", ".join(f"{m} {v:.6g}" for m, v in choice.get("loss", {}).items())
            line += (f" Model: {choice['chosen']} ({choice['rule']}"
                     + (f"; self-supervised loss {evidence}" if evidence else "") + ").")
            rows = table[table.dataset == name]
            disagree = _disagreement(rows, choice)
            if disagree:  # in the section's first paragraph (HTML and Markdown), once
                line += f" {disagree}"
            unscored = _unscored(rows, choice, index["n_frames"] if index else None)
            if unscored:  # the overview's gain is NaN: say why where the reader looks next
                line += f" {unscored}"
        drift = pd.read_csv(drift_csvs[i]) if drift_csvs else None
        fp = (footprints or {}).get(name)
        if fp:
            line += (f" Disk: {fp['bytes'] / 2**20:.1f} MiB in {fp['files']} files"
                     + (f" = {fp['x_input']:.2f} × the input ({fp['input_bytes'] / 2**20:.1f} MiB)."
                        if fp.get("x_input") == fp.get("x_input") and fp.get("x_input") is not None else "."))
        summary = dataset_summary(name, table, choice=choice, index=index, drift=drift, blindspot=spot,
                                  footprint=fp)
        summaries.append(summary)
        md_sections += [f"## {name}", "", line, ""]
        md_sections += [f"- warning: {w}" for w in summary["warnings"]] + ([""] if summary["warnings"] else [])
        extra = [("Drift", getattr(inputs, "drift")[i]), ("Noise correlation", getattr(inputs, "noise")[i])]
        for label, key in (("Preview (same contrast in every panel)", "previews"), ("Drift", "drift"),
                           ("Noise correlation", "noise")):
            md_sections += [f"![{label}]({os.path.relpath(getattr(inputs, key)[i], md_dir)})", ""]
        logs = {}
        for m, p in ((train_logs or {}).get(name) or {}).items():
            if Path(p).exists():
                logs[m] = pd.read_csv(p)
        if index is not None:
            sections.append(_dataset_html(name, Path(diags[i]), index, summary, table, choice, logs, line, extra))
        else:
            sections.append(f'<section class="dataset" id="ds-{html.escape(name)}"><h2>{html.escape(name)}</h2>'
                            f"<p>{html.escape(line)}</p>"
                            + "".join(f"<h3>{label}</h3>{_img_tag(_small_png(path, max_width=720), label)}"
                                      for label, path in extra) + "</section>")
    overview = pd.DataFrame([{**s, "warnings": "; ".join(s["warnings"])} for s in summaries])
    intro = ("uMSE / uPSNR: WCVD paper eq. 1–2 from raw frames t−r−1, t+r+1, t+r+2, outside every method's "
             "temporal reach (r = umse_radius; lower uMSE, higher uPSNR is better). SNR: SHINE eq. 5 from the "
             "correlation snr_corr of output frames t and t+2r+1, whose input frames do not overlap. "
             "PSNR / SSIM only where a ground truth exists. Gain: uPSNR of the chosen model minus the best "
             f"classical method's ({', '.join(CLASSICAL)}).")
    to_md = (lambda d: d.to_markdown(index=False)) if _has_tabulate() else (lambda d: d.to_string(index=False))
    md = ["# emdenoise report", "", intro, "", "## Overview", "", to_md(overview.round(3)), "",
          "## All metrics", "", to_md(_fmt(table)), ""] + md_sections
    with atomic_path(outputs.markdown) as tmp:
        Path(tmp).write_text("\n".join(md))
    n_check = sum(s["status"] == "check" for s in summaries)
    body = ['<div class="top">', "<h1>emdenoise report</h1>",
            f"<p>{len(datasets)} dataset(s); {n_check} to check. Click a column header to sort; click a "
            "dataset for its section (raw vs denoised at one contrast, residuals, spectra, line profile, "
            "uPSNR per frame, training, model choice).</p>",
            "<h2 id=overview>Overview</h2>", _overview_html(summaries), f"<p class=note>{html.escape(intro)}</p>",
            "<details><summary>All metrics (one row per dataset and method)</summary>",
            _fmt(table).to_html(index=False, na_rep="–", classes="small"), "</details>", "</div>"]
    page = ("<!doctype html><html lang=en><head><meta charset='utf-8'>"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            "<meta name=viewport content='width=device-width'><title>emdenoise report</title>"
            f"<style>{_CSS}</style><script>{_JS_HEAD}</script></head><body>" + "\n".join(body + sections)
            + f'<pre id="test-results" hidden></pre><script>{_JS}</script></body></html>')
    with atomic_path(outputs.html) as tmp:
        Path(tmp).write_text(page)
    return summaries


# =========================================================================== browser
def find_chromium() -> str | None:
    """Path of a Chromium / Chrome executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browse(html_path, *, fragment: str = "", screenshot=None, size: tuple[int, int] = (1280, 1000),
           timeout: float = 120, chromium: str | None = None) -> tuple[str, list[str]]:
    """Open a local HTML file in headless Chromium; returns (the DOM after the load
    event's scripts ran, the console messages Chromium logged). With ``screenshot`` (a
    PNG path) it takes a screenshot of ``size`` (width, height) instead of dumping the
    DOM (returns ""). ``fragment``: e.g. "#selftest" or "#section=NAME"."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    url = Path(html_path).resolve().as_uri() + fragment
    with tempfile.TemporaryDirectory(prefix="emdenoise-chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
               f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000"]
        cmd += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else ["--dump-dom"]
        proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    return ("" if screenshot else proc.stdout), console
