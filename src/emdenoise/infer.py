"""Inference with trained WCVD / WCID models: (T, Y, X) in, (T, Y, X) out.

Temporal edges: WCVD with Kt = 3 predicts frame t from frames (t-1, t, t+1).  To keep T
frames out for T in, the movie is extended by reflection *without repeating the edge
frame*: frame -1 := frame 1 and frame T := frame T-2, so frame 0 is predicted from the
window (1, 0, 1) and frame T-1 from (T-2, T-1, T-2).  Repeating the edge frame itself
(window (0, 0, 1)) would put the very pixel being predicted into the temporal neighbours
and break the blind spot.  Needs T >= 2 (T >= Kt//2 + 1 in general).

Spatial edges: periodic padding, as in training and in the paper; it also keeps the blind
spot exact at the borders (reflection would fold pixel (y, x) into its own neighbourhood
one pixel in from the edge).  Pixels within Ks_max//2 px of a border therefore use some
neighbours from the opposite border.

Speed on CPU (see bench/bench_wcvd.py):
- All branches run as one 2D convolution with the Kt frames as input channels, and the
  first 1x1 layer is folded into that convolution (BCK -> 1x1 is linear -> linear, no
  activation in between), which is exact up to float rounding.
- The remaining 1x1 layers have only C = 3 channels per branch; a GEMM or grouped 1x1
  convolution is dominated by overheads at that width (measured 3-4x slower), so on CPU
  they run as C broadcast multiply-adds over planar (branch, channel, pixel) tiles of
  ~64k pixels that stay in cache, with preallocated buffers.
- Tiles are shared out to worker threads running single-threaded torch ops rather than
  relying on OpenMP inside each small op (see ``_single_threaded_ops``).
- An FFT path was measured and rejected: with periodic padding it is exact, but for
  7 x 7 kernels on 512 x 512 frames it was ~5x slower than the direct convolution on
  this CPU (9 inverse FFTs and 27 spectrum multiply-adds per output frame vs. one
  147-tap oneDNN convolution).
On CUDA the model's own forward is used in frame batches (it is fast enough there).
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .models import WCVD, resolve_device
from .train import Normalisation

__all__ = ["denoise", "predict_block", "reflect_frames"]

_TILE_PIXELS = 1 << 16  # ~64k output px per CPU tile: the working set of a tile stays in L2/L3


def reflect_frames(stack: np.ndarray, halo: int) -> np.ndarray:
    """(T, Y, X) -> (T + 2*halo, Y, X): frame -k := frame k, frame T-1+k := frame T-1-k."""
    t = stack.shape[0]
    if halo == 0:
        return stack
    if t < halo + 1:
        raise InputError(None, f"need at least {halo + 1} frames for reflected temporal windows, got {t}")
    idx = np.pad(np.arange(t), halo, mode="reflect")
    return stack[idx]


def _normalisation(ckpt) -> Normalisation | None:
    if ckpt is None:
        return None
    if isinstance(ckpt, Normalisation):
        return ckpt
    return Normalisation.from_dict(ckpt["normalisation"] if "normalisation" in ckpt else ckpt)


# --------------------------------------------------------------------------------------
# CPU fast path
# --------------------------------------------------------------------------------------
class _CpuPlan:
    """Weights of a WCVD rearranged for fast CPU inference (see the module docstring)."""

    @torch.no_grad()
    def __init__(self, model: WCVD):
        p = model.params
        self.params = p
        nb, c = len(p.ks), p.channels
        w = model.merged_bck_weight().float().cpu()            # (nb*C, kt, K, K)
        self.conv_bias = None
        layers = list(range(p.n_layers))
        if layers:  # fold hidden layer 0 into the convolution
            h0 = torch.block_diag(*[b.hidden_w[0].float().cpu() for b in model.branches])
            w = torch.einsum("oc,ckyx->okyx", h0, w)
            if p.bias:
                self.conv_bias = torch.cat([b.hidden_b[0].float().cpu() for b in model.branches])
            layers = layers[1:]
        self.conv_w = w.contiguous()
        self.first_act = p.n_layers > 0
        # Remaining layers as (nb, C_out, C_in, 1) tensors: column j broadcasts over pixels.
        self.hidden = [(torch.stack([b.hidden_w[i].float().cpu() for b in model.branches])[..., None],
                        torch.stack([b.hidden_b[i].float().cpu() for b in model.branches])[..., None]
                        if p.bias else None) for i in layers]
        self.out_w = torch.stack([b.out_w.float().cpu() for b in model.branches])[..., None]  # (nb, 1, C, 1)
        self.out_b = (torch.stack([b.out_b.float().cpu() for b in model.branches])[..., None]
                      if p.bias else None)                                                     # (nb, 1, 1)
        self.ens = [float(a) for a in model.ensemble_weights]
        self.nb, self.c, self.slope = nb, c, p.negative_slope

    @staticmethod
    def _mix(src: torch.Tensor, w: torch.Tensor, bias, dst: torch.Tensor) -> torch.Tensor:
        """dst[b, k] = sum_j w[b, k, j] * src[b, j] (+ bias[b, k]) for all branches at once.

        src (nb, C_in, P), w (nb, C_out, C_in, 1), dst (nb, C_out, P).  C_in broadcast
        multiply-adds instead of a GEMM: with C = 3 this is a handful of large
        vectorised ops per tile, few enough that thread barriers and Python overhead
        stay small even when other processes share the cores.
        """
        torch.mul(src[:, 0:1], w[:, :, 0], out=dst)
        for j in range(1, src.shape[1]):
            dst.addcmul_(src[:, j:j + 1], w[:, :, j])
        if bias is not None:
            dst.add_(bias)
        return dst

    def pointwise(self, h: torch.Tensor, out: torch.Tensor, bufs) -> None:
        """h: (nb*C, P) conv output (modified in place); out: (P,) ensemble output."""
        if self.first_act:
            F.leaky_relu(h, self.slope, inplace=True)
        cur = h.view(self.nb, self.c, -1)
        ping, last = bufs
        for i, (w, bias) in enumerate(self.hidden):
            dst = ping[i % 2]
            F.leaky_relu(self._mix(cur, w, bias, dst), self.slope, inplace=True)
            cur = dst
        o = self._mix(cur, self.out_w, self.out_b, last).clamp_(min=0)  # (nb, 1, P)
        torch.mul(o[0, 0], self.ens[0], out=out)
        for b in range(1, self.nb):
            out.add_(o[b, 0], alpha=self.ens[b])

    def run(self, z: torch.Tensor, spatial_padding: str, out: torch.Tensor, workers: int = 1) -> None:
        """z: (n + kt - 1, Y, X) normalised frames; out: (n, Y', X') normalised output.

        Row tiles of every frame are shared out to ``workers`` threads; the caller runs
        this with single-threaded torch ops (see ``_single_threaded_ops``).
        """
        kt, h = self.params.kt_eff, self.params.halo_s
        if spatial_padding == "circular":
            if min(z.shape[-2:]) <= 2 * h:
                raise ValueError(f"frames must be larger than {2 * h} px for circular padding")
            z = F.pad(z[None], (h, h, h, h), mode="circular")[0]
        n, yo, xo = out.shape
        rows = max(1, min(yo, _TILE_PIXELS // max(xo, 1)))
        tiles = [(t, r0, min(yo, r0 + rows)) for t in range(n) for r0 in range(0, yo, rows)]
        local = threading.local()

        def work(tile):
            t, r0, r1 = tile
            with torch.inference_mode():  # thread-local: worker threads need their own
                if not hasattr(local, "bufs"):  # per-thread scratch, reused across tiles
                    local.bufs = (torch.empty(2, self.nb, self.c, rows * xo), torch.empty(self.nb, 1, rows * xo))
                hcv = F.conv2d(z[t:t + kt, r0:r1 + 2 * h][None], self.conv_w, self.conv_bias)[0]
                hcv = hcv.reshape(self.conv_w.shape[0], -1)
                npx = hcv.shape[1]
                self.pointwise(hcv, out[t, r0:r1].reshape(-1), (local.bufs[0][..., :npx], local.bufs[1][..., :npx]))

        if workers > 1 and len(tiles) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(tiles))) as pool:
                list(pool.map(work, tiles))
        else:
            for tile in tiles:
                work(tile)


@contextlib.contextmanager
def _single_threaded_ops():
    """Run torch ops single-threaded, restoring the thread count afterwards.

    The CPU path parallelises over tiles with its own threads instead of inside each
    op: thousands of small OpenMP regions each end in a barrier, and when another
    process holds one of the cores every barrier waits for a descheduled thread.
    Measured on the shared 2-core machine: 20 x 512 x 512 took ~1.0 s with 2 OpenMP
    threads under load vs ~0.3 s single-threaded; tile threads keep both cores busy
    when they are free and degrade gracefully when they are not.
    """
    global _st_depth, _st_saved
    with _st_lock:  # re-entrant across threads (e.g. Dask calling predict_block in parallel)
        if _st_depth == 0:
            _st_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _st_depth += 1
        saved = _st_saved
    try:
        yield saved
    finally:
        with _st_lock:
            _st_depth -= 1
            if _st_depth == 0:
                torch.set_num_threads(_st_saved)


_st_lock = threading.Lock()
_st_depth = 0
_st_saved = 1


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def predict_block(model: WCVD, block: np.ndarray, *, normalisation=None, device: str = "auto",
                  spatial_padding: str = "circular", batch_frames: int = 8,
                  num_workers: int | None = None) -> np.ndarray:
    """Denoise the frames of a block that carries its own temporal halo.

    block: (t, Y, X) float32 frames in data units (or normalised units when
        ``normalisation`` is None).  For WCVD (Kt = 3) frames 0 and t-1 are the halo.
    normalisation: a ``Normalisation``, a checkpoint dict or None (block is normalised).
    spatial_padding: 'circular' (whole frames) or 'valid' (a tile with a spatial halo of
        Ks_max//2 px on each side; the output is smaller by that halo, and its pixels are
        bit-for-bit those of whole-frame inference -- for tiled / Dask inference).
    batch_frames: output frames normalised and sent to the device at once (memory bound).
    num_workers: CPU only, threads sharing the row tiles; None = torch.get_num_threads().
        When the caller already runs blocks in parallel (Dask), pass 1.
    Returns (t - Kt + 1, Y', X') float32 in the units of the input block.
    """
    p = model.params
    block = np.asarray(block, dtype=np.float32)
    if block.ndim != 3:
        raise InputError(None, f"expected a (t, Y, X) block, got shape {block.shape}")
    kt, hs = p.kt_eff, p.halo_s
    if block.shape[0] < kt:
        raise InputError(None, f"block needs at least kt={kt} frames (with halo), got {block.shape[0]}")
    if spatial_padding not in ("circular", "valid"):
        raise ValueError(f"spatial_padding must be 'circular' or 'valid', got {spatial_padding!r}")
    norm = _normalisation(normalisation)
    dev = resolve_device(device)
    n_out = block.shape[0] - kt + 1
    shrink = 2 * hs if spatial_padding == "valid" else 0
    yo, xo = block.shape[1] - shrink, block.shape[2] - shrink
    if min(yo, xo) < 1:
        raise InputError(None, f"block of {block.shape[1]}x{block.shape[2]} px is smaller than the kernel halo")
    result = np.empty((n_out, yo, xo), dtype=np.float32)
    model = model.eval()
    # _CpuPlan is WCVD-specific; other models (SHINE) run their own forward on any device
    plan = _CpuPlan(model) if dev.type == "cpu" and isinstance(model, WCVD) else None
    if plan is None:
        model = model.to(dev)  # note: moves the caller's model (nn.Module.to is in place)
    step = max(1, int(batch_frames))
    threads = _single_threaded_ops() if plan is not None else contextlib.nullcontext(0)
    with torch.inference_mode(), threads as nthreads:
        workers = max(1, int(nthreads)) if num_workers is None else max(1, int(num_workers))
        for s in range(0, n_out, step):
            e = min(n_out, s + step)
            frames = block[s:e + kt - 1]
            z = torch.from_numpy(norm.apply(frames) if norm is not None else np.ascontiguousarray(frames))
            if plan is not None:
                out = torch.from_numpy(result[s:e])  # written in place
                plan.run(z, spatial_padding, out, workers)
            else:
                out = model(z.to(dev)[None], spatial_padding)[0]
                result[s:e] = out.float().cpu().numpy()
    return norm.invert(result) if norm is not None else result


def denoise(model: WCVD, ckpt: dict | None, stack: np.ndarray, *, device: str = "auto",
            batch_frames: int = 8, num_workers: int | None = None) -> np.ndarray:
    """Denoise a whole movie: (T, Y, X) in data units -> (T, Y, X) float32, same units.

    ckpt: the checkpoint dict (its ``normalisation`` is applied before and inverted
        after the network); None = the stack is already normalised.
    The first and last frames use reflected windows (1, 0, 1) and (T-2, T-1, T-2), so T
    frames come out for T in; WCVD needs T >= 2 (InputError otherwise).
    batch_frames: frames processed at once, bounds memory to ~batch_frames + 2 frames.
    num_workers: CPU threads (None = torch.get_num_threads()).
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {stack.shape}")
    if stack.shape[0] < 1:
        raise InputError(None, "empty stack")
    t, kt, ht = stack.shape[0], model.params.kt_eff, model.params.halo_t
    if t < ht + 1:
        raise InputError(None, f"need at least {ht + 1} frames for reflected temporal windows, got {t}")
    # indices of the reflected movie; each batch copies only its own input frames
    idx = np.pad(np.arange(t), ht, mode="reflect") if ht else np.arange(t)
    out = np.empty(stack.shape, dtype=np.float32)
    step = max(1, int(batch_frames))
    for s in range(0, t, step):
        e = min(t, s + step)
        out[s:e] = predict_block(model, stack[idx[s:e + kt - 1]], normalisation=ckpt, device=device,
                                 spatial_padding="circular", batch_frames=step, num_workers=num_workers)
    return out


# --------------------------------------------------------------------------------------
# chunked inference: Zarr in -> Zarr out, tile by tile, in parallel
# --------------------------------------------------------------------------------------
# Why a tile scheduler on dask.delayed rather than ``dask.array.map_overlap``:
# - time needs reflection *without* repeating the edge frame (frame -1 := 1, as in
#   ``denoise``); Dask's boundary='reflect' is NumPy's 'symmetric' (frame -1 := 0), which
#   would put the predicted frame into its own window.  Space uses periodic wrapping,
#   which is Dask's boundary='periodic' and the whole-frame circular padding of ``denoise``.
# - each task writes its own output chunks straight into the Zarr store and returns only
#   a pixel count, so nothing but ``workers`` tiles is ever in memory, and a task that
#   runs out of memory can split its own tile without touching a neighbour's chunks.
import copy as _copy  # noqa: E402
import logging as _logging  # noqa: E402
import math as _math  # noqa: E402
import os as _os  # noqa: E402
import time as _time  # noqa: E402
from dataclasses import dataclass as _dataclass  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_log = _logging.getLogger("emdenoise")

#: Host bytes per output pixel of a CPU tile: the read box (with halos), its normalised
#: copy, the output, its inverted copy and the Zarr encode buffer (float32 each) plus
#: slack for the decoded source chunks.  Measured peak ~20 B/px (bench/bench_scale.py).
CPU_BYTES_PER_PX = 24
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
    3/4 stay free for other jobs and the page cache), free GPU memory / 2 on CUDA; a tile
    holds budget / bytes-per-pixel output pixels.
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
    px = max(1, budget // bpp)
    frames_fit = px // (y * x)
    if frames_fit >= min(t, 2):
        balanced = max(4, _math.ceil(t / (BLOCKS_PER_WORKER * workers)))
        return max(1, min(t, frames_fit, balanced)), y, x
    nt = min(t, TILE_FRAMES)
    side = max(2 * params.halo_s + 16, int(_math.sqrt(px / nt)))

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
                from .train import load_checkpoint
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
                from .io import read_zarr
                _store_cache[key] = read_zarr(path)[0]
            else:
                import zarr
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
    """Read one core tile with its halos (reflected in t, wrapped in y/x), run the model
    with 'valid' spatial padding and write the core into the destination."""
    from .tiling import read_with_halo, reflect_index, wrap_index
    t, y, x = job.shape
    t0, t1, y0, y1, x0, x1 = core
    block = read_with_halo(src, reflect_index(t0 - job.halo_t, t1 + job.halo_t, t),
                           wrap_index(y0 - job.halo_s, y1 + job.halo_s, y),
                           wrap_index(x0 - job.halo_s, x1 + job.halo_s, x))
    out = predict_block(model, block, normalisation=ckpt, device=device, spatial_padding="valid",
                        batch_frames=job.batch_frames, num_workers=job.threads)
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
               attrs: dict | None = None) -> dict:
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
    import uuid

    import dask

    from . import io as _io

    src, src_attrs = _io.read_zarr(src_zarr_path)
    shape = tuple(int(n) for n in src.shape)
    if len(shape) != 3:
        raise InputError(src_zarr_path, f"expected a (T, Y, X) array, got shape {shape}")
    dev = resolve_device(device)
    params_model = cached_model(model, "cpu")[0] if isinstance(model, (str, _os.PathLike)) else model
    if ckpt is None and isinstance(model, (str, _os.PathLike)):
        ckpt = cached_model(model, "cpu")[1]
    p = params_model.params
    if shape[0] < p.halo_t + 1:
        raise InputError(src_zarr_path, f"need at least {p.halo_t + 1} frames, got {shape[0]}")
    ngpu = torch.cuda.device_count() if dev.type == "cuda" else 0
    if workers is None:
        workers = max(1, ngpu) if ngpu else max(1, torch.get_num_threads() // max(1, threads_per_worker))
    workers = max(1, int(workers))
    if tile is None:
        tile = auto_tile(shape, p, device=dev, workers=workers, memory=memory)
    elif isinstance(tile, int):
        tile = (min(shape[0], TILE_FRAMES), tile, tile)
    tile = tuple(max(1, min(int(a), n)) for a, n in zip(tile, shape))
    cores = _core_tiles(shape, tile)
    norm = ckpt if ckpt is None or isinstance(ckpt, Normalisation) else _normalisation(ckpt)
    progress_s = None if progress is False else (2.0 if progress is True else float(progress))
    run_id = uuid.uuid4().hex
    _shared_state[run_id] = _Shared(_math.prod(tile), len(cores), _math.prod(shape), progress_s)
    out_attrs = {**src_attrs, **(attrs or {}),
                 "infer": {"tile": list(tile), "halo_t": p.halo_t, "halo_s": p.halo_s,
                           "temporal_boundary": "reflect (edge not repeated)",
                           "spatial_boundary": "periodic"}}
    _log.info("infer: %s -> %s, shape %s, tile %s, %d blocks, %d worker(s) on %s",
              src_zarr_path, dst_zarr_path, shape, tile, len(cores), workers, dev)
    t0 = _time.perf_counter()
    own_keys = []
    try:
        with _io.ZarrStackWriter(dst_zarr_path, shape, pixel_size=src_attrs.get("pixel_size"),
                                 attrs=out_attrs, chunks=(1,) + tile[1:]) as w:
            job = _TileJob(src=_zarr_array_path(src_zarr_path, src), dst=str(_Path(w.array.store.root) / w.array.path),
                           shape=shape, halo_t=p.halo_t, halo_s=p.halo_s, device=str(dev),
                           batch_frames=batch_frames, threads=threads_per_worker)
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


def _zarr_array_path(path, arr) -> str:
    """Path of the source *array* (not its group), for workers that reopen it."""
    try:
        return str(_Path(arr.store.root) / arr.path)
    except AttributeError:  # not a local store: reopen through read_zarr(path)
        return str(path)


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
            client.run(_shared_state.pop, run_id, None)


def _register_run(run_id: str, max_px: int, n: int) -> None:
    _shared_state.setdefault(run_id, _Shared(max_px, n, 1, None))


def _run_tile_remote(job, model_ref, norm, core, run_id) -> int:
    """Worker side: a distributed worker writes to the temporary array by path (a shared
    filesystem is required) and logs nothing itself -- progress is logged by the client."""
    return _run_tile(job, model_ref, norm, core, run_id)


__all__ += ["infer_zarr", "auto_tile", "available_memory", "cached_model", "is_oom"]
