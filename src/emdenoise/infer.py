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
    plan = _CpuPlan(model) if dev.type == "cpu" else None
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
