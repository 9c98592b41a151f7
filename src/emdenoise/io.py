"""Reading and writing EM frame stacks.

Every reader returns a lazy ``(T, Y, X)`` array (``np.memmap``, ``zarr.Array`` or
:class:`LazyStack`) plus a metadata dict; nothing is loaded until sliced, and input
files are only ever opened read-only. Every writer writes to a temporary name in the
target directory and renames it when complete (:func:`atomic_path`).

Pixel sizes are in Å (ångström) throughout. TIFF files written here use the unit
``nm`` in their ImageJ metadata, because every TIFF reader understands it (``Å`` needs
a non-ASCII escape that many tools mangle).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import operator
import os
import re
import secrets
import shutil
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import mrcfile
import numpy as np
import tifffile
import zarr

from . import __version__, vendor
from .errors import DiskFullError, InputError

SUPPORTED_DTYPES = tuple(np.dtype(t) for t in (
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float16", "float32", "float64"))

_EXT_FORMAT = {".tif": "tiff", ".tiff": "tiff", ".npy": "npy", ".mrc": "mrc",
               ".mrcs": "mrc", ".st": "mrc", ".ali": "mrc", ".rec": "mrc", ".map": "mrc",
               ".dm3": "dm", ".dm4": "dm", ".ser": "tia", ".emi": "tia", ".emd": "emd", ".eer": "eer"}
_FOLDER_EXT = {".tif", ".tiff", ".mrc", ".npy", ".dm3", ".dm4"}
#: acquisition calibration keys a reader may fill (see :mod:`emdenoise.vendor`)
CALIBRATION_KEYS = ("frame_time", "exposure_time", "dose_per_frame", "dose_unit", "tilt_angles",
                    "vendor_format", "calibration", "eer_group", "eer_upsampling", "n_raw_frames", "mdoc")
_TIFF_META_TAG = 65000  # private TIFF tag holding emdenoise metadata as JSON
_MAX_BLOCK_BYTES = 256 * 2**20  # bound on memory used when streaming frames
_TO_ANGSTROM = {  # lower-case unit name -> Å per unit
    "a": 1.0, "å": 1.0, "angstrom": 1.0, "angstroms": 1.0, "ångström": 1.0,
    "pm": 0.01, "picometer": 0.01, "nm": 10.0, "nanometer": 10.0, "nanometers": 10.0,
    "um": 1e4, "µm": 1e4, "μm": 1e4, "micron": 1e4, "microns": 1e4, "micrometer": 1e4,
    "mm": 1e7, "millimeter": 1e7, "cm": 1e8, "centimeter": 1e8, "m": 1e10, "meter": 1e10,
    "in": 2.54e8, "inch": 2.54e8}
_TIFF_RESUNIT_ANGSTROM = {2: 2.54e8, 3: 1e8, 4: 1e7, 5: 1e4}  # inch, cm, mm, µm


# --------------------------------------------------------------------------- lazy arrays
class LazyStack:
    """Read-only ``(T, Y, X)`` stack whose frames are read on demand.

    Parameters
    ----------
    read : callable
        ``read(start, stop) -> ndarray`` of shape ``(stop - start, Y, X)``.
    shape : tuple of int
        ``(T, Y, X)``.
    dtype : numpy dtype
        Dtype of the frames as stored.

    Supports ``arr[i]``, ``arr[a:b:s]``, integer lists and trailing Y/X indices, so it
    works with ``np.asarray`` and ``dask.array.from_array``.
    """

    ndim = 3

    def __init__(self, read, shape, dtype):
        self._read, self.shape, self.dtype = read, tuple(int(n) for n in shape), np.dtype(dtype)

    def __len__(self):
        return self.shape[0]

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def _frames(self, start, stop):
        if stop <= start:
            return np.empty((0,) + self.shape[1:], self.dtype)
        return np.asarray(self._read(start, stop))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1:]
        first, rest = (key[0] if key else slice(None)), key[1:]
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            i = operator.index(first) + (n if first < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"frame {first} out of range for {n} frames")
            return self._frames(i, i + 1)[0][rest]
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            out = self._frames(start, stop)[::step] if step > 0 else self[list(range(start, stop, step))]
        else:  # integer list/array or boolean mask
            idx = np.arange(n)[np.asarray(first)]
            parts = [self._frames(int(i), int(i) + 1) for i in idx]
            out = np.concatenate(parts) if parts else self._frames(0, 0)
        return out[(slice(None),) + rest]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyStack(shape={self.shape}, dtype={self.dtype})"


class _Offset:
    """Frames ``[start + a, start + b)`` of ``base`` (picklable, unlike a lambda)."""

    def __init__(self, base, start, squeeze_axis=None):
        self.base, self.start, self.axis = base, start, squeeze_axis

    def __call__(self, a, b):
        if self.axis is None:  # plain (T, Y, X)
            return np.asarray(self.base[self.start + a:self.start + b])
        # base has singleton axes; `axis` is the only leading one that is not (if any)
        key = tuple(slice(self.start + a, self.start + b) if d == self.axis else 0
                    for d in range(self.base.ndim - 2))
        return np.asarray(self.base[key]).reshape((b - a,) + tuple(self.base.shape[-2:]))


class _TiffReader(vendor.LazyReader):
    """Reads frames of TIFF series 0 page by page; keeps one handle open per process."""

    def __init__(self, path, frame_shape, per_page):
        super().__init__()
        self.path, self.frame_shape, self.per_page = path, frame_shape, per_page

    def _open(self):
        return tifffile.TiffFile(self.path)

    def _read(self, tif, a, b):
        if self.per_page:
            data = tif.asarray(series=0, key=range(a, b))
        else:  # frames are not one per page: read the whole (small) series
            data = tif.series[0].asarray().reshape((-1,) + self.frame_shape)[a:b]
        return data.reshape((b - a,) + self.frame_shape)


class _FolderReader:
    """Reads frame ``i`` from the i-th single-frame file of a folder."""

    def __init__(self, files, options=None):
        self.files, self.options = files, options

    def __call__(self, a, b):
        return np.stack([np.asarray(_open_file(f, self.options)[0][0]) for f in self.files[a:b]])


# --------------------------------------------------------------------------- helpers
def _natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(path).name)]


def _to_angstrom(value, unit):
    """``value`` in ``unit`` -> Å, or None if the unit is unknown or the value invalid."""
    if unit is None or value is None:
        return None
    unit = str(unit).strip()
    if "\\u" in unit:  # ImageJ escapes non-ASCII units, e.g. '\\u00C5'
        unit = unit.encode("ascii", "ignore").decode("unicode_escape")
    factor = _TO_ANGSTROM.get(unit.lower())
    return _clean_pixel_size(float(value) * factor) if factor else None


def _clean_pixel_size(px):
    """Positive finite float rounded to 9 significant digits (hides rational noise), else None."""
    try:
        px = float(px)
    except (TypeError, ValueError):
        return None
    return float(f"{px:.9g}") if math.isfinite(px) and px > 0 else None


def _check_dtype(dtype, path):
    dtype = np.dtype(dtype)
    if dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise InputError(path, f"unsupported dtype {dtype.name!r}; supported: {names}")


def _to_tyx(arr, path):
    """Give a 2D (Y, X) array a leading T=1 axis without reading it; reject other ndim."""
    if arr.ndim == 3:
        return arr
    if arr.ndim == 2:
        if isinstance(arr, np.ndarray):
            return arr[np.newaxis]
        return LazyStack(_Offset(arr, 0, squeeze_axis=0), (1,) + tuple(arr.shape), arr.dtype)
    raise InputError(path, f"has {arr.ndim} dimensions {tuple(arr.shape)}; "
                           "expected 2 (Y, X) or 3 (T, Y, X)")


def _block_step(arr, max_frames=64) -> int:
    """Frames per block of :func:`_iter_blocks`: at most ``_MAX_BLOCK_BYTES``, >= 1."""
    frame_bytes = max(1, math.prod(arr.shape[1:]) * np.dtype(arr.dtype).itemsize)
    return max(1, min(max_frames, _MAX_BLOCK_BYTES // frame_bytes))


def _iter_blocks(arr, max_frames=64):
    """Yield ``(start, block)`` over frames, each block at most ``_MAX_BLOCK_BYTES``."""
    t = arr.shape[0]
    step = _block_step(arr, max_frames)
    for a in range(0, t, step):
        yield a, np.asarray(arr[a:a + step])


def _stack_for_writing(stack):
    if stack.ndim == 2:
        return np.asarray(stack)[np.newaxis]
    if stack.ndim != 3:
        raise ValueError(f"expected a (T, Y, X) or (Y, X) stack, got shape {tuple(stack.shape)}")
    return stack


def _jsonable(obj):
    """Deep copy of ``obj`` with numpy scalars/arrays and paths made JSON-safe."""
    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)
    return json.loads(json.dumps(obj or {}, default=default))


# --------------------------------------------------------------------------- checksums, atomic writes
def _hash_file(h, path):
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            h.update(chunk)
    return h


def _sha256_files(root, files):
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).relative_to(root).as_posix().encode() + b"\0")
        h.update(Path(f).stat().st_size.to_bytes(8, "little"))
        _hash_file(h, f)
    return h.hexdigest()


def sha256_path(path) -> str:
    """Hex SHA-256 of a file, or of every file in a directory tree (sorted relative
    paths, each hashed as name + size + contents, so renames change the digest)."""
    p = Path(path)
    if p.is_file():
        return _hash_file(hashlib.sha256(), p).hexdigest()
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file()),
                       key=lambda f: f.relative_to(p).as_posix())
        return _sha256_files(p, files)
    raise InputError(p, "does not exist")


def _temp_name(final, tag="tmp"):
    final = Path(final)
    stem, suffix = (final.stem, final.suffix) if final.suffix else (final.name, "")
    return final.with_name(f".{stem}.{tag}-{secrets.token_hex(4)}{suffix}")


def _discard(tmp):
    if tmp.is_dir() and not tmp.is_symlink():
        # after a failed write, zarr's concurrent chunk writes may still be landing:
        # remove until nothing comes back (bounded: about 2 s)
        gone = 0
        for _ in range(40):  # gone on two checks 50 ms apart
            shutil.rmtree(tmp, ignore_errors=True)
            gone = gone + 1 if not tmp.exists() else 0
            if gone == 2:
                return
            time.sleep(0.05)
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


def _commit(tmp, final):
    if final.exists() and (final.is_dir() or tmp.is_dir()):
        # directories cannot be replaced in one step: move the old one aside first
        old = _temp_name(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        _discard(old)
    else:
        os.replace(tmp, final)  # atomic for files on one filesystem


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path beside ``final_path``; rename it there on success.

    The temporary name is hidden and keeps the extension last (``denoised.tif`` ->
    ``.denoised.tmp-1a2b3c4d.tif``) so writers choose the right format. The body must
    create it (file or directory). On an exception the temporary is deleted and the
    exception re-raised (a full disk as :class:`DiskFullError` naming ``final_path``);
    an existing ``final_path`` is left untouched. The parent directory is created if
    needed.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(final)
    try:
        yield tmp
    except BaseException as exc:
        _discard(tmp)
        if _is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(final) from None
        raise
    _commit(tmp, final)



@contextlib.contextmanager
def scratch_array(near, shape, chunks=None):
    """Yield a writable float32 Zarr array of ``shape`` in a hidden folder beside ``near``
    (``.NAME.scratch-XXXXXXXX``), removed on exit whatever happens: working space that
    is larger than memory may hold (e.g. NL-means' temporal averages).  chunks: None =
    whole frames (1, Y, X)."""
    path = _temp_name(near, "scratch")
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(n) for n in shape)
    try:
        with _disk_full_as_error(near):
            arr = zarr.create_array(str(path), shape=shape, chunks=tuple(chunks or (1,) + shape[1:]),
                                    dtype="float32", fill_value=0, zarr_format=3)
        yield arr
    finally:
        _discard(path)

# --------------------------------------------------------------------------- TIFF
class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _tifffile_warnings():
    """Collect tifffile's logged warnings (it logs, rather than raises, on truncation)."""
    handler, logger = _LogCapture(), logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _tiff_pixel_size(tif, page):
    if tif.is_ome:
        px = _ome_tiff_pixel_size(tif.ome_metadata)
        if px:
            return px
    xres, resunit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or not xres.value[0]:
        return None
    per_pixel = xres.value[1] / xres.value[0]  # resolution is pixels per unit
    unit = (tif.imagej_metadata or {}).get("unit")
    if unit:
        return _to_angstrom(per_pixel, unit)
    factor = _TIFF_RESUNIT_ANGSTROM.get(int(resunit.value) if resunit else 1)
    return _clean_pixel_size(per_pixel * factor) if factor else None


def _ome_tiff_pixel_size(xml):
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and el.get("PhysicalSizeX"):
            return _to_angstrom(el.get("PhysicalSizeX"), el.get("PhysicalSizeXUnit", "µm"))
    return None


def _tiff_layout(path, series, page):
    """(T, Y, X) shape of series 0 and notes on how other axes were mapped to T."""
    kept = [(a, n) for a, n in zip(series.axes, series.shape) if n > 1 or a in "YX"]
    axes, sizes = "".join(a for a, _ in kept), [n for _, n in kept]
    if not axes.endswith("YX") or page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        raise InputError(path, f"unsupported TIFF layout (axes {series.axes!r}, shape {series.shape}, "
                               f"{page.photometric.name}); expected grayscale frames of (Y, X)")
    lead = dict(zip(axes[:-2], sizes[:-2]))
    if "C" in lead:
        raise InputError(path, f"has {lead['C']} channels; expected a single-channel stack")
    notes = []
    if "S" in lead:  # old tifffile wrote 3-4 frame stacks as planar RGB
        notes.append(f"read {lead['S']} planar samples ({page.photometric.name}) as frames")
    if len(lead) > 1:
        notes.append(f"flattened TIFF axes {axes[:-2]!r} of sizes {sizes[:-2]} into "
                     f"{math.prod(sizes[:-2])} frames")
    return (math.prod(sizes[:-2]), sizes[-2], sizes[-1]), notes


def _tiff_check_complete(path, tif, series, shape, warnings_seen):
    size = path.stat().st_size
    bad = [m for m in warnings_seen if re.search(r"invalid|corrupt|truncat|failed|reshape", m, re.I)]
    if bad:
        raise InputError(path, f"truncated or corrupt TIFF ({bad[0]})")
    images = (tif.imagej_metadata or {}).get("images", 1)
    if series.dataoffset is not None and series.dataoffset + series.nbytes > size or images > shape[0]:
        raise InputError(path, f"truncated TIFF: file has {size} bytes, less than its headers describe")
    for page in [] if series.dataoffset is not None else series.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)] if page else []
        if ends and max(ends) > size:
            raise InputError(path, f"truncated TIFF: image data ends past the end of the file ({size} bytes)")


def _open_tiff(path):
    with _tifffile_warnings() as seen:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile raises many types for corrupt headers
            raise InputError(path, f"not a readable TIFF file ({exc})") from exc
        with tif:
            try:
                series, page = tif.series[0], tif.pages.first
                shape, notes = _tiff_layout(path, series, page)
                _tiff_check_complete(path, tif, series, shape, seen)
            except InputError:
                raise
            except Exception as exc:
                raise InputError(path, f"corrupt TIFF ({exc})") from exc
            meta = {"pixel_size": _tiff_pixel_size(tif, page), "notes": notes}
            tag = page.tags.get(_TIFF_META_TAG)
            if tag is not None:
                with contextlib.suppress(ValueError, TypeError):
                    meta["extra"] = json.loads(tag.value)
            contiguous = series.dataoffset is not None
            per_page, dtype = len(series.pages) == shape[0], series.dtype
    if contiguous:  # uncompressed and contiguous: map it, no copy
        with contextlib.suppress(ValueError):
            return tifffile.memmap(path, series=0, mode="r").reshape(shape), meta
    return LazyStack(_TiffReader(path, shape[1:], per_page), shape, dtype), meta


# --------------------------------------------------------------------------- MRC, NPY
def _mrc_problem(exc):
    msg = str(exc)
    if "Map ID" in msg:
        return "not a valid MRC header (bad MAP id)"
    if "mode" in msg.lower():
        mode = re.search(r"'?(-?\d+)'?", msg)
        return f"not a valid MRC header (mode {mode.group(1) if mode else '?'} unsupported)"
    if "enough bytes" in msg:
        return "truncated: too small to hold an MRC header (1024 bytes)"
    return f"not a valid MRC file ({msg})"


def _read_tilt_angles(path, n_frames, meta):
    for tlt in (path.with_suffix(".tlt"), path.with_suffix(".rawtlt")):
        if not tlt.is_file():
            continue
        try:
            angles = [float(line.split()[0]) for line in tlt.read_text().splitlines() if line.strip()]
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            meta["notes"].append(f"ignored {tlt.name}: unreadable ({exc})")
            continue
        if len(angles) != n_frames:  # not fatal: the stack itself is still usable
            meta["notes"].append(f"ignored {tlt.name}: {len(angles)} angles for {n_frames} frames")
            continue
        meta["tilt_angles"], meta["tilt_angles_file"] = angles, str(tlt)
        return


def _open_mrc(path):
    try:
        with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
            h = mrc.header
            dims, mode, nsymbt = (int(h.nx), int(h.ny), int(h.nz)), int(h.mode), int(h.nsymbt)
            itemsize = mrcfile.utils.dtype_from_mode(h.mode).itemsize
    except ValueError as exc:
        raise InputError(path, _mrc_problem(exc)) from exc
    expected, size = 1024 + nsymbt + math.prod(dims) * itemsize, path.stat().st_size
    if size < expected:
        raise InputError(path, f"truncated MRC: file has {size} bytes, header (mode {mode}, "
                               f"{dims[0]}x{dims[1]}x{dims[2]}) needs {expected}")
    try:
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            d = mrc.data  # own memmap below so it outlives the mrcfile object
            arr = np.memmap(path, dtype=d.dtype, mode="r", offset=d.offset, shape=d.shape)
            meta = {"pixel_size": _clean_pixel_size(mrc.voxel_size.x), "notes": [],
                    "extra": {"mode": mode, "ispg": int(mrc.header.ispg), "nsymbt": nsymbt,
                              "exttyp": bytes(mrc.header.exttyp).decode("ascii", "replace").strip("\0 "),
                              "labels": [s.strip() for s in mrc.get_labels()]}}
    except ValueError as exc:
        raise InputError(path, _mrc_problem(exc)) from exc
    n_frames = 1 if arr.ndim == 2 else arr.shape[0]
    _read_tilt_angles(path, n_frames, meta)
    _read_mdoc(path, n_frames, meta)
    return arr, meta


def _read_mdoc(path, n_frames, meta):
    """SerialEM ``.mdoc`` beside the stack: tilt angles (unless a .tlt gave them), pixel
    spacing (when the header has none), dose and exposure per frame; problems are notes."""
    mdoc = vendor.mdoc_for(path)
    if mdoc is None:
        return
    try:
        md = vendor.read_mdoc(mdoc, n_frames)
    except ImportError:
        meta["notes"].append(f"ignored {mdoc.name}: reading .mdoc needs the optional package "
                             "'mdocfile'; pip install mdocfile")
        return
    except Exception as exc:  # a malformed mdoc must not make the stack unreadable
        meta["notes"].append(f"ignored {mdoc.name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
        return
    px = _clean_pixel_size(md.pop("pixel_size", None))
    if px and not meta.get("pixel_size"):
        meta["pixel_size"] = px
    elif px and abs(px - meta["pixel_size"]) > 1e-3 * px:
        meta["notes"].append(f"{mdoc.name} PixelSpacing {px} Å differs from the MRC header's "
                             f"{meta['pixel_size']} Å; kept the header's")
    if "tilt_angles" in meta:
        md.pop("tilt_angles", None)
    meta.update(md)


def _open_npy(path):
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        msg = str(exc)
        if "mmap length" in msg or "file size" in msg:
            problem = "truncated .npy file (data shorter than its header says)"
        elif "Python objects" in msg:
            problem = "unsupported dtype 'object'"
        else:
            problem = f"not a valid .npy file ({msg.split('.')[0]})"
        raise InputError(path, problem) from exc
    return arr, {"pixel_size": None, "notes": []}


# --------------------------------------------------------------------------- Zarr
def _open_zarr_node(path):
    if not Path(path).exists():
        raise InputError(path, "does not exist")
    try:
        return zarr.open(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for non-zarr directories
        raise InputError(path, f"not a readable Zarr array or group ({type(exc).__name__}: {exc})") from exc


def _ome_dataset(path, attrs):
    """(dataset path, pixel size in Å or None) from OME-Zarr 0.4/0.5 multiscales."""
    ome = attrs.get("ome", attrs)  # 0.5 nests under 'ome'; 0.4 is top-level
    try:
        ms = ome["multiscales"][0]
        ds = ms["datasets"][0]
    except (KeyError, IndexError, TypeError):
        return None, None
    axes = [a if isinstance(a, dict) else {"name": a} for a in ms.get("axes", [])]
    names = [a.get("name") for a in axes]
    ix = names.index("x") if "x" in names else len(names) - 1
    scale = next((t.get("scale") for t in ds.get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    px = None
    if scale and axes and len(scale) == len(axes):
        px = _to_angstrom(scale[ix], axes[ix].get("unit"))
    return ds.get("path"), px


def strided_sample(stack, step: int) -> np.ndarray:
    """Every ``step``-th element of a (T, Y, X) stack in C order, as float32: equal to
    ``np.asarray(stack, float32).ravel()[::step]``, but an array-like that is not in
    memory (a Zarr array) is read one frame at a time, so memory stays ~one frame."""
    if isinstance(stack, np.ndarray):
        return np.asarray(stack, dtype=np.float32).ravel()[::step]
    per = int(np.prod(stack.shape[1:]))
    parts = []
    for t in range(stack.shape[0]):
        first = (-t * per) % step  # offset of frame t's first sampled element
        if first < per:
            # a copy: a strided view would keep its whole frame alive until the end
            parts.append(np.asarray(stack[t], dtype=np.float32).ravel()[first::step].copy())
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def read_zarr(path):
    """Open a Zarr array, an OME-Zarr group or a group written by :func:`write_zarr`.

    Returns
    -------
    arr : zarr.Array
        Read-only; ``(T, Y, X)`` for stacks written here.
    attrs : dict
        The group's ``'emdenoise'`` attributes (for a plain array: its attributes),
        with ``'pixel_size'`` (Å or None) filled from the OME scale if absent.
    """
    node = _open_zarr_node(path)
    if isinstance(node, zarr.Array):
        attrs = dict(node.attrs)
        return node, dict(attrs.get("emdenoise", attrs))
    attrs = dict(node.attrs)
    ds_path, px = _ome_dataset(path, attrs)
    ds_path = ds_path or "0"
    try:
        arr = node[ds_path]
    except KeyError as exc:
        raise InputError(path, f"Zarr group has no array {ds_path!r} (and no OME multiscales)") from exc
    if not isinstance(arr, zarr.Array):
        raise InputError(path, f"Zarr node {ds_path!r} is a group, not an array")
    out = dict(attrs.get("emdenoise", {}))
    if out.get("pixel_size") is None:
        out["pixel_size"] = px
    return arr, out


def _open_zarr(path):
    arr, attrs = read_zarr(path)
    lead = [d for d in range(arr.ndim - 2) if arr.shape[d] > 1]
    if arr.ndim > 3 and len(lead) <= 1:  # e.g. OME (t, c, z, y, x) with singletons
        axis = lead[0] if lead else 0
        shape = (arr.shape[axis],) + tuple(arr.shape[-2:])
        arr = LazyStack(_Offset(arr, 0, squeeze_axis=axis), shape, arr.dtype)
    extra = {k: v for k, v in attrs.items() if k != "pixel_size"}
    meta = {"pixel_size": _clean_pixel_size(attrs.get("pixel_size")), "notes": [], "extra": extra}
    if "detector_mode" in extra:
        meta["detector_mode"] = extra["detector_mode"]
    return arr, meta


# --------------------------------------------------------------------------- folders, dispatch
def _open_folder(path, options=None):
    files = sorted((f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                    and f.suffix.lower() in _FOLDER_EXT), key=_natural_key)
    if not files:
        raise InputError(path, "empty folder: no frame files (" + ", ".join(sorted(_FOLDER_EXT)) + ")")
    first, meta = _open_file(files[0], options)
    for f in files:
        arr = first if f == files[0] else _open_file(f, options)[0]
        if arr.shape[0] != 1:
            raise InputError(f, f"has {arr.shape[0]} frames; folder members must be single frames")
        if arr.shape != first.shape or arr.dtype != first.dtype:
            raise InputError(f, f"frame shape/dtype {arr.shape[1:]} {arr.dtype.name} differs from "
                                f"{files[0].name} {first.shape[1:]} {first.dtype.name}")
    shape = (len(files),) + tuple(first.shape[1:])
    calib = {k: meta[k] for k in CALIBRATION_KEYS if k in meta and k != "tilt_angles"}
    if "exposure_time" in calib and "frame_time" not in calib:  # per-frame files: one exposure each
        calib["frame_time"] = calib["exposure_time"]
    meta = {"pixel_size": meta["pixel_size"], "notes": [], "n_files": len(files),
            "files": [files[0].name, files[-1].name], **calib}
    return LazyStack(_FolderReader(files, options), shape, first.dtype), meta, files


def _open_vendor(path, fmt, options):
    """A vendor file (:mod:`emdenoise.vendor`) as a LazyStack; its x scale and unit -> Å."""
    if fmt == "eer":
        read, shape, dtype, meta = vendor.open_eer(
            path, group=options.get("eer_group") or vendor.EER_GROUP,
            upsampling=options.get("eer_upsampling") or vendor.EER_UPSAMPLING)
    else:
        read, shape, dtype, meta = vendor.open_rsciio(path, fmt)
    cal = meta.get("calibration", {})
    scale, unit = cal.get("x_scale"), cal.get("x_unit")
    meta["pixel_size"] = _to_angstrom(scale, unit) if unit and "/" not in str(unit) else None
    if meta["pixel_size"] is None and unit and str(unit).strip():
        meta["notes"].append(f"pixel size {scale} {unit} is not a real-space length; ignored")
    return LazyStack(read, shape, dtype), meta


_OPENERS = {"tiff": _open_tiff, "mrc": _open_mrc, "npy": _open_npy,
            **{fmt: (lambda p, o, fmt=fmt: _open_vendor(p, fmt, o)) for fmt in ("dm", "tia", "emd", "eer")}}
_NEEDS_OPTIONS = {"dm", "tia", "emd", "eer"}


def _detect_format(path):
    if not path.exists():
        raise InputError(path, "does not exist (no such file or directory)")
    if path.is_dir():
        markers = ("zarr.json", ".zarray", ".zgroup")
        is_zarr = path.suffix.lower() == ".zarr" or any((path / m).exists() for m in markers)
        return "zarr" if is_zarr else "folder"
    fmt = _EXT_FORMAT.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(_EXT_FORMAT)) + ", .zarr (directory) or a folder of frames"
        raise InputError(path, f"unknown file extension {path.suffix!r}; expected {known}")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    return fmt


def _open_file(path, options=None):
    """Open one file as (T, Y, X) with a supported dtype; no checksum. ``options``: reader
    settings (``eer_group``, ``eer_upsampling``)."""
    fmt = _detect_format(path)
    try:
        opener = _OPENERS[fmt]
        arr, meta = opener(path, options or {}) if fmt in _NEEDS_OPTIONS else opener(path)
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror or exc})") from exc
    arr = _to_tyx(arr, path)
    _check_dtype(arr.dtype, path)
    return arr, meta


def _select_frames(arr, frames, path):
    try:
        start, stop = frames
        start, stop, _ = slice(start, stop).indices(arr.shape[0])
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"frames must be (start, stop) integers, got {frames!r}") from exc
    if stop <= start:
        raise InputError(path, f"frames={tuple(frames)} selects no frames (stack has {arr.shape[0]})")
    if isinstance(arr, np.ndarray):
        return arr[start:stop]  # a view of the memmap
    return LazyStack(_Offset(arr, start), (stop - start,) + tuple(arr.shape[1:]), arr.dtype)


def read_stack(path, pixel_size: float | None = None, frames: tuple[int, int] | None = None,
               *, eer_group: int | None = None, eer_upsampling: int | None = None):
    """Open a stack lazily, read-only.

    Parameters
    ----------
    path : str or Path
        TIFF / OME-TIFF / ImageJ hyperstack, MRC (.mrc .mrcs .st .ali .rec .map; a
        SerialEM ``.mdoc`` beside it adds tilt angles, dose and pixel spacing), .npy,
        a Zarr v3 array or OME-Zarr group directory, Gatan .dm3/.dm4, TIA .ser/.emi,
        Velox/NCEM .emd, Falcon .eer (:mod:`emdenoise.vendor`; optional packages), or a
        folder of single-frame files (.tif .tiff .mrc .npy .dm3 .dm4, natural sort
        order, hidden files ignored).
    pixel_size : float, optional
        Pixel size in Å; overrides the file's.
    frames : (int, int), optional
        ``(start, stop)`` frame range with Python slice semantics (after EER grouping).
    eer_group, eer_upsampling : int, optional
        EER only: raw frames summed per output frame (default
        ``vendor.EER_GROUP`` = 20) and super-resolution factor 1, 2 or 4 (default 1).

    Returns
    -------
    arr : np.memmap, zarr.Array or LazyStack
        Shape ``(T, Y, X)``, the file's dtype. Use ``np.asarray(arr[a:b], dtype=np.float32)``.
    meta : dict
        ``source``, ``format``, ``pixel_size`` (Å or None), ``pixel_size_source``
        ('file', 'config' or None), ``sha256``, ``dtype``, ``shape``, ``notes`` and,
        where available, ``n_files``, ``tilt_angles`` (degrees), ``detector_mode``,
        ``extra`` and the acquisition calibration :data:`CALIBRATION_KEYS`
        (``frame_time`` s, ``exposure_time`` s, ``dose_per_frame`` in ``dose_unit``).

    Raises
    ------
    InputError
        Missing, empty, truncated or corrupt input, unknown format, unsupported dtype
        or dimensionality, inconsistent folder members, or an invalid ``frames``.
    """
    p = Path(path)
    fmt = _detect_format(p)
    options = {"eer_group": eer_group, "eer_upsampling": eer_upsampling}
    if fmt == "folder":
        arr, meta, files = _open_folder(p, options)
        digest = _sha256_files(p, files)
    else:
        if fmt == "zarr":
            arr, meta = _open_zarr(p)
            arr = _to_tyx(arr, p)
            _check_dtype(arr.dtype, p)
        else:
            arr, meta = _open_file(p, options)
        digest = sha256_path(p)
    meta.update(source=str(p.resolve()), format=fmt, sha256=digest, dtype=np.dtype(arr.dtype).name,
                pixel_size_source="file" if meta.get("pixel_size") else None)
    if pixel_size is not None:
        px = _clean_pixel_size(pixel_size)
        if px is None:
            raise InputError(p, f"pixel_size must be a positive number of Å, got {pixel_size!r}")
        meta.update(pixel_size_file=meta.get("pixel_size"), pixel_size=px, pixel_size_source="config")
    meta["n_frames_total"] = int(arr.shape[0])
    if frames is not None:
        arr = _select_frames(arr, frames, p)
        meta["frames"] = [*slice(*frames).indices(meta["n_frames_total"])[:2]]
    meta["shape"] = [int(n) for n in arr.shape]
    return arr, meta


def validate_stack(arr, path, *, min_frames: int = 1, min_size: int = 16,
                   check_finite: bool = True, chunk_frames: int = 64) -> None:
    """Check that a ``(T, Y, X)`` stack is usable by a stage.

    Non-square frames are fine. Finite-ness is checked for float dtypes only, reading
    at most ``chunk_frames`` frames (and at most 256 MiB) at a time.

    Raises
    ------
    InputError
        If ndim != 3, the dtype is unsupported, T < ``min_frames``, Y or X <
        ``min_size`` px, or (``check_finite``) any NaN/Inf is present — with the count
        and the first bad frame index.
    """
    shape = tuple(arr.shape)
    if len(shape) != 3:
        raise InputError(path, f"has shape {shape}; expected (T, Y, X)")
    _check_dtype(arr.dtype, path)
    t, y, x = shape
    if t < min_frames:
        what = "1 frame (a single image, not a movie)" if t == 1 else f"{t} frames"
        raise InputError(path, f"has {what}; this stage needs at least {min_frames}")
    if min(y, x) < min_size:
        raise InputError(path, f"frames are too small ({y}x{x} px); this stage needs at least "
                               f"{min_size} px in Y and X")
    if not (check_finite and np.dtype(arr.dtype).kind == "f"):
        return
    n_nan = n_inf = 0
    first = None
    for a, block in _iter_blocks(arr, chunk_frames):
        nan, inf = np.isnan(block), np.isinf(block)
        n_nan, n_inf = n_nan + int(nan.sum()), n_inf + int(inf.sum())
        if first is None and (n_nan or n_inf):
            first = a + int(np.argmax((nan | inf).reshape(len(block), -1).any(axis=1)))
    if n_nan or n_inf:
        raise InputError(path, f"contains {n_nan} NaN and {n_inf} Inf values "
                               f"(first in frame {first}); all pixels must be finite")


def describe(path, pixel_size: float | None = None, **options) -> dict:
    """Summary used by ``emdenoise info``: format, shape, dtype, pixel size (Å; the
    argument overrides the file's), sha256, the acquisition calibration the file holds
    (``frame_time`` s, ``exposure_time`` s, ``dose_per_frame``/``dose_unit``,
    ``tilt_angles`` degrees; only those present), and min/max/mean of finite values plus
    NaN/Inf counts over up to 16 evenly spaced frames (``sampled_frames``). ``options``:
    ``eer_group``, ``eer_upsampling`` (see :func:`read_stack`)."""
    arr, meta = read_stack(path, pixel_size=pixel_size, **options)
    t = arr.shape[0]
    idx = np.unique(np.linspace(0, t - 1, min(t, 16)).round().astype(int))
    lo, hi, total, count, n_nan, n_inf = math.inf, -math.inf, 0.0, 0, 0, 0
    for i in idx:
        f = np.asarray(arr[int(i)], dtype=np.float32)
        finite = np.isfinite(f)
        n_nan, n_inf = n_nan + int(np.isnan(f).sum()), n_inf + int(np.isinf(f).sum())
        if finite.any():
            v = f[finite]
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
            total, count = total + float(v.sum(dtype=np.float64)), count + v.size
    keys = ("source", "format", "shape", "dtype", "pixel_size", "pixel_size_source", "sha256", "notes")
    calib = {k: meta[k] for k in CALIBRATION_KEYS if k in meta}
    return {**{k: meta.get(k) for k in keys}, **_jsonable(calib), "sampled_frames": idx.tolist(),
            "min": lo if count else None, "max": hi if count else None,
            "mean": total / count if count else None, "n_nan": n_nan, "n_inf": n_inf}


# --------------------------------------------------------------------------- writers
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy tofile on a full disk


def _is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped (zarr's async stores chain the OSError),
    and for numpy's short-write OSError, which carries no errno."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in _DISK_FULL_ERRNOS
                                         or (exc.errno is None and _SHORT_WRITE.search(str(exc)))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _disk_full_as_error(path):
    """Turn ENOSPC/EDQUOT raised inside into :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if _is_disk_full(exc):
            raise DiskFullError(path) from None
        raise


def _reserve(fh, nbytes, path):
    """Allocate ``nbytes`` for an open file before it is memory-mapped.

    Writing through a mapping of a sparse file on a full disk kills the process with
    SIGBUS; with the blocks allocated up front the disk-full case is an ENOSPC here.
    Where ``posix_fallocate`` is unsupported, the free space is checked instead.
    """
    try:
        os.posix_fallocate(fh.fileno(), 0, int(nbytes))
        return
    except OSError as exc:
        if exc.errno in _DISK_FULL_ERRNOS:
            raise DiskFullError(path, f"needs {nbytes / 2**20:.1f} MiB") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    free = shutil.disk_usage(Path(fh.name).parent).free
    if free < nbytes:
        raise DiskFullError(path, f"needs {nbytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")


def _frame_time(metadata):
    ft = (metadata or {}).get("frame_time")
    try:
        ft = float(ft)
    except (TypeError, ValueError):
        return None
    return ft if math.isfinite(ft) and ft > 0 else None


def write_tiff(path, stack, pixel_size: float | None = None, metadata: dict | None = None) -> None:
    """Write an ImageJ-compatible float32 hyperstack (axes ``'TYX'``), atomically.

    ``pixel_size`` (Å) is stored as resolution in ``nm`` (ImageJ unit ``'nm'``), so
    Fiji shows the calibrated size; ``metadata['frame_time']`` (s between frames), when
    known, becomes the ImageJ ``finterval``. ``metadata`` is stored as JSON in private tag
    65000 (ImageJ owns the ImageDescription). BigTIFF is used above 4 GiB. Frames are
    streamed, so ``stack`` may be a lazy or Zarr array. A full disk raises
    :class:`DiskFullError` and leaves nothing behind.
    """
    stack = _stack_for_writing(stack)
    shape = tuple(int(n) for n in stack.shape)
    ij = {"axes": "TYX"}
    kwargs = {}
    if pixel_size:
        per_nm = 10.0 / float(pixel_size)
        kwargs["resolution"] = (per_nm, per_nm)
        ij["unit"] = "nm"
    ft = _frame_time(metadata)
    if ft:
        ij["finterval"] = ft
    extra = json.dumps(_jsonable({**(metadata or {}), "pixel_size": pixel_size,
                                  "emdenoise_version": __version__}))
    frames = (f for _, block in _iter_blocks(stack) for f in block.astype(np.float32, copy=False))
    with _disk_full_as_error(path), atomic_path(path) as tmp, warnings.catch_warnings():
        # BigTIFF ImageJ files are "nonconformant" but Fiji reads them
        warnings.filterwarnings("ignore", message=".*nonconformant BigTIFF ImageJ")
        tifffile.imwrite(tmp, frames, shape=shape, dtype=np.float32, imagej=True,
                         photometric="minisblack", bigtiff=math.prod(shape) * 4 > 2**32 - 2**25,
                         extratags=[(_TIFF_META_TAG, "s", 0, extra, True)], metadata=ij, **kwargs)


def write_mrc(path, stack, pixel_size: float | None = None, tilt_angles=None) -> None:
    """Write a float32 MRC (mode 2) image stack (``ispg`` 0) for IMOD/RELION, atomically.

    ``pixel_size`` (Å) goes to the voxel size (0 = unknown). Header statistics are
    computed while streaming frames. ``tilt_angles`` (degrees, one per frame) are
    written to an IMOD ``.tlt`` beside the file, also atomically. The file's blocks are
    allocated before any data is written, so a full disk raises :class:`DiskFullError`
    (temporary removed) instead of killing the process by SIGBUS.

    ``stack`` may be lazy (Zarr): frames are streamed in blocks of at most 256 MB and
    written with plain file writes after the header (not through the memory map, whose
    touched pages would count in the process's resident memory): peak memory ~ one block.
    """
    stack = _stack_for_writing(stack)
    shape = tuple(int(n) for n in stack.shape)
    if tilt_angles is not None and len(tilt_angles) != shape[0]:
        raise ValueError(f"{len(tilt_angles)} tilt angles for {shape[0]} frames")
    lo, hi, s1, s2 = math.inf, -math.inf, 0.0, 0.0
    with _disk_full_as_error(path), atomic_path(path) as tmp:
        with mrcfile.new_mmap(tmp, shape, mrc_mode=2, overwrite=True) as mrc:
            start, dtype = int(mrc.header.nbytes + mrc.extended_header.nbytes), mrc.data.dtype
            with open(tmp, "r+b") as fh:  # the file is sparse until written
                _reserve(fh, start + math.prod(shape) * 4, path)
                fh.seek(start)
                for a, block in _iter_blocks(stack):
                    block = np.ascontiguousarray(block, dtype=dtype)
                    fh.write(block.data)
                    lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
                    s1 = s1 + float(block.sum(dtype=np.float64))
                    s2 = s2 + float(np.square(block, dtype=np.float64).sum())
            mrc.set_image_stack()
            if pixel_size:
                mrc.voxel_size = float(pixel_size)
            n = math.prod(shape)  # mrcfile's update_header_stats would load everything
            mean = s1 / n
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
            mrc.header.rms = math.sqrt(max(s2 / n - mean * mean, 0.0))
            mrc.add_label(f"emdenoise {__version__}")
        if tilt_angles is not None:
            with atomic_path(Path(path).with_suffix(".tlt")) as tlt:
                tlt.write_text("".join(f"{float(a):.2f}\n" for a in tilt_angles))


#: OME-Zarr pyramid: 2x-binned levels are added while the smaller frame edge stays at or
#: above this many px, at most ``_PYRAMID_MAX_LEVELS`` of them (level 0 is the data).
_PYRAMID_MIN_EDGE = 256
_PYRAMID_MAX_LEVELS = 4
AXES = ("t", "y", "x")


def pyramid_levels(frame_shape) -> int:
    """Number of 2x-downsampled levels written after level 0 for frames ``(Y, X)``."""
    edge, n = min(int(v) for v in frame_shape), 0
    while n < _PYRAMID_MAX_LEVELS and edge // 2 ** (n + 1) >= _PYRAMID_MIN_EDGE:
        n += 1
    return n


def _ome_attrs(name, pixel_size, attrs, n_levels=1):
    """OME-Zarr 0.5 group attributes: axes t (time, unit second when ``attrs['frame_time']``
    is known), y, x (space, angstrom when ``pixel_size`` is known); one dataset per level
    with scale ``[frame_time or 1, px * 2**k, px * 2**k]``."""
    space = {"type": "space", "unit": "angstrom"} if pixel_size else {"type": "space"}
    px = float(pixel_size) if pixel_size else 1.0
    ft = _frame_time(attrs)
    t_axis = {"name": "t", "type": "time", **({"unit": "second"} if ft else {})}
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [ft or 1.0, px * 2**k, px * 2**k]}]} for k in range(n_levels)]
    ms = {"name": name, "axes": [t_axis, {"name": "y", **space}, {"name": "x", **space}],
          "datasets": datasets}
    if n_levels > 1:
        ms["type"] = "2x2 mean (y, x)"
    return {"ome": {"version": "0.5", "multiscales": [ms]},
            "emdenoise": _jsonable({**(attrs or {}), "pixel_size": pixel_size})}


def shard_shape(shape, chunks, itemsize: int = 4) -> tuple[int, ...]:
    """Zarr v3 shard of a (T, Y, X) array: whole chunks in y and x, as many chunk rows of
    frames as fit in ``_MAX_BLOCK_BYTES`` (and at most 64 frames, the block
    :func:`_iter_blocks` writes at once, so a streamed write fills whole shards).  One
    file per shard instead of one per chunk: a 200-frame movie is a few files, not 200
    (inode quotas on archives of hundreds of movies)."""
    ct = int(chunks[0])
    chunk_bytes = max(1, math.prod(int(c) for c in chunks) * int(itemsize))
    per = max(1, min(_MAX_BLOCK_BYTES // chunk_bytes, 64 // ct if ct <= 64 else 1, -(-int(shape[0]) // ct)))
    return (ct * per,) + tuple(int(c) for c in chunks[1:])


class ZarrStackWriter:
    """Stream frames into an OME-Zarr 0.5 group (zarr v3), renamed into place on success.

    Layout: group ``path`` with attributes ``{'ome': {...multiscales...}, 'emdenoise':
    attrs + pixel_size}``, the ``(T, Y, X)`` array at ``path/0`` (default chunks: whole
    frames ``(1, Y, X)``; ``dimension_names`` t, y, x) and, for frames of at least
    512 px, a pyramid ``path/1``, ``path/2`` ... of 2x2-mean-binned frames (float32,
    computed at close time from level 0, a block of frames at a time) so viewers open
    large stacks fast; :func:`read_zarr` returns level 0. Space axes carry unit
    ``'angstrom'`` and scale ``pixel_size`` when it is known, else no unit and scale 1.0;
    the time axis carries unit ``'second'`` and scale ``attrs['frame_time']`` when known.

    Arrays are sharded (:func:`shard_shape`, or ``shards``): chunks stay what readers
    slice by, but one file holds many frames.  A writer that fills parts of the array in
    parallel must give each task whole shards (``chunked.infer_zarr``: one tile each).

    Use as a context manager: ``w[i] = frame`` or ``w[a:b] = block``; ``w.array`` is
    the writable Zarr array (level 0). On an exception the temporary group is removed;
    a full disk raises :class:`DiskFullError` naming ``path``.
    """

    def __init__(self, path, shape, *, pixel_size=None, attrs=None, chunks=None, dtype="float32",
                 pyramid: bool = True, shards=None):
        self.path, self.shape = Path(path), tuple(int(n) for n in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be (T, Y, X), got {self.shape}")
        self.pixel_size, self.attrs, self.dtype = pixel_size, attrs, np.dtype(dtype)
        self.chunks = tuple(chunks) if chunks else (1,) + self.shape[1:]
        self.shards = tuple(shards) if shards else shard_shape(self.shape, self.chunks, self.dtype.itemsize)
        self.n_levels = 1 + (pyramid_levels(self.shape[1:]) if pyramid else 0)
        self.array, self._tmp, self._group = None, None, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_name(self.path)
        try:
            with _disk_full_as_error(self.path):
                self._group = zarr.open_group(str(self._tmp), mode="w", zarr_format=3)
                self._group.attrs.update(_ome_attrs(self.path.stem, self.pixel_size, self.attrs, self.n_levels))
                self.array = self._group.create_array("0", shape=self.shape, chunks=self.chunks, shards=self.shards,
                                                      dtype=self.dtype, fill_value=0, dimension_names=AXES)
        except BaseException:
            _discard(self._tmp)
            raise
        return self

    def __setitem__(self, key, value):
        with _disk_full_as_error(self.path):
            self.array[key] = np.asarray(value, dtype=self.dtype)

    def update_attrs(self, attrs: dict) -> None:
        """Replace the 'emdenoise' attributes (e.g. with what the stage learnt while
        streaming: a tuned sigma, scores); the OME metadata is rewritten with them."""
        self.attrs = attrs
        with _disk_full_as_error(self.path):
            self._group.attrs.update(_ome_attrs(self.path.stem, self.pixel_size, self.attrs, self.n_levels))

    def _write_pyramid(self):
        t, y, x = self.shape
        src = self.array
        for k in range(1, self.n_levels):
            ny, nx = y // 2**k, x // 2**k
            # shards of the blocks read from the level above: each write fills whole shards (a
            # partial one would be read back and rewritten whole: memory and time)
            dst = self._group.create_array(str(k), shape=(t, ny, nx), chunks=(1, ny, nx),
                                           shards=(min(t, _block_step(src)), ny, nx), dtype="float32",
                                           fill_value=0, dimension_names=AXES)
            for a, block in _iter_blocks(src):
                block = block[:, :2 * ny, :2 * nx].astype(np.float32, copy=False)
                dst[a:a + len(block)] = block.reshape(len(block), ny, 2, nx, 2).mean(axis=(2, 4))
            src = dst

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            _discard(self._tmp)
            if _is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise DiskFullError(self.path) from None
            return False
        try:
            with _disk_full_as_error(self.path):
                self._write_pyramid()
                _commit(self._tmp, self.path)
        except BaseException:
            _discard(self._tmp)
            raise
        return False


def write_zarr(path, stack, *, pixel_size=None, attrs: dict | None = None, chunks=None,
               dtype="float32", pyramid: bool = True) -> None:
    """Write a ``(T, Y, X)`` (or ``(Y, X)``) stack as OME-Zarr, by blocks of frames (a lazy
    stack is never whole in memory); see :class:`ZarrStackWriter`."""
    stack = _stack_for_writing(stack)
    with ZarrStackWriter(path, stack.shape, pixel_size=pixel_size, attrs=attrs,
                         chunks=chunks, dtype=dtype, pyramid=pyramid) as w:
        for a, block in _iter_blocks(stack):
            w[a:a + len(block)] = block


def zarr_array_path(arr, fallback=None) -> str:
    """Path of a Zarr *array* on a local store (not its group), to reopen it elsewhere;
    ``fallback`` (or an InputError) when the store is not a local folder."""
    try:
        return str(Path(arr.store.root) / arr.path)
    except AttributeError:
        if fallback is None:
            raise InputError(None, "expected a Zarr array on a local folder") from None
        return str(fallback)


def write_zarr_blocks(path, shape, blocks, frames: int, *, pixel_size=None, attrs: dict | None = None,
                      pyramid: bool = True) -> None:
    """Write the ``(a, block)`` pairs of a streamed computation (blocks of ``frames``
    whole frames, the last one shorter, in any order) as an OME-Zarr of ``shape``
    (T, Y, X); see :class:`ZarrStackWriter` (temporary name, renamed when complete).
    Shards of ``frames`` frames, so each block fills whole shards (no read-modify-write).
    Memory: one block plus the pyramid's read blocks (at most ``_MAX_BLOCK_BYTES``)."""
    shape = tuple(int(n) for n in shape)
    k = max(1, min(int(frames), shape[0]))
    with ZarrStackWriter(path, shape, pixel_size=pixel_size, attrs=attrs, shards=(k,) + shape[1:],
                         pyramid=pyramid) as w:
        for a, block in blocks:
            w[a:a + len(block)] = block


def _write_npy(path, stack):
    """float32 ``.npy``, atomically; blocks allocated before the memory-mapped write (no
    SIGBUS on a full disk: :class:`DiskFullError`, temporary removed)."""
    stack = _stack_for_writing(stack)
    with _disk_full_as_error(path), atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(stack.shape))
        with open(tmp, "r+b") as fh:
            _reserve(fh, os.path.getsize(tmp), path)
        for a, block in _iter_blocks(stack):
            out[a:a + len(block)] = block
        out.flush()
        del out


OUTPUT_EXTENSIONS = (".tif", ".tiff", ".mrc", ".mrcs", ".st", ".ali", ".rec", ".zarr", ".npy")


def check_output_path(path) -> None:
    """InputError unless ``path`` has an extension :func:`write_stack` writes and its
    folder exists (checked before any work, so a typo does not cost a training run)."""
    ext = Path(path).suffix.lower()
    if ext not in OUTPUT_EXTENSIONS:
        raise InputError(path, f"unknown output extension {ext!r}; use .tif, .mrc, .zarr or .npy")
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise InputError(path, f"output folder {folder} does not exist")


def write_stack(path, stack, pixel_size=None, metadata=None) -> None:
    """Write float32 ``stack`` in the format named by the extension of ``path``:
    .tif/.tiff, .mrc/.mrcs/.st, .zarr (OME-Zarr) or .npy (metadata not stored)."""
    ext = Path(path).suffix.lower()
    if ext in (".tif", ".tiff"):
        write_tiff(path, stack, pixel_size, metadata)
    elif ext in (".mrc", ".mrcs", ".st", ".ali", ".rec"):
        write_mrc(path, stack, pixel_size, tilt_angles=(metadata or {}).get("tilt_angles"))
    elif ext == ".zarr":
        write_zarr(path, stack, pixel_size=pixel_size, attrs=metadata)
    elif ext == ".npy":
        _write_npy(path, stack)
    else:
        raise InputError(path, f"unknown output extension {ext!r}; use .tif, .mrc, .zarr or .npy")


def ingest(src, dst, *, pixel_size: float | None = None, frames: tuple[int, int] | None = None,
           extra_attrs: dict | None = None, min_frames: int = 4, min_size: int = 16,
           eer_group: int | None = None, eer_upsampling: int | None = None) -> dict:
    """Copy any readable stack to a float32 OME-Zarr (``raw.zarr``), streaming frames.

    Checks shape and dtype up front (:func:`validate_stack`) and finiteness while
    copying, so bad input fails in one pass and leaves no output. The read metadata
    (source, sha256, pixel size, ...) plus ``extra_attrs`` go into the 'emdenoise'
    attributes, which are also returned. ``min_frames`` defaults to 4 because uMSE
    needs frames t-1, t+1 and t+2 around every scored frame t. The file's calibration
    (``frame_time`` s, dose, tilt angles, ...) is kept in the attributes, and a known
    ``frame_time`` calibrates the OME time axis. ``eer_group`` / ``eer_upsampling``:
    EER grouping (:func:`read_stack`).
    """
    arr, meta = read_stack(src, pixel_size=pixel_size, frames=frames, eer_group=eer_group,
                           eer_upsampling=eer_upsampling)
    validate_stack(arr, src, min_frames=min_frames, min_size=min_size, check_finite=False)
    attrs = {**meta, **(extra_attrs or {}), "emdenoise_version": __version__}
    with ZarrStackWriter(dst, arr.shape, pixel_size=meta["pixel_size"], attrs=attrs) as w:
        for a, block in _iter_blocks(arr):
            block = block.astype(np.float32, copy=False)
            bad = ~np.isfinite(block)
            if bad.any():
                first = a + int(np.argmax(bad.reshape(len(block), -1).any(axis=1)))
                raise InputError(src, f"contains NaN/Inf values (first in frame {first}); "
                                      "all pixels must be finite")
            w[a:a + len(block)] = block
    return _jsonable(attrs)
