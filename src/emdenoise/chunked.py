"""Chunked inference: a (T, Y, X) Zarr stack in, an OME-Zarr out, tile by tile, in parallel.

Why a tile scheduler on dask.delayed rather than ``dask.array.map_overlap``:
- time needs windows mirrored about their centre frame at the ends of the movie (then
  periodic, for reaches past half the movie: ``tiling.window_index``, as in
  ``infer.denoise``); Dask's boundary='reflect' is
  NumPy's 'symmetric' (frame -1 := 0), which would put the predicted frame into its own
  window.  Space uses periodic wrapping, which is Dask's boundary='periodic' and the
  whole-frame circular padding of ``infer.denoise``.
- each task writes its own output chunks straight into the Zarr store and returns only
  a pixel count, so nothing but ``workers`` tiles is ever in memory, and a task that
  runs out of memory can split its own tile without touching a neighbour's chunks.
"""
from __future__ import annotations

import copy as _copy
import logging as _logging
import math as _math
import os as _os
import threading
import time as _time
import uuid
from dataclasses import dataclass as _dataclass
from pathlib import Path as _Path

import dask
import numpy as np
import torch
import zarr

from . import infer
from . import io as _io
from .checkpoint import load_checkpoint, normalisation_of
from .errors import InputError
from .models import resolve_device
from .tiling import check_frame_count, check_frame_size, read_with_halo, window_index, wrap_index

__all__ = ["infer_zarr", "auto_tile", "available_memory", "cached_model", "is_oom"]

_log = _logging.getLogger("emdenoise")

#: Host bytes per output pixel of a CPU tile: the read box (with halos), its normalised
#: copy, the output, its inverted copy and the Zarr encode buffer (float32 each) plus
#: slack for the decoded source chunks.  Measured peak ~20 B/px (bench/bench_scale.py).
CPU_BYTES_PER_PX = 24
#: Bytes per pixel of tile area for each frame of temporal reach beyond the first (float32):
#: two more frames read around the tile (8), and two more in either the normalised copy of
#: a run of windows or a wrapped window gathered with its normalised copy (16)
#: (:func:`auto_tile`).  Nothing for WCVD (halo_t 1, inside ``CPU_BYTES_PER_PX``); what
#: bounds the memory of a context network reaching the whole movie (100 x 1024² chunked at
#: R 99: 6.0 GB peak RSS without it).
REACH_BYTES_PER_PX = 24
#: Device bytes per output pixel on CUDA: the model's forward keeps kt input channels,
#: nb*C hidden channels twice and nb outputs per pixel; 256 B/px is a conservative
#: bound for WCVD and SHINE alike (an OOM is caught and the tile halved anyway).
GPU_BYTES_PER_PX = 256
#: Tiles beyond this (per worker) are no faster -- per-tile overheads are already <1 % --
#: but they raise peak memory; the cap keeps RSS predictable on big-memory nodes.
MAX_TILE_BYTES = 256 * 2**20
#: Frames per tile when frames must be cut spatially.  The temporal halo costs reads
#: and decoding only (compute is per output frame): (nt + 2*halo_t) / nt, 1.25x for
#: WCVD and 1.5x for SHINE at 8.
TILE_FRAMES = 8
#: Aim for at least this many blocks per worker so that the last blocks do not leave
#: workers idle (load balance), as long as tiles keep >= 4 frames.
BLOCKS_PER_WORKER = 4


def is_oom(exc: BaseException) -> bool:
    """True for MemoryError, torch.cuda.OutOfMemoryError and RuntimeError('... out of memory ...')."""
    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, MemoryError) or (cuda_oom and isinstance(exc, cuda_oom)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def available_memory(device: str | torch.device = "auto") -> int:
    """Bytes free for tiles: free GPU memory (``torch.cuda.mem_get_info``) on CUDA, else
    available RAM (psutil when installed, else ``os.sysconf``), lowered to what is left
    of a cgroup memory limit (SLURM / containers cap jobs far below the host's RAM)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        import psutil
        free = int(psutil.virtual_memory().available)
    except ImportError:
        free = int(_os.sysconf("SC_AVPHYS_PAGES") * _os.sysconf("SC_PAGE_SIZE"))
    left = _cgroup_memory_left()
    return min(free, left) if left is not None else free


def _cgroup_memory_left() -> int | None:
    """limit - usage of this process's cgroup (v2, else v1), None when unlimited/unknown."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = _Path(limit_f).read_text().strip()
            usage = int(_Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def auto_tile(shape, params, *, device: str | torch.device = "cpu", workers: int = 1,
              memory: int | None = None) -> tuple[int, int, int]:
    """Output tile (nt, ty, tx) for a (T, Y, X) stack from the memory available.

    Budget per worker = min(memory / 4 / workers, MAX_TILE_BYTES) on the CPU (the other
    3/4 stay free for other jobs and the page cache), free GPU memory / 2 on CUDA.  A tile
    of nt frames and area A px takes A (nt bpp + :data:`REACH_BYTES_PER_PX` (halo_t - 1))
    bytes: bytes-per-pixel for each output pixel (which covers a 1-frame temporal halo),
    and, what grows with a context network's reach, the frames read around the tile and
    those gathered for an output frame whose window wraps (``tiling.window_index``).
    - Whole frames when at least 2 fit (or T <= 2): no spatial halo, and whole-frame
      Zarr chunks (what ``io.ingest`` writes) are decoded (nt + 2*halo_t) / nt times
      instead of once per spatial tile.  nt is lowered (not below 4) until there are
      ``BLOCKS_PER_WORKER`` blocks per worker, for load balance.
    - Otherwise ``TILE_FRAMES`` frames cut into near-equal squares, multiples of 16 px.
    ``memory`` (bytes) overrides the probe (``available_memory``).
    """
    t, y, x = (int(n) for n in shape)
    dev = resolve_device(device)
    workers = max(1, int(workers))
    mem = available_memory(dev) if memory is None else int(memory)
    if dev.type == "cuda":
        budget, bpp = mem // 2, GPU_BYTES_PER_PX
    else:
        budget, bpp = min(mem // 4 // workers, MAX_TILE_BYTES), CPU_BYTES_PER_PX
    halo = REACH_BYTES_PER_PX * max(0, int(params.halo_t) - 1)  # per px of tile area, whatever nt
    frames_fit = max(0, budget // (y * x) - halo) // bpp
    if frames_fit >= min(t, 2):
        balanced = max(4, _math.ceil(t / (BLOCKS_PER_WORKER * workers)))
        return max(1, min(t, frames_fit, balanced)), y, x
    nt = min(t, TILE_FRAMES)
    side = max(2 * params.halo_s + 16, int(_math.sqrt(budget / (nt * bpp + halo))))

    def split(n):  # near-equal pieces of at most `side` px, rounded up to 16 px
        pieces = _math.ceil(n / side)
        return min(n, 16 * _math.ceil(n / pieces / 16))
    return nt, split(y), split(x)


# ---- per-process caches: a worker loads the model / opens the stores once -------------
_cache_lock = threading.Lock()
_model_cache: dict = {}
_store_cache: dict = {}


def cached_model(model, device: str | torch.device = "cpu"):
    """(model, ckpt-or-None) for this process and device, loaded / copied once.

    model: a checkpoint path (loaded with ``train.load_checkpoint`` once per process,
        keyed by resolved path, mtime and device -- so each Dask worker loads it once,
        not once per task) or a model object (used as is on the CPU; deep-copied once per
        CUDA device, because ``nn.Module.to`` moves in place and threads on different
        GPUs must not share one copy).
    """
    dev = resolve_device(device)
    if isinstance(model, (str, _os.PathLike)):
        p = _Path(model).resolve()
        key = ("path", str(p), p.stat().st_mtime_ns, str(dev))
        with _cache_lock:
            if key not in _model_cache:
                _model_cache[key] = load_checkpoint(p, device=str(dev))
            return _model_cache[key]
    if dev.type == "cpu":
        return model, None
    key = ("obj", id(model), str(dev))
    with _cache_lock:
        hit = _model_cache.get(key)
        if hit is None or hit[2] is not model:  # id() may be reused after GC
            hit = (_copy.deepcopy(model).to(dev).eval(), None, model)
            _model_cache[key] = hit
        return hit[0], None


def _open_cached(path: str, mode: str):
    """A Zarr array opened once per process (``read_zarr`` for the source)."""
    key = (path, mode)
    with _cache_lock:
        if key not in _store_cache:
            if mode == "r":
                _store_cache[key] = _io.read_zarr(path)[0]
            else:
                _store_cache[key] = zarr.open_array(path, mode=mode)
        return _store_cache[key]


# ---- one task: an output core tile, split further when memory runs out -----------------
@_dataclass
class _TileJob:
    """What every task needs; small and picklable (paths, not arrays)."""
    src: str              # source Zarr array (read_zarr path)
    dst: str              # destination Zarr array (the writer's temporary array)
    shape: tuple          # (T, Y, X)
    halo_t: int
    halo_s: int
    device: str
    batch_frames: int
    threads: int          # torch / tile threads inside one task
    precision: str = "auto"  # infer.inference_dtype


class _Shared:
    """Per-process mutable state: the largest tile that has not run out of memory, the
    OOM count, progress, and (threaded CUDA runs) which GPU this thread uses."""

    def __init__(self, max_px: int, total_blocks: int, total_px: int, progress_s: float | None):
        self.lock = threading.Lock()
        self.max_px, self.oom = max_px, 0
        self.done_blocks, self.done_px = 0, 0
        self.total_blocks, self.total_px = total_blocks, total_px
        self.progress_s, self.t0, self.last = progress_s, _time.perf_counter(), -_math.inf
        self._gpu = threading.local()
        self._next_gpu = 0

    def device(self, device: str) -> str:
        """Threads on a multi-GPU host take GPUs round-robin (one worker per GPU)."""
        if device != "cuda" or torch.cuda.device_count() < 2:
            return device
        if not hasattr(self._gpu, "dev"):
            with self.lock:
                self._gpu.dev = f"cuda:{self._next_gpu % torch.cuda.device_count()}"
                self._next_gpu += 1
        return self._gpu.dev

    def block_done(self, npx: int) -> None:
        with self.lock:
            self.done_blocks += 1
            self.done_px += npx
            now = _time.perf_counter()
            final = self.done_blocks == self.total_blocks
            if self.progress_s is None or (now - self.last < self.progress_s and not final):
                return
            self.last = now
            dt = max(now - self.t0, 1e-9)
            rate = self.done_px / dt / 1e6
            eta = (self.total_px - self.done_px) / max(self.done_px / dt, 1e-9)
            _log.info("infer: blocks %d/%d (%.0f %%), %.3g Mpix/s, %.1f s elapsed, eta %.0f s",
                      self.done_blocks, self.total_blocks, 100.0 * self.done_blocks / self.total_blocks,
                      rate, dt, eta)


_shared_state: dict = {}  # run id -> _Shared, so distributed workers keep one per process


def _npx(core) -> int:
    t0, t1, y0, y1, x0, x1 = core
    return (t1 - t0) * (y1 - y0) * (x1 - x0)


def _halve(core):
    """Two halves of a core tile: frames first (no extra spatial halo), then the longer
    spatial side; None when it is a single pixel."""
    t0, t1, y0, y1, x0, x1 = core
    if t1 - t0 > 1:
        m = (t0 + t1) // 2
        return [(t0, m, y0, y1, x0, x1), (m, t1, y0, y1, x0, x1)]
    if max(y1 - y0, x1 - x0) <= 1:
        return None
    if y1 - y0 >= x1 - x0:
        m = (y0 + y1) // 2
        return [(t0, t1, y0, m, x0, x1), (t0, t1, m, y1, x0, x1)]
    m = (x0 + x1) // 2
    return [(t0, t1, y0, y1, x0, m), (t0, t1, y0, y1, m, x1)]


def _predict_box(job: _TileJob, model, ckpt, device: str, src, dst, core) -> None:
    """Read one core tile with its halos (the frames of its temporal windows, wrapped
    in y/x), run the model with 'valid' spatial padding and write the core into the
    destination."""
    t, y, x = job.shape
    t0, t1, y0, y1, x0, x1 = core
    windows = window_index(t0, t1, t, job.halo_t)
    lo, hi = int(windows.min()), int(windows.max()) + 1
    block = read_with_halo(src, np.arange(lo, hi),
                           wrap_index(y0 - job.halo_s, y1 + job.halo_s, y),
                           wrap_index(x0 - job.halo_s, x1 + job.halo_s, x))
    out = infer.predict_windows(model, block, windows - lo, normalisation=ckpt, device=device,
                                spatial_padding="valid", batch_frames=job.batch_frames, num_workers=job.threads,
                                precision=job.precision)
    dst[t0:t1, y0:y1, x0:x1] = out


def _run_tile(job: _TileJob, model_ref, ckpt, core, run_id: str) -> int:
    """Task body: denoise one output core tile (it owns the Zarr chunks it covers).

    The core is first cut to the largest size that has not failed in this process; on an
    out-of-memory error the failing piece is halved and retried, the limit lowered for
    all later tiles, and a warning logged.  Pieces stay inside the core, so no chunk is
    ever written by two tasks.  Returns the number of output pixels.
    """
    shared = _shared_state[run_id]
    device = shared.device(job.device)
    model, ck = cached_model(model_ref, device)
    ckpt = ckpt if ckpt is not None else ck
    src, dst = _open_cached(job.src, "r"), _open_cached(job.dst, "r+")
    pending = [core]
    while pending:
        c = pending.pop()
        if _npx(c) > shared.max_px and _halve(c) is not None:
            pending.extend(_halve(c))
            continue
        try:
            _predict_box(job, model, ckpt, device, src, dst, c)
        except Exception as exc:  # noqa: BLE001 -- re-raised unless it is an OOM
            halves = _halve(c)
            if not is_oom(exc) or halves is None:
                raise
            with shared.lock:
                shared.max_px = min(shared.max_px, max(1, _npx(c) // 2))
                shared.oom += 1
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
            _log.warning("infer: out of memory on block t[%d:%d] y[%d:%d] x[%d:%d] (%.2f Mpix, %s); "
                         "retrying with blocks of <= %.2f Mpix", *c, _npx(c) / 1e6,
                         exc.__class__.__name__, shared.max_px / 1e6)
            pending.extend(halves)
    shared.block_done(_npx(core))
    return _npx(core)


def _core_tiles(shape, tile) -> list[tuple[int, int, int, int, int, int]]:
    """Non-overlapping output tiles (t0, t1, y0, y1, x0, x1) on the chunk grid ``tile``."""
    (t, y, x), (nt, ty, tx) = shape, tile
    return [(a, min(t, a + nt), b, min(y, b + ty), c, min(x, c + tx))
            for a in range(0, t, nt) for b in range(0, y, ty) for c in range(0, x, tx)]


def infer_zarr(model, ckpt, src_zarr_path, dst_zarr_path, *, device: str = "auto", tile=None,
               workers: int | None = None, threads_per_worker: int = 1, scheduler_address: str | None = None,
               progress: bool | float = True, batch_frames: int = 8, memory: int | None = None,
               attrs: dict | None = None, precision: str = "auto") -> dict:
    """Denoise a (T, Y, X) Zarr stack tile by tile into a new OME-Zarr, in parallel.

    model: a model object (``WCVD``, SHINE, anything with ``.params.halo_t/halo_s/kt_eff``
        that ``predict_block`` accepts) or a checkpoint path (then ``ckpt`` may be None
        and every worker loads it once).
    ckpt: checkpoint dict carrying the normalisation (data units in and out), or None.
    src_zarr_path: anything ``io.read_zarr`` opens; float32 (T, Y, X) in data units.
    dst_zarr_path: the output group, written through ``io.ZarrStackWriter`` (temporary
        name, renamed when complete); chunks (1, ty, tx), the array (T, Y, X) float32.
    tile: output tile (nt, ty, tx) or a single int (square tiles, 8 frames); None = from
        the memory available (:func:`auto_tile`).  Each tile is read with halo_t frames
        (reflected without repeating the edge frame) and halo_s px (wrapped periodically)
        on each side, so the result equals ``denoise`` on the whole array (float
        rounding aside: the CPU path is bit-identical).
    workers: parallel tasks (threads of Dask's threaded scheduler); None = torch threads on
        the CPU, one per GPU on CUDA.  threads_per_worker: threads inside one task.
    scheduler_address: connect to a running dask.distributed scheduler instead
        (needs the ``distributed`` package); the model is scattered to every worker once.
    progress: log 'blocks done/total, Mpix/s' to logging.getLogger('emdenoise') at most
        every 2 s (a float: every that many seconds; False: off).
    memory: bytes to size tiles from (default: probed).  attrs: extra output attributes.
    Returns stats: shape, tile, blocks, workers, device, seconds, mpix_per_s, oom_retries.
    """
    src, src_attrs = _io.read_zarr(src_zarr_path)
    shape = tuple(int(n) for n in src.shape)
    if len(shape) != 3:
        raise InputError(src_zarr_path, f"expected a (T, Y, X) array, got shape {shape}")
    dev = resolve_device(device)
    params_model = cached_model(model, "cpu")[0] if isinstance(model, (str, _os.PathLike)) else model
    if ckpt is None and isinstance(model, (str, _os.PathLike)):
        ckpt = cached_model(model, "cpu")[1]
    p = params_model.params
    check_frame_size(shape[1:], p.halo_s, src_zarr_path)  # a wrapped halo must not fold p onto itself
    check_frame_count(shape[0], p.halo_t, src_zarr_path)
    # device 'cuda' shares the blocks among every GPU; 'cuda:N' pins the run to that one
    ngpu = (1 if dev.index is not None else torch.cuda.device_count()) if dev.type == "cuda" else 0
    if workers is None:
        workers = max(1, ngpu) if ngpu else max(1, torch.get_num_threads() // max(1, threads_per_worker))
    workers = max(1, int(workers))
    if tile is None:
        tile = auto_tile(shape, p, device=dev, workers=workers, memory=memory)
    elif isinstance(tile, int):
        tile = (min(shape[0], TILE_FRAMES), tile, tile)
    tile = tuple(max(1, min(int(a), n)) for a, n in zip(tile, shape))
    cores = _core_tiles(shape, tile)
    norm = normalisation_of(ckpt)
    progress_s = None if progress is False else (2.0 if progress is True else float(progress))
    run_id = uuid.uuid4().hex
    _shared_state[run_id] = _Shared(_math.prod(tile), len(cores), _math.prod(shape), progress_s)
    out_attrs = {**src_attrs, **(attrs or {}), "temporal_reach": p.halo_t,  # frames each side (metrics)
                 "infer": {"tile": list(tile), "halo_t": p.halo_t, "halo_s": p.halo_s,
                           "temporal_boundary": "windows mirrored about their centre frame, then periodic",
                           "spatial_boundary": "periodic"}}
    _log.info("infer: %s -> %s, shape %s, tile %s, %d blocks, %d worker(s) on %s",
              src_zarr_path, dst_zarr_path, shape, tile, len(cores), workers, dev)
    t0 = _time.perf_counter()
    own_keys = []
    try:
        # one shard per tile: parallel tasks never write the same shard file
        with _io.ZarrStackWriter(dst_zarr_path, shape, pixel_size=src_attrs.get("pixel_size"),
                                 attrs=out_attrs, chunks=(1,) + tile[1:], shards=tile) as w:
            job = _TileJob(src=_io.zarr_array_path(src, src_zarr_path), dst=_io.zarr_array_path(w.array),
                           shape=shape, halo_t=p.halo_t, halo_s=p.halo_s, device=str(dev),
                           batch_frames=batch_frames, threads=threads_per_worker, precision=precision)
            with _cache_lock:  # threaded tasks share these array objects (no reopening)
                own_keys[:] = [(job.src, "r"), (job.dst, "r+")]
                _store_cache[own_keys[0]], _store_cache[own_keys[1]] = src, w.array
            if scheduler_address:
                _run_distributed(scheduler_address, job, model, norm, cores, run_id)
            else:
                tasks = [dask.delayed(_run_tile, pure=False)(job, model, norm, c, run_id) for c in cores]
                dask.compute(*tasks, scheduler="threads", num_workers=workers)
    finally:
        shared = _shared_state.pop(run_id)
        with _cache_lock:  # a later run may rewrite the same paths
            for k in own_keys:
                _store_cache.pop(k, None)
    dt = _time.perf_counter() - t0
    stats = {"shape": list(shape), "tile": list(tile), "blocks": len(cores), "workers": workers,
             "device": str(dev), "seconds": dt, "mpix_per_s": _math.prod(shape) / dt / 1e6,
             "oom_retries": shared.oom, "scheduler": scheduler_address or "threads"}
    _log.info("infer: done, %d blocks in %.1f s (%.3g Mpix/s), %d OOM retries",
              len(cores), dt, stats["mpix_per_s"], shared.oom)
    return stats


def _run_distributed(address: str, job: _TileJob, model, norm, cores, run_id: str) -> None:
    """Run the tiles on an existing dask.distributed cluster, logging progress here.

    The model object is scattered once with broadcast=True, so each worker process
    deserialises it once; a checkpoint path is loaded once per worker by cached_model.
    """
    try:
        from distributed import Client, as_completed
    except ImportError as exc:
        raise InputError(None, "scheduler_address needs the 'distributed' package "
                               "(pip install distributed)") from exc
    shared = _shared_state[run_id]
    with Client(address) as client:
        model_ref = model if isinstance(model, (str, _os.PathLike)) else client.scatter(model, broadcast=True)
        client.run(_register_run, run_id, shared.max_px, len(cores))
        futures = [client.submit(_run_tile_remote, job, model_ref, norm, c, run_id, pure=False) for c in cores]
        try:
            for fut in as_completed(futures):
                shared.block_done(fut.result())
        finally:
            client.run(_forget_run, run_id)


# module-level functions, sent to the workers by name (a bound ``_shared_state.pop`` would
# pickle the dict with its locks)
def _register_run(run_id: str, max_px: int, n: int) -> None:
    _shared_state.setdefault(run_id, _Shared(max_px, n, 1, None))


def _forget_run(run_id: str) -> None:
    _shared_state.pop(run_id, None)


def _run_tile_remote(job, model_ref, norm, core, run_id) -> int:
    """Worker side: a distributed worker writes to the temporary array by path (a shared
    filesystem is required) and logs nothing itself -- progress is logged by the client."""
    return _run_tile(job, model_ref, norm, core, run_id)

