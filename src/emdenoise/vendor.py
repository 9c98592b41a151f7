"""Readers for the files microscopes write: Gatan DM3/DM4, TIA SER/EMI, Velox/NCEM EMD,
Falcon EER, and SerialEM ``.mdoc`` metadata beside an MRC stack.

Each ``open_*`` returns ``(read, shape, dtype, meta)``: ``read(a, b)`` gives frames
``[a, b)`` as an ndarray of ``dtype`` (picklable; the file is reopened per process),
``shape`` is ``(T, Y, X)`` (a single image has ``T = 1``), and ``meta`` a dict with
``notes`` and, where the file records them,

- ``frame_time``: seconds between frames (float),
- ``exposure_time``: seconds of exposure per frame (float, or a list per frame),
- ``dose_per_frame`` with ``dose_unit`` (``'e/A^2'`` or ``'e/px'``; float or list),
- ``tilt_angles``: degrees, one per frame,
- ``calibration``: the raw values with their units as the file states them
  (``x_scale``/``x_unit``: the pixel size that :mod:`emdenoise.io` converts to Å).

:mod:`emdenoise.io` wraps them in a ``LazyStack`` (this module sits below it).

The packages are optional (``pip install 'emdenoise[vendor]'``); a missing one gives one
:class:`~emdenoise.errors.InputError` line naming the file and the package to install.
"""
from __future__ import annotations

import importlib
import math
import threading
from pathlib import Path

import numpy as np

from .errors import InputError

#: format -> (module to import, PyPI package that provides it)
RSCIIO_MODULES = {"dm": "rsciio.digitalmicrograph", "tia": "rsciio.tia", "emd": "rsciio.emd"}
FORMAT_NAMES = {"dm": "Gatan DigitalMicrograph", "tia": "FEI TIA", "emd": "EMD (Velox/NCEM)",
                "eer": "Falcon EER"}
#: EER defaults: raw frames summed per output fraction, and super-resolution factor.
EER_GROUP = 20
EER_UPSAMPLING = 1

_TIME_TO_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "millisecond": 1e-3,
              "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "microsecond": 1e-6, "ns": 1e-9, "min": 60.0}


def _require(module: str, package: str, path, what: str):
    """Import ``module`` or raise a one-line InputError naming ``path`` and ``package``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(path, f"reading {what} files needs the optional package {package!r} "
                               f"(missing: {exc.name or module}); pip install {package}") from None


def _to_seconds(value, unit):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    factor = _TIME_TO_S.get(str(unit or "").strip().lower())
    return value * factor if factor and math.isfinite(value) and value > 0 else None


# --------------------------------------------------------------------------- RosettaSciIO
def _rsciio_signals(path, fmt):
    mod = _require(RSCIIO_MODULES[fmt], "rosettasciio", path, FORMAT_NAMES[fmt])
    if fmt == "emd":
        _require("h5py", "h5py", path, FORMAT_NAMES[fmt])
    try:
        return mod.file_reader(str(path), lazy=True)
    except InputError:
        raise
    except Exception as exc:  # the readers raise many types on corrupt or foreign files
        msg = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise InputError(path, f"not a readable {FORMAT_NAMES[fmt]} file ({type(exc).__name__}: {msg})") from exc


def _pick_image(signals, path, fmt):
    """Index of the first signal with two signal axes (an image or image stack)."""
    for i, sig in enumerate(signals):
        axes = sig.get("axes", [])
        n_signal = sum(1 for a in axes if not a.get("navigate", False))
        if n_signal == 2 and np.asarray(sig["data"].shape).size in (2, 3):
            return i
    kinds = [tuple(s["data"].shape) for s in signals]
    raise InputError(path, f"{FORMAT_NAMES[fmt]} file holds no image or image stack "
                           f"(signals of shapes {kinds}); expected (Y, X) or (T, Y, X)")


def _find(tree, *names):
    """First value of any key in ``names`` found depth-first in nested dicts."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in names and not isinstance(v, dict):
                return v
        for v in tree.values():
            found = _find(v, *names)
            if found is not None:
                return found
    return None


class LazyReader:
    """A frame reader ``read(a, b)`` that opens its file on first use and keeps it open.

    The open handle and the lock do not pickle: Dask sends readers to worker processes,
    where each reopens the file.  Subclasses give ``_open()`` (the handle) and
    ``_read(handle, a, b)`` (frames [a, b)); reads are serialised by the lock.
    """

    def __init__(self):
        self._handle, self._lock = None, threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _handle=None, _lock=threading.Lock())

    def __call__(self, a, b):
        with self._lock:
            if self._handle is None:
                self._handle = self._open()
            return self._read(self._handle, a, b)

    def __del__(self):
        close = getattr(getattr(self, "_handle", None), "close", None)
        if close is not None:
            close()


class _RsciioReader(LazyReader):
    """Frames ``[a, b)`` of signal ``index`` of a vendor file; reopens the file per process."""

    def __init__(self, path, fmt, index):
        super().__init__()
        self.path, self.fmt, self.index = str(path), fmt, index

    def _open(self):
        return _rsciio_signals(self.path, self.fmt)[self.index]["data"]

    def _read(self, data, a, b):
        block = data[a:b] if data.ndim == 3 else data[np.newaxis][a:b]
        return np.asarray(block.compute(scheduler="synchronous") if hasattr(block, "compute") else block)


def open_rsciio(path, fmt):
    """Open a DM3/DM4 (``fmt='dm'``), SER/EMI (``'tia'``) or EMD (``'emd'``) file lazily.

    Returns ``(read, shape, dtype, meta)`` (module docstring): frames of the stored dtype
    and the calibration: the x axis scale and unit (``meta['calibration']``), frame time
    from a calibrated time axis (s) and exposure where the metadata hold it.
    """
    path = Path(path)
    signals = _rsciio_signals(path, fmt)
    index = _pick_image(signals, path, fmt)
    sig = signals[index]
    data, axes = sig["data"], sig.get("axes", [])
    if data.ndim not in (2, 3):
        raise InputError(path, f"{FORMAT_NAMES[fmt]} image has {data.ndim} dimensions {tuple(data.shape)}; "
                               "expected (Y, X) or (T, Y, X)")
    nav = [a for a in axes if a.get("navigate", False)]
    sig_axes = [a for a in axes if not a.get("navigate", False)]
    notes = []
    if len(signals) > 1:
        notes.append(f"{len(signals)} signals in the file; read #{index} "
                     f"({(sig.get('metadata', {}).get('General', {}) or {}).get('title', 'untitled')})")
    x_axis = sig_axes[-1]
    unit, scale = x_axis.get("units"), x_axis.get("scale")
    calibration = {"x_scale": float(scale) if scale is not None else None, "x_unit": unit or None}
    meta = {"notes": notes, "vendor_format": fmt}
    if nav:
        t_unit, t_scale = nav[0].get("units"), nav[0].get("scale")
        calibration.update(t_scale=float(t_scale) if t_scale is not None else None, t_unit=t_unit or None)
        ft = _to_seconds(t_scale, t_unit)
        if ft:
            meta["frame_time"] = ft
    om = sig.get("original_metadata", {}) or {}
    exposure = _find(om, "Exposure (s)", "Exposure Time (s)", "ExposureTime")
    exposure = _to_seconds(exposure, "s") if exposure is not None else None
    if exposure:
        meta["exposure_time"] = exposure
    meta["calibration"] = calibration
    title = (sig.get("metadata", {}).get("General", {}) or {}).get("title")
    if title:
        meta["title"] = str(title)
    shape = tuple(int(n) for n in data.shape)
    shape = shape if len(shape) == 3 else (1,) + shape
    return _RsciioReader(path, fmt, index), shape, np.dtype(data.dtype), meta


# --------------------------------------------------------------------------- EER
class _EerReader(LazyReader):
    """Fraction ``i`` = sum of raw EER frames ``[i*group, (i+1)*group)`` (uint16 counts)."""

    def __init__(self, path, group, superres, first_page, frame_shape):
        super().__init__()
        self.path, self.group, self.superres = str(path), group, superres
        self.first_page, self.frame_shape = first_page, frame_shape

    def _open(self):
        import tifffile

        return tifffile.TiffFile(self.path, superres=self.superres)

    def _read(self, tif, a, b):
        out = np.zeros((b - a,) + self.frame_shape, np.uint16)
        for i in range(a, b):
            start = self.first_page + i * self.group
            for k in range(start, start + self.group):  # one raw frame at a time: bounded memory
                out[i - a] += tif.pages[k].asarray()
        return out


def open_eer(path, group: int = EER_GROUP, upsampling: int = EER_UPSAMPLING):
    """Open a Falcon EER movie as fractions of ``group`` raw frames each, lazily;
    returns ``(read, shape, dtype, meta)`` (module docstring).

    EER stores every electron event per raw frame (hundreds of raw frames per second);
    ``group`` consecutive raw frames are summed into one output frame (uint16 counts per
    pixel); trailing raw frames that do not fill a fraction are dropped (noted).
    ``upsampling`` 1 (4096² on Falcon 4), 2 or 4 decodes the sub-pixel event positions
    into a 2× or 4× finer grid. The EER header holds the detector's physical pixel (not
    the specimen pixel size: give ``pixel_size`` in the config), the exposure time (s)
    and the total dose (e/px); frame time and dose per fraction follow from them.
    """
    import tifffile

    path = Path(path)
    group, upsampling = int(group), int(upsampling)
    if group < 1:
        raise InputError(path, f"eer_group must be >= 1 raw frames per fraction, got {group}")
    if upsampling not in (1, 2, 4):
        raise InputError(path, f"eer_upsampling must be 1, 2 or 4, got {upsampling}")
    _require("imagecodecs", "imagecodecs", path, FORMAT_NAMES["eer"])
    superres = int(math.log2(upsampling))
    try:
        with tifffile.TiffFile(path, superres=superres) as tif:
            if not tif.is_eer:
                raise InputError(path, "not an EER file (no EER acquisition metadata in the TIFF)")
            md = dict(tif.eer_metadata or {})
            frames = next((s for s in tif.series if s.name == "frames"), tif.series[0])
            first_page = frames.pages[0].index if hasattr(frames.pages[0], "index") else 0
            n_raw = len(frames.pages)
            frame_shape = tuple(int(n) for n in frames.pages[0].shape[-2:])
            frames.pages[0].asarray()  # decode one frame now: a bad codec fails here, not later
    except InputError:
        raise
    except Exception as exc:
        raise InputError(path, f"not a readable EER file ({type(exc).__name__}: {exc})") from exc
    n_out = n_raw // group
    if n_out == 0:
        raise InputError(path, f"has {n_raw} raw EER frames, fewer than eer_group={group} per fraction")
    notes = []
    if n_raw % group:
        notes.append(f"dropped the last {n_raw % group} of {n_raw} raw EER frames (eer_group={group})")
    n_file = md.get("numberOfFrames") or n_raw
    meta = {"notes": notes, "vendor_format": "eer", "eer_group": group,
            "eer_upsampling": upsampling, "n_raw_frames": n_raw,
            "calibration": {k: v for k, v in md.items() if isinstance(v, (int, float, str, bool))}}
    exposure = _to_seconds(md.get("exposureTime"), md.get("exposureTime.unit", "s"))
    if exposure:
        meta["frame_time"] = meta["exposure_time"] = exposure / n_file * group
    if md.get("totalDose"):
        meta["dose_per_frame"], meta["dose_unit"] = float(md["totalDose"]) / n_file * group / upsampling**2, "e/px"
    if md.get("sensorPixelSize.width"):
        notes.append(f"EER sensorPixelSize {md['sensorPixelSize.width']} {md.get('sensorPixelSize.width.unit', '')} "
                     "is the detector pixel, not the specimen pixel size; set pixel_size in the config")
    shape = (n_out,) + frame_shape
    return _EerReader(path, group, superres, first_page, frame_shape), shape, np.dtype(np.uint16), meta


# --------------------------------------------------------------------------- SerialEM mdoc
def mdoc_for(path) -> Path | None:
    """The SerialEM ``.mdoc`` beside an MRC stack (``ts.mrc.mdoc`` or ``ts.mdoc``), or None."""
    path = Path(path)
    for cand in (path.with_name(path.name + ".mdoc"), path.with_suffix(".mdoc")):
        if cand.is_file():
            return cand
    return None


def read_mdoc(mdoc, n_frames: int) -> dict:
    """Calibration from a SerialEM ``.mdoc`` (via ``mdocfile``), one section per frame.

    Returns ``tilt_angles`` (degrees), ``pixel_size`` (Å, ``PixelSpacing``),
    ``dose_per_frame`` (e/Å², ``ExposureDose``), ``exposure_time`` (s) and ``mdoc`` (the
    path), each only when present; sections are ordered by ``ZValue``. Raises ImportError
    without ``mdocfile`` and ValueError when the sections do not match ``n_frames``.
    """
    import mdocfile

    df = mdocfile.read(mdoc)
    if "ZValue" in df and df["ZValue"].notna().all():
        df = df.sort_values("ZValue")
    if len(df) != n_frames:
        raise ValueError(f"{len(df)} sections for {n_frames} frames")
    out: dict = {"mdoc": str(mdoc)}

    def column(name):
        if name not in df or df[name].isna().any():
            return None
        return [float(v) for v in df[name]]

    angles, spacing = column("TiltAngle"), column("PixelSpacing")
    dose, exposure = column("ExposureDose"), column("ExposureTime")
    if angles is not None:
        out["tilt_angles"] = angles
    if spacing:
        out["pixel_size"] = spacing[0]
    if dose is not None and any(dose):
        out["dose_per_frame"], out["dose_unit"] = dose, "e/A^2"
    if exposure is not None and any(exposure):
        out["exposure_time"] = exposure
    return out
