"""Whole-array inference with any registered blind-spot model: (T, Y, X) in, (T, Y, X) out.

Temporal edges: a model with a window of kt = 2h + 1 frames predicts frame t from frames
t-h..t+h.  To keep T frames out for T in, a frame outside the movie is replaced by its
mirror image *about the centre frame* (``tiling.window_index``): frame 0 is predicted
from (1, 0, 1) (kt = 3) or (2, 1, 0, 1, 2) (kt = 5), frame 1 from (3, 0, 1, 2, 3).  A
window never holds its centre frame twice; mirroring about frame 0 (the old scheme)
gave frame 1 the window (1, 0, 1, 2, 3) and leaked its own noisy pixel.

Chunked Zarr-to-Zarr inference lives in ``emdenoise.chunked``; tilt-series tiling in
``emdenoise.tiling`` (geometry) and :func:`denoise_tiled` here (the network part).

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
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import normalisation_of
from .errors import InputError
from .models import WCVD, resolve_device
from .tiling import blend_tiles, check_frame_size, window_index

__all__ = ["denoise", "denoise_tiled", "predict_block", "predict_windows"]

_TILE_PIXELS = 1 << 16  # ~64k output px per CPU tile: the working set of a tile stays in L2/L3


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
        w = model.merged_input_weight().float().cpu()          # (nb*C, kt [+ n_ctx], K, K)
        self.features = model.features  # windows (+ context means) of a block, pure tensor ops
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
                    torch.set_num_threads(1)  # a new thread starts from the last count set anywhere
                    local.bufs = (torch.empty(2, self.nb, self.c, rows * xo), torch.empty(self.nb, 1, rows * xo))
                inp = self.features(z[t:t + kt, r0:r1 + 2 * h][None])   # (1, kt [+ n_ctx], rows, X)
                hcv = F.conv2d(inp, self.conv_w, self.conv_bias)[0]
                hcv = hcv.reshape(self.conv_w.shape[0], -1)
                npx = hcv.shape[1]
                self.pointwise(hcv, out[t, r0:r1].reshape(-1), (local.bufs[0][..., :npx], local.bufs[1][..., :npx]))

        if workers > 1 and len(tiles) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(tiles))) as pool:
                list(pool.map(work, tiles))
        else:
            for tile in tiles:
                work(tile)


@functools.lru_cache(maxsize=1)
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (AMX-BF16 or AVX512-BF16
    in /proc/cpuinfo, and oneDNN with bf16): then bf16 inference is ~4-6x faster than
    float32; elsewhere it is emulated and slower, so ``precision='auto'`` keeps float32."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except (OSError, RuntimeError, AttributeError):
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_dtype(model, device, precision: str = "auto") -> torch.dtype:
    """The dtype a model's forward runs in: float32, except on a CPU with native bf16
    (:func:`cpu_bf16_native`) for models that allow it (``cpu_bf16``: SHINE) when
    ``precision`` is 'auto'.  precision: 'auto' | 'float32'."""
    if precision not in ("auto", "float32"):
        raise ValueError(f"precision must be 'auto' or 'float32', got {precision!r}")
    if precision == "auto" and resolve_device(device).type == "cpu" and getattr(model, "cpu_bf16", False) \
            and cpu_bf16_native():
        return torch.bfloat16
    return torch.float32


@contextlib.contextmanager
def _single_threaded_ops():
    """Run torch ops single-threaded, restoring the thread count afterwards.

    The CPU path parallelises over tiles with its own threads instead of inside each
    op: thousands of small OpenMP regions each end in a barrier, and when another
    process holds one of the cores every barrier waits for a descheduled thread.
    Measured on the shared 2-core machine: 20 x 512 x 512 took ~1.0 s with 2 OpenMP
    threads under load vs ~0.3 s single-threaded; tile threads keep both cores busy
    when they are free and degrade gracefully when they are not.

    The thread count is per thread (OpenMP's nthreads-var; a new thread starts from the
    last value set anywhere), so each thread saves, sets and restores its own, re-entrantly:
    a process-wide count let the second of two Dask threads run with 2 OpenMP threads,
    and the results depend on that in the last bit (see :func:`predict_windows`).
    Yields the thread count the calling thread had.
    """
    st = _st_local
    if getattr(st, "depth", 0) == 0:
        st.saved = torch.get_num_threads()
        torch.set_num_threads(1)
    st.depth = getattr(st, "depth", 0) + 1
    try:
        yield st.saved
    finally:
        st.depth -= 1
        if st.depth == 0:
            torch.set_num_threads(st.saved)


_st_local = threading.local()


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def _runs(windows: np.ndarray) -> list[tuple[int, int]]:
    """Split windows (n, k) into runs (first row, n_rows) that slide over consecutive
    frames (row i = row i0 + (i - i0), each row k consecutive frames); a mirrored edge
    window is a run of its own."""
    k = windows.shape[1]
    plain = np.all(windows == windows[:, :1] + np.arange(k), axis=1)
    runs: list[tuple[int, int]] = []
    for i in range(len(windows)):
        if runs and plain[i] and plain[i - 1] and windows[i, 0] == windows[i - 1, 0] + 1 \
                and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def predict_windows(model, frames: np.ndarray, windows: np.ndarray, *, normalisation=None,
                    device: str = "auto", spatial_padding: str = "circular", batch_frames: int = 8,
                    num_workers: int | None = None, precision: str = "auto") -> np.ndarray:
    """Predict one output frame per temporal window.

    frames: (n_in, Y, X) float32 in data units (normalised units when ``normalisation``
        is None).
    windows: (n_out, kt) int indices into ``frames``, centre frame at column kt // 2
        (``tiling.window_index`` minus the first frame read).
    normalisation: a ``Normalisation``, a checkpoint dict or None.
    spatial_padding: 'circular' (whole frames) or 'valid' (a tile carrying a halo of
        ``halo_s`` px on each side; the output is smaller by that halo and its pixels
        are those of whole-frame inference -- for tiled / chunked inference).
    batch_frames: output frames normalised and sent to the device at once (memory bound).
    num_workers: CPU WCVD path only, threads sharing the row tiles; None =
        torch.get_num_threads().  When the caller already runs blocks in parallel, pass 1.
    precision: 'auto' (bfloat16 for SHINE on a CPU with native bf16, :func:`inference_dtype`)
        or 'float32'.
    Returns (n_out, Y', X') float32 in the units of ``frames``.
    """
    frames = np.asarray(frames, dtype=np.float32)
    windows = np.asarray(windows, dtype=np.int64)
    if frames.ndim != 3:
        raise InputError(None, f"expected a (t, Y, X) block, got shape {frames.shape}")
    kt = model.params.kt_eff
    if windows.ndim != 2 or windows.shape[1] != kt:
        raise InputError(None, f"windows must be (n, {kt}) frame indices, got shape {windows.shape}")
    if len(windows) and (windows.min() < 0 or windows.max() >= frames.shape[0]):
        raise InputError(None, "window indices outside the frames given")
    if spatial_padding not in ("circular", "valid"):
        raise ValueError(f"spatial_padding must be 'circular' or 'valid', got {spatial_padding!r}")
    hs = model.params.halo_s
    shrink = 2 * hs if spatial_padding == "valid" else 0
    yo, xo = frames.shape[1] - shrink, frames.shape[2] - shrink
    if min(yo, xo) < 1:
        raise InputError(None, f"block of {frames.shape[1]}x{frames.shape[2]} px is smaller than the kernel halo")
    if spatial_padding == "circular":
        check_frame_size(frames.shape[1:], hs)
    norm = normalisation_of(normalisation)
    dev = resolve_device(device)
    result = np.empty((len(windows), yo, xo), dtype=np.float32)
    model = model.eval()
    # _CpuPlan is WCVD-specific; other models run their own forward on any device
    cpu_plan = dev.type == "cpu" and isinstance(model, WCVD)
    if not cpu_plan:
        model = model.to(dev)  # note: moves the caller's model (nn.Module.to is in place)
    step = max(1, int(batch_frames))
    threads = _single_threaded_ops() if cpu_plan else contextlib.nullcontext(0)
    dtype = inference_dtype(model, dev, precision) if not cpu_plan else torch.float32
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), threads as nthreads, autocast:
        # built single-threaded too: folding the first 1x1 layer into the convolution
        # (einsum) rounds differently with 1 or 2 threads, and a Dask worker thread's count
        # depended on which block entered first (the Au movie's WCVD outputs differed by
        # 1 ulp in whole blocks between two runs of the workflow)
        plan = _CpuPlan(model) if cpu_plan else None
        workers = max(1, int(nthreads)) if num_workers is None else max(1, int(num_workers))
        for r0, n in _runs(windows):
            for s in range(r0, r0 + n, step):
                e = min(r0 + n, s + step)
                if e - s == 1:
                    block = frames[windows[s]]
                else:
                    block = frames[windows[s, 0]:windows[e - 1, -1] + 1]
                z = torch.from_numpy(norm.apply(block) if norm is not None else np.ascontiguousarray(block))
                if plan is not None:
                    plan.run(z, spatial_padding, torch.from_numpy(result[s:e]), workers)  # in place
                else:
                    result[s:e] = model(z.to(dev)[None], spatial_padding)[0].float().cpu().numpy()
    return norm.invert(result) if norm is not None else result


def predict_block(model, block: np.ndarray, *, normalisation=None, device: str = "auto",
                  spatial_padding: str = "circular", batch_frames: int = 8,
                  num_workers: int | None = None, precision: str = "auto") -> np.ndarray:
    """Denoise the frames of a block that carries its own temporal halo (sliding windows).

    block: (t, Y, X) float32 frames; output frame i is predicted from block frames
        i..i+kt-1, so (t - kt + 1, Y', X') come out.  Other arguments as
        :func:`predict_windows`.
    """
    block = np.asarray(block, dtype=np.float32)
    if block.ndim != 3:
        raise InputError(None, f"expected a (t, Y, X) block, got shape {block.shape}")
    kt = model.params.kt_eff
    if block.shape[0] < kt:
        raise InputError(None, f"block needs at least kt={kt} frames (with halo), got {block.shape[0]}")
    windows = np.arange(block.shape[0] - kt + 1)[:, None] + np.arange(kt)[None, :]
    return predict_windows(model, block, windows, normalisation=normalisation, device=device,
                           spatial_padding=spatial_padding, batch_frames=batch_frames, num_workers=num_workers,
                           precision=precision)


def denoise(model, ckpt: dict | None, stack: np.ndarray, *, device: str = "auto",
            batch_frames: int = 8, num_workers: int | None = None,
            progress: Callable[[int, int], None] | None = None, precision: str = "auto") -> np.ndarray:
    """Denoise a whole movie: (T, Y, X) in data units -> (T, Y, X) float32, same units.

    model: any registered blind-spot model (``emdenoise.models``).
    ckpt: the checkpoint dict (its ``normalisation`` is applied before and inverted
        after the network); None = the stack is already normalised.
    Edge frames use windows mirrored about their centre frame, then continued
    periodically (``tiling.window_index``), so T frames come out for T in.  Frames must
    be wider than the receptive field.
    batch_frames: output frames processed at once, bounds memory.
    num_workers: CPU threads (None = torch.get_num_threads()).
    progress: called with (frames done, T) after every batch (a progress bar).
    precision: 'auto' | 'float32' (:func:`inference_dtype`).
    """
    stack = np.asarray(stack)
    if stack.ndim != 3:
        raise InputError(None, f"expected a (T, Y, X) stack, got shape {stack.shape}")
    if stack.shape[0] < 1:
        raise InputError(None, "empty stack")
    check_frame_size(stack.shape[1:], model.params.halo_s)
    t = stack.shape[0]
    windows = window_index(0, t, t, model.params.halo_t)  # InputError for a too short movie
    out = np.empty(stack.shape, dtype=np.float32)
    step = max(1, int(batch_frames))
    for s in range(0, t, step):  # each batch reads only its own input frames
        e = min(t, s + step)
        lo, hi = int(windows[s:e].min()), int(windows[s:e].max()) + 1
        out[s:e] = predict_windows(model, stack[lo:hi], windows[s:e] - lo, normalisation=ckpt, device=device,
                                   spatial_padding="circular", batch_frames=step, num_workers=num_workers,
                                   precision=precision)
        if progress is not None:
            progress(e, t)
    return out


def denoise_tiled(model, ckpt, stack, *, tile: int = 1024, overlap: int = 256, device: str = "auto",
                  padding: str = "valid", batch_frames: int = 8, num_workers: int | None = None,
                  precision: str = "auto", out=None) -> np.ndarray:
    """Denoise a (T, Y, X) stack tile by tile (tilt series): (T, Y, X) data units ->
    (T, Y, X) float32.  ``tiling.blend_tiles`` cuts the tiles and blends them; this
    function supplies the network.  tile / overlap in px; padding 'valid' (real-pixel
    halo, exact) or 'circular' (tile-local wrap hidden by a guard band); precision as
    :func:`denoise`; out: None or a writable (T, Y, X) array filled by blocks of frames
    (``io.ZarrStackWriter``: memory does not grow with T, ``tiling.blend_tiles``)."""
    def predict(frames, windows, spatial_padding):
        return predict_windows(model, frames, windows, normalisation=ckpt, device=device,
                               spatial_padding=spatial_padding, batch_frames=batch_frames,
                               num_workers=num_workers, precision=precision)
    return blend_tiles(predict, stack, halo_t=model.params.halo_t, halo_s=model.params.halo_s, tile=tile,
                       overlap=overlap, padding=padding, batch_frames=batch_frames, out=out)
