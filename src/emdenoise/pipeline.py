"""The denoising chain shared by ``emdenoise denoise`` and the workflow's scripts.

train candidates -> infer -> post-process -> choose.  Each step is one function here;
the workflow runs them as separate rules (``train``, ``infer``, ``lowpass``, ``select``),
the CLI calls :func:`denoise_stack`, which runs the same functions in sequence, so the
two paths cannot disagree on what a model's method includes (e.g. the FFT low-pass is
part of WCVD's method, ``config.lowpass_in_method``) or on how ``auto`` chooses.
The WCID pre-filter used only to measure drift is here too: it trains a model.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from . import drift, filters, io, metrics, noise
from .config import CONTEXT_SUFFIX, ModelConfig, TrainParams, candidate_model, context_frames, lowpass_in_method
from .errors import InputError
from .tiling import min_frames_for_windows

# The modules that import torch (checkpoint, chunked, infer, models, train) are imported
# inside the functions that train or apply a network: the workflow's lowpass, select,
# metrics and classical jobs use none of them and start ~1.5 s sooner without torch.

__all__ = ["prefilter", "prefilter_zarr", "model_params", "train_candidate", "choose_reach", "unblind",
           "unblind_weight", "with_own_pixel", "postprocess", "lowpass_umse", "classical_candidate",
           "temporal_reach", "check_frames", "check_fit", "choose", "denoise_stack", "align_on_canvas",
           "from_canvas", "classical_zarr", "OnInputGrid"]


def prefilter(stack: np.ndarray, method: str = "wcid", sigma: float = 1.5, *,
              wcid_params=None, train_params: TrainParams | None = None) -> np.ndarray:
    """Pre-denoise a (T, Y, X) stack for drift measurement only (never for the output).

    method: 'wcid' (a WCID model, WCVD paper section 2.1, trained on this very stack
    with ``wcid_params`` / ``train_params``), 'gaussian2d' (per frame, sigma px) or
    'none'.  Per-frame filters on purpose: a temporal filter would smear the very motion
    that drift correction measures.  Returns float32 (T, Y, X).

    Memory: the whole stack, float32, and the result (plus, for 'wcid', the training's
    normalised copy); the workflow uses :func:`prefilter_zarr` (same values, bounded).
    """
    if method == "gaussian2d":
        return filters.gaussian2d(stack, sigma)
    if method == "none":
        return np.asarray(stack, dtype=np.float32)
    if method == "wcid":
        from . import infer
        from .checkpoint import model_from_checkpoint
        from .train import train_model

        params = wcid_params or ModelConfig().wcvd_params(dims=2)
        ckpt = train_model(np.asarray(stack, dtype=np.float32), params, train_params or TrainParams())
        model = model_from_checkpoint(ckpt, device=ckpt["device"])
        return infer.denoise(model, ckpt, stack, device=ckpt["device"])
    raise ValueError(f"unknown prefilter method {method!r}")


def prefilter_zarr(src, dst, method: str = "wcid", sigma: float = 1.5, *, wcid_params=None,
                   train_params: TrainParams | None = None, attrs: dict | None = None,
                   frames: int | None = None) -> dict | None:
    """:func:`prefilter` from the (T, Y, X) Zarr stack ``src`` (``io.read_zarr``) into an
    OME-Zarr at ``dst`` (written under a temporary name, renamed when complete), at
    memory that does not grow with T; the values are those of :func:`prefilter` on the
    whole array (CPU; on CUDA up to float rounding, as ``chunked.infer_zarr``).

    'gaussian2d' / 'none': blocks of ``frames`` whole frames (None:
    ``filters.block_frames``, 64 MB), one shard each; memory ~ 3 float32 copies of a block.
    'wcid': training reads the stack whole only up to ``train.IN_MEMORY_BYTES``,
    crops from the store above (``train.train_model``); inference is
    ``chunked.infer_zarr`` by tiles sized from the free memory (at most
    ``chunked.MAX_TILE_BYTES`` per worker).  ``attrs``: stored with the source's
    attributes (and, for 'wcid', infer_zarr's tiling record).  Returns the WCID
    checkpoint (None for the filters).
    """
    raw, src_attrs = io.read_zarr(src)
    shape = tuple(int(n) for n in raw.shape)
    if len(shape) != 3:
        raise InputError(src, f"expected a (T, Y, X) array, got shape {shape}")
    out_attrs = {**src_attrs, **(attrs or {})}
    if method in ("gaussian2d", "none"):
        k = int(frames) if frames else filters.block_frames(shape[1:])
        blocks = (filters.gaussian2d_blocks(raw, sigma, k) if method == "gaussian2d"
                  else filters.filter_blocks(raw, lambda s: s, 0, k))
        io.write_zarr_blocks(dst, shape, blocks, k, pixel_size=src_attrs.get("pixel_size"), attrs=out_attrs)
        return None
    if method != "wcid":
        raise ValueError(f"unknown prefilter method {method!r}")
    from . import chunked, train
    from .checkpoint import model_from_checkpoint

    params = wcid_params or ModelConfig().wcvd_params(dims=2)
    in_memory = 4 * np.prod(shape, dtype=np.int64) <= train.IN_MEMORY_BYTES
    ckpt = train.train_model(np.asarray(raw[:], dtype=np.float32) if in_memory else raw, params,
                       train_params or TrainParams())
    model = model_from_checkpoint(ckpt, device=ckpt["device"])
    chunked.infer_zarr(model, ckpt, src, dst, device=ckpt["device"], attrs=attrs)
    return ckpt


def on_gpu(ds, name: str, device: str | None = None) -> bool:
    """Whether candidate ``name`` trains on CUDA (sizes SHINE when ``shine.size: auto``)."""
    from .models import resolve_device

    return resolve_device(device or ds.train.device).type == "cuda"


def model_params(ds, name: str, blindspot: int | None = None, device: str | None = None,
                 n_frames: int | None = None):
    """Architecture of candidate ``name`` ('wcvd', 'wcvd_ctx', 'wcvd_kt<N>', 'shine') for
    dataset config ``ds``.  The blind spot of SHINE and WCVD comes from the noise stage
    (``blindspot``) unless the config fixes it (WCVD: 1 when neither says); SHINE's size
    from ``shine.size`` and the training device; 'wcvd_ctx' resolves ``model.context``
    from the movie's length (``n_frames``, :func:`config.context_frames`)."""
    if name == "shine":
        if ds.shine.blindspot is None and blindspot is None:
            raise InputError(None, "SHINE needs the blind-spot size from the noise stage")
        return ds.shine.params(blindspot or ds.shine.blindspot, gpu=on_gpu(ds, name, device))
    base, kt = candidate_model(name)
    if base == "wcvd":
        context = 0
        if name.endswith(CONTEXT_SUFFIX):
            context = context_frames(ds.model.context, n_frames, kind=ds.kind)
            limit = reach_limit(ds.model.max_reach, n_frames)
            if limit is not None:  # at least one frame each side: the candidate's context is its point
                context = max(1, min(context, limit))
        return ds.model.wcvd_params(kt=kt, context=context, blindspot=ds.model.blindspot or blindspot or 1)
    raise InputError(None, f"unknown candidate model {name!r}")


def train_candidate(stack, ds, name: str, blindspot: int | None = None, *,
                    train_overrides: dict | None = None, log_csv=None,
                    progress: Callable[[dict], None] | None = None, resume=None,
                    data_info: dict | None = None, n_frames: int | None = None,
                    names: list[str] | None = None) -> dict:
    """Train candidate ``name`` on a (T, Y, X) stack (data units; numpy or a Zarr array,
    read crop by crop) -- or one model on a list of stacks (``names``: their datasets,
    ``model.train_on``); returns its checkpoint.
    ``train_overrides``: TrainParams fields replacing the config's (e.g. device, epochs);
    ``resume``: path of a resume state saved every ``train.checkpoint_minutes``;
    ``data_info``: what the model was trained on (pixel_size in Å, blindspot), stored
    under 'data' so that applying it elsewhere can be checked (:func:`check_fit`);
    ``n_frames``: the shortest movie the model will denoise (sizes ``model.context:
    auto``), default the shortest stack trained on."""
    from .train import train_model

    device = (train_overrides or {}).get("device")
    gpu = on_gpu(ds, name, device)
    tp = ds.train_params(name, gpu=gpu)
    if train_overrides:
        tp = dataclasses.replace(tp, **{k: v for k, v in train_overrides.items() if v is not None})
    if n_frames is None:
        n_frames = min(s.shape[0] for s in stack) if isinstance(stack, (list, tuple)) else stack.shape[0]
    mp = model_params(ds, name, blindspot, device, n_frames=n_frames)
    reach = None
    if name.endswith(CONTEXT_SUFFIX) and ds.model.context == "auto":
        mp, reach = choose_reach(stack, mp, tp, n_frames, names)
    ckpt = train_model(stack, mp, tp, log_csv=log_csv,
                       progress=progress, resume=resume, checkpoint_every=60.0 * tp.checkpoint_minutes, names=names)
    if reach is not None:
        ckpt["reach_choice"] = reach
    ckpt["dataset"] = ds.name if names is None else None
    ckpt["data"] = {"blindspot": blindspot, **(data_info or {})}
    if name == "shine":  # which size ran, and why (recorded in provenance and the report)
        ckpt["shine_size"] = {"setting": ds.shine.size, "used": ds.shine.resolved_size(gpu), "gpu": gpu}
    return ckpt


def reach_limit(setting, n_frames: int | None) -> int | None:
    """The longest temporal reach (frames each side of t) ``model.max_reach`` allows a tuned
    candidate on an ``n_frames`` movie: None for 'any'; for 'checkable' the longest uMSE can
    still score (:func:`metrics.checkable_reach`: 44 of 100 frames) -- None where the movie is
    too short for uMSE at any reach (a limit would cost quality and buy no check); an int as
    given."""
    if setting in (None, "any"):
        return None
    if setting == "checkable":
        if n_frames is None:
            raise InputError(None, "model.max_reach: checkable depends on the number of frames; pass n_frames")
        r = metrics.checkable_reach(int(n_frames))
        return r if r >= 0 else None
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or int(setting) < 0:
        raise InputError(None, f"model.max_reach must be 'any', 'checkable' or a number of frames >= 0, "
                               f"got {setting!r}")
    return int(setting)


def choose_reach(stack, mp, tp: TrainParams, n_frames: int, names: list[str] | None = None) -> tuple:
    """The context radius of ``model.context: auto``: the longest (``mp.context``,
    :func:`config.max_auto_reach`) or the longest whose output the report can still check
    with uMSE (:func:`metrics.checkable_reach`: a 100-frame movie 44, vs 99), whichever
    the held-out frames prefer -- the checkable one unless the longer is significantly
    better (``train.compare_reach``, the margin of ``metrics.SELECT_MIN_Z``).  On a still
    scene averaging every frame wins by a wide margin and is kept; where it does not (a
    moving liquid cell) the report keeps its uMSE check.
    Returns (params to train, the comparison's record or None when there was no choice)."""
    from .train import compare_reach

    short = metrics.checkable_reach(n_frames)
    if not 1 <= short < mp.context:
        return mp, None
    rec = compare_reach(stack, [dataclasses.replace(mp, context=short), mp], tp, min_z=metrics.SELECT_MIN_Z,
                        names=names)
    logging.getLogger("emdenoise").info("%s", metrics.reach_sentence(rec))  # the workflow's train log
    return dataclasses.replace(mp, context=int(rec["chosen"])), rec


#: Low-pass diameters (fraction of N) that ``lowpass.diameter: auto`` compares; None = off.
LOWPASS_AUTO = (None, 1 / 2, 1 / 3)


class Unblinded(filters.FrameMap):
    """A lazy (T, Y, X) stack ``blind + w (noisy - blind)``, computed for the frames read
    (float32, the same arithmetic as :func:`unblind` on NumPy arrays)."""

    def __init__(self, blind, noisy, weight: float):
        super().__init__(blind, None)
        self.noisy, self.weight = noisy, np.float32(weight)

    def _compute(self, a: int, b: int) -> np.ndarray:
        return with_own_pixel(np.asarray(self.stack[a:b], dtype=np.float32), self.noisy[a:b], self.weight)


def unblind(blind, noisy, loss: float | None = None, region=None) -> tuple:
    """Give a blind-spot network's output its own pixel back: ``blind + w (noisy - blind)``.

    blind: (T, Y, X) output of a network that never sees pixel (t, p) -- nor the pixels
        whose noise correlates with it -- when predicting it (J-invariant, Batson & Royer
        2019); noisy: the (aligned) movie it denoised, same shape and units.  NumPy, or
        lazy arrays (Zarr, ``filters.FrameMap``: read frame by frame; the result is then
        a lazy :class:`Unblinded`).
    Because the blind output's error e is independent of the pixel's own noise n, the
    mean squared error of f + w (y - f) is (1 - w)^2 MSE_f + w^2 sigma^2, least at
    w = MSE_f / (MSE_f + sigma^2) = 1 - sigma^2 / L, with L = E (f - y)^2 = MSE_f +
    sigma^2 the self-supervised loss (``loss``, computed here if None) -- the posterior
    mean of Laine et al. (2019) with one global weight.  sigma^2 is taken as half the
    mean squared difference of adjacent frames, which any change of the scene between
    frames can only inflate: w then comes out smaller than the best weight, never larger,
    so the result is never worse than the blind output in expectation (exact for a still
    scene).  w is clipped to [0, 1).  ``region``: (slice_y, slice_x) of the pixels that
    estimate w (``loss`` must then be over them too), e.g. where every frame of a drift
    canvas has data; the weight applies everywhere.
    Returns (stack, record {'weight', 'loss', 'noise_variance'}).
    """
    record = unblind_weight(blind, noisy, loss, region)
    return with_own_pixel(blind, noisy, record["weight"]), record


def unblind_weight(blind, noisy, loss: float | None = None, region=None) -> dict:
    """The own-pixel weight of :func:`unblind` and its evidence, without making the stack:
    {'weight', 'loss', 'noise_variance'}."""
    f, y = metrics._stack(blind, "unblind"), metrics._stack(noisy, "unblind")
    metrics._same_shape(f, y, "unblind")
    if loss is None:
        loss = metrics.self_supervised_loss(f, y, region)
    var = metrics.frame_difference_variance(y, region)
    w = float(np.clip(1.0 - var / loss, 0.0, 0.999)) if loss > 0 and np.isfinite(var) else 0.0
    return {"weight": w, "loss": float(loss), "noise_variance": float(var)}


def with_own_pixel(blind, noisy, weight: float):
    """``blind + weight (noisy - blind)`` in float32 (a lazy :class:`Unblinded` for lazy
    input); one new array, filled in place."""
    if not isinstance(blind, np.ndarray):
        return Unblinded(blind, noisy, weight)
    f32 = np.asarray(blind, dtype=np.float32)
    out = np.subtract(np.asarray(noisy, dtype=np.float32), f32)
    out *= np.float32(weight)
    out += f32
    return out


def postprocess(denoised, ds, name: str, noisy=None,
                reach: int | None = None, model_kind: str | None = None,
                ks_max: int | None = None, loss: float | None = None, region=None) -> tuple[np.ndarray, dict]:
    """The post-processing of a model's output: its own pixel given back
    (:func:`unblind`, ``unblind.enabled``; needs ``noisy``; ``loss``: the output's
    self-supervised loss if already computed, over ``region`` of each frame when given)
    and the FFT low-pass for models whose method includes it (WCVD).  Returns (stack,
    record of what was done: 'unblind' holds the weight and whether it was 'applied').

    Without a low-pass (SHINE) the own pixel is always given back: in expectation it can
    only lower the error.  With one it may not: the weight is estimated for the whole
    band, and the low-pass then removes the high frequencies where the pixel's own value
    helped most (measured on the real Au movie: uMSE 59.3 -> 60.2 with it).  So the
    options -- low-pass diameters, each with and without the own pixel -- are compared
    by uMSE (computed in the spectrum for all options at once, :func:`lowpass_umse`;
    only the chosen option's stack is made) against ``noisy`` (the aligned raw movie) at radius
    max(metrics.temporal_radius, ``reach``): ``lowpass.diameter: auto`` scores no
    low-pass and the diameters in ``LOWPASS_AUTO``, a fixed diameter only itself.  A
    movie too short for that radius gets no low-pass with 'auto' (it can only remove
    detail that no score vouches for) and the own pixel, or the fixed low-pass without it.
    ``model_kind`` / ``ks_max``: for a pretrained model, its class name and largest
    kernel (from its checkpoint) instead of the candidate name's and ``model.ks``.

    ``denoised`` (T, Y, X): a NumPy array gives a float32 array; a lazy array-like (Zarr)
    gives a lazy stack (``filters.FrameMap``: computed block by block while
    ``io.write_zarr`` writes it), or ``denoised`` itself when nothing is applied; ``noisy``
    may be lazy either way.  Memory on the lazy path: a few frames and their spectra
    (scoring) or one write block of frames.
    """
    kind = model_kind or candidate_model(name)[0]
    lazy = hasattr(denoised, "shape") and not isinstance(denoised, np.ndarray)
    blind = denoised if lazy else np.asarray(denoised, dtype=np.float32)
    own_record = unblind_weight(blind, noisy, loss, region) if noisy is not None and ds.unblind.enabled else None

    def own():  # made only where it is the output: the low-pass options are scored without it
        return with_own_pixel(blind, noisy, own_record["weight"])

    def done(out, record, with_own: bool):
        if own_record is not None:
            record["unblind"] = {**own_record, "applied": bool(with_own)}
        return out, record

    if not (lowpass_in_method(kind) and ds.lowpass.enabled):  # SHINE: reads no lowpass setting
        return done(blind if own_record is None else own(), {"applied": False}, own_record is not None)
    lp = ds.lowpass

    auto = lp.diameter == "auto"
    diameters = LOWPASS_AUTO if auto else ("paper" if lp.diameter is None else lp.diameter,)
    # one spectrum mask per diameter, for the scores and the output alike; ks_max matters
    # only for diameter "paper" (None in the config: N / Ks_max)
    masks = {d: None if d is None else filters.lowpass_mask(
        blind.shape[1:], None if d == "paper" else d, ks_max or max(ds.model.ks), lp.pad, lp.edge_width)
        for d in diameters}

    def lowpass(stack, diameter):
        if diameter is None:
            return stack

        def fn(frames):
            return filters.apply_lowpass_mask(frames, masks[diameter], lp.pad)
        return filters.FrameMap(stack, fn) if lazy else fn(stack)
    r = max(int(ds.metrics.temporal_radius), int(reach or 0))
    if noisy is None or noisy.shape[0] < 2 * r + 4:
        reason = f"fewer than {2 * r + 4} frames to score it"
        if auto:
            return done(blind if own_record is None else own(), {"applied": False, "diameter": "auto",
                                                                 "reason": reason}, own_record is not None)
        return done(lowpass(blind, diameters[0]), {"applied": True, "diameter": lp.diameter, "pad": lp.pad,
                                                   "reason": reason}, False)
    options = [(d, with_own) for with_own in ((False, True) if own_record is not None else (False,)) for d in diameters]
    umse = lowpass_umse(blind, noisy, [masks[d] for d, _ in options],
                        [own_record["weight"] if with_own else 0.0 for _, with_own in options], r, lp.pad)
    scores = {("none" if d is None else "paper" if d == "paper" else f"{d:.4g}") + (" + own pixel" if with_own else ""): u
              for (d, with_own), u in zip(options, umse)}
    d, with_own = options[int(np.argmin(umse))]
    out = lowpass(own() if with_own else blind, d)
    record = {"applied": d is not None, "diameter": None if d == "paper" else d, "pad": lp.pad,
              "auto" if auto else "scored": {"umse": scores, "radius": r}}
    return done(out, record, with_own)


#: Spectrum bins per slab of :func:`lowpass_umse`'s sums: their temporaries stay ~100 MB
#: whatever the frame size (a 4096² frame's six products would be 400 MB).
UMSE_SLAB_BINS = 2**22
#: The per-bin weight vectors of all slabs are kept across frames up to this size (frames
#: up to ~2048²); above, each frame recomputes them slab by slab.
UMSE_CACHE_BYTES = 256 * 2**20


def lowpass_umse(blind, noisy, masks: list, weights: list, temporal_radius: int, pad: str = "symmetric") -> list:
    """``metrics.umse`` of low-passed outputs without making them: for each option i,
    the uMSE at ``temporal_radius`` of ``lowpass(blind + w_i (noisy - blind))`` against
    ``noisy``, with ``masks[i]`` the spectrum mask (``filters.lowpass_mask``; None: no
    low-pass) and ``weights[i]`` the own-pixel weight w_i (0: none; :func:`unblind`).

    The spectra are orthonormal (``filters.lowpass_spectrum``), so by Parseval each scored
    frame's sum_px (f[t] - y[s])^2 is a weighted sum over spectrum bins.  With C the
    option's frame before the low-pass and m its mask, m C - y_s = m (C - y_s) + (m - 1) y_s
    and C - y_s = (1 - w) d1 + w d2 (d1 = blind[t] - y_s, d2 = noisy[t] - y_s), so every
    option follows from the six products of the spectra of d1, d2 and y_s summed with
    weights m², m (m - 1) and (m - 1)² per mask: three transforms per scored frame for all
    options together (filtering and scoring each option took two per frame and option
    plus a pass over the movie; 2.4 x faster on 100 x 512²).  These terms are noise-sized
    where they are not masked out, so single precision sums lose nothing to cancellation
    (products of the spectra of blind[t] and y_s themselves would cancel from the signal
    power down to the noise power).  Equal to ``metrics.umse`` of the filtered stacks up to
    float rounding (test).  blind, noisy: (T, Y, X), NumPy or lazy (read frame by frame);
    memory: a few frames, their spectra and the masks.
    """
    r = int(temporal_radius)
    pairs = metrics.umse_pairs(noisy.shape[0], r)
    if not pairs:
        raise InputError(None, f"lowpass_umse: needs at least {2 * r + 4} frames for temporal_radius={r}, "
                               f"got {noisy.shape[0]}")
    noise = metrics.umse_noise_terms(noisy, r, "lowpass_umse")
    unique = list({id(mk): mk for mk in masks if mk is not None}.values())
    column = [None if mk is None else next(i for i, u in enumerate(unique) if u is mk) for mk in masks]
    n_px = float(np.prod(noisy.shape[1:]))
    first, second = [0, 0, 1, 0, 1, 2], [0, 1, 1, 2, 2, 2]  # d1 d1, d1 d2, d2 d2, d1 y_s, d2 y_s, y_s y_s
    total, cache = np.zeros(len(masks)), {}
    for t, s in pairs:
        ys = np.asarray(noisy[s], dtype=np.float32)
        spec, weight = filters.lowpass_spectrum(np.stack([np.asarray(blind[t], dtype=np.float32) - ys,
                                                          np.asarray(noisy[t], dtype=np.float32) - ys, ys]), pad)
        del ys
        cplx, (ny, nx) = np.iscomplexobj(spec), spec.shape[1:]
        slab = max(1, UMSE_SLAB_BINS // nx)
        sums = np.zeros((1 + 3 * len(unique), 6))  # per bin weight W; W m², W m (m - 1), W (m - 1)² per mask
        for y0 in range(0, ny, slab):
            rows = spec[:, y0:y0 + slab].reshape(3, -1)
            if cplx:  # interleaved (re, im): Re(u conj v) is a plain dot product
                rows = rows.view(np.float32)
            vectors = cache.get(y0)
            if vectors is None:
                w = np.broadcast_to(weight, (min(ny, y0 + slab) - y0, nx)).ravel()
                per_bin = [w]
                for u in unique:
                    m = u[y0:y0 + slab].ravel()
                    per_bin += [m * m * w, m * (m - 1) * w, (m - 1) ** 2 * w]
                vectors = np.stack([np.repeat(v, 2) if cplx else v for v in per_bin]).astype(np.float32)
                if vectors.nbytes * -(-ny // slab) <= UMSE_CACHE_BYTES:  # kept for the next frames
                    cache[y0] = vectors
            sums += vectors @ (rows[first] * rows[second]).T
            del rows
        del spec
        for i, (j, w) in enumerate(zip(column, weights)):
            mix = np.array([(1 - w) ** 2, 2 * w * (1 - w), w * w])
            if j is None:
                err = sums[0, :3] @ mix                                                # |C - y_s|²
            else:
                sq, cross, rest = sums[1 + 3 * j:4 + 3 * j]
                err = sq[:3] @ mix + 2 * (cross[3:5] @ [1 - w, w]) + rest[5]
            total[i] += err / n_px - noise[t]
    return [float(v / len(pairs)) for v in total]


def check_fit(ckpt: dict, stack: np.ndarray, pixel_size: float | None = None, *,
              blindspot: int | None = None, tolerance: float = 0.1) -> list[str]:
    """Why a trained model may not fit new data: one sentence per misfit (empty: fits).

    ckpt: the checkpoint (``data`` records what it was trained on: pixel size in Å,
    blind spot the noise asked for, intensity range); stack: (T, Y, X) data units;
    blindspot: the size the new data's noise asks for (``noise.estimate_blindspot``).
    Checked: the frame window against T, pixel size (relative ``tolerance``), the blind
    spot (a model with a smaller one copies correlated noise), the intensity range
    (another detector mode or dose: the model's normalisation no longer maps the data
    to what it learned).  Frames smaller than the receptive field are refused later,
    by inference itself.
    """
    problems = []
    data = ckpt.get("data") or {}
    window = int(ckpt.get("window") or ckpt["model_params"].get("kt", 1))
    if stack.shape[0] < window:
        problems.append(f"the model's window is {window} frames, the movie has {stack.shape[0]}")
    trained_px = data.get("pixel_size")
    if pixel_size and trained_px and abs(pixel_size / trained_px - 1) > tolerance:
        problems.append(f"pixel size {pixel_size:.4g} Å differs from the training data's {trained_px:.4g} Å")
    own = 2 * int(ckpt.get("blind_radius", 0)) + 1
    if blindspot and blindspot > own:
        problems.append(f"this noise is correlated over {blindspot}x{blindspot} px but the model's blind "
                        f"spot is {own}x{own}: it will copy part of the noise")
    norm = ckpt["normalisation"]
    sample = np.asarray(stack[: min(stack.shape[0], 8)], dtype=np.float32)  # a few frames are enough
    lo, hi = np.percentile(sample, [norm.get("low_pct", 0.5), norm.get("high_pct", 99.5)])
    scale = float(hi - lo) or 1.0
    if not 0.5 <= scale / norm["scale"] <= 2.0 or abs(lo - norm["offset"]) > norm["scale"]:
        problems.append(f"intensities ({lo:.4g}..{hi:.4g}) differ from the training data's "
                        f"({norm['offset']:.4g}..{norm['offset'] + norm['scale']:.4g}): another detector mode or dose?")
    return problems


#: NL-means is tried only on movies up to this many pixels (T x Y x X): it costs ~1 s per
#: 512² frame and pass (a blind pass over every frame, and the output pass when chosen),
#: 20 min a pass for 100 frames of 4096² px.
NLM_MAX_PIXELS = 2**28
#: NL-means denoises a temporal average of at least this sigma_t (frames): its blind
#: version leaves frame t out, so sigma_t 0 (the tuned Gaussian's choice for a scene that
#: changes every frame) would leave nothing to denoise.
NLM_MIN_SIGMA_T = 1.0


def gate_mix(stack, m, noise_variance: float, threads: int | None = None) -> dict:
    """Fit the Gaussian mix's gate (``train.fit_mix_gate``: per-pixel coefficients from a
    small MLP instead of per-class ones) and keep it when its cross-fitted loss is lower
    than the class mix's by ``metrics.SELECT_MIN_Z`` standard errors of the per-frame
    difference (the rule every candidate passes).  ``m``: ``filters.blind_gaussian_mix``'s
    result with ``samples``; when the gate is kept, ``m.fit`` / ``m.loss`` /
    ``m.loss_frames`` become the gated mix's (its own-pixel weight from its loss).
    Returns the record: 'n2s_loss', 'z' (against the class mix), 'chosen', 'steps',
    'pixels', 'hidden', or 'skipped' (why).  The loss is a full pass over the movie's
    tiles (``filters.gaussian_mix_apply``); the gate itself is fitted on the samples, with
    torch on ``threads`` CPU threads (None: torch's default)."""
    from . import train  # the torch side: the classical job imports it only when it fits a gate

    samples, m.samples = m.samples, None
    if samples is None:
        return {"skipped": "no samples"}
    try:
        gate = train.fit_mix_gate(samples, threads=threads)
    except InputError as exc:
        return {"skipped": exc.problem}
    gated = {**m.fit, "gate": gate}
    gated["reach"] = filters.mix_reach(gated)  # the gate reads the structure map, whatever the classes
    _, sums = filters.gaussian_mix_apply(stack, gated, output="none", loss=True)
    frames = sums / (int(stack.shape[1]) * int(stack.shape[2]))
    loss = float(frames.mean())
    pick = metrics.select_model({"classes": m.loss, "gate": loss}, {"classes": m.loss_frames, "gate": frames},
                                fallback="classes")
    chosen = pick["chosen"] == "gate"
    record = {"n2s_loss": loss, "z": (pick.get("significance") or {}).get("z"), "chosen": chosen,
              "steps": gate["steps"], "pixels": gate["pixels"], "hidden": gate["hidden"]}
    if chosen:
        var = float(noise_variance)
        weight = float(np.clip(1.0 - var / loss, 0.0, 0.999)) if loss > 0 and np.isfinite(var) else 0.0
        gated["own_pixel"] = {"weight": weight, "loss": loss, "noise_variance": var}
        m.fit, m.loss, m.loss_frames = gated, loss, frames
    return record


def classical_candidate(stack, blind_radius: int, *, tile: int | None = None, out=None, nlm: bool = True,
                        mix: bool = True, gate: bool = True, scratch=None,
                        threads: int | None = None, max_reach: int | None = None) -> tuple[np.ndarray, dict]:
    """The classical filter tuned on the movie itself (no ground truth): the Gaussian 3D
    (``filters.blind_gaussian3d``, Noise2Self with the noise stage's blind spot; any
    temporal reach, up to the mean of the whole movie), NL-means of a temporal Gaussian
    average (``filters.blind_nlm``, at the Gaussian's sigma_t, at least
    ``NLM_MIN_SIGMA_T``) or the Gaussian mix (``filters.blind_gaussian_mix``: Gaussians
    of several sigmas combined per structure class by least squares on the same loss,
    blind to ``filters.mix_blind_radius(b)``), its coefficients per structure class or,
    where significantly lower, per pixel from a small MLP of the same blind outputs
    (:func:`gate_mix`, fitted on ``threads`` CPU threads; ``gate`` False: classes only).
    The lowest self-supervised loss replaces the Gaussian only when it is lower on the
    whole frames by ``metrics.SELECT_MIN_Z`` standard errors of the per-frame difference
    (the rule a network must pass too); every loss is unbiased (MSE + noise) for its
    blind version.  NL-means is skipped (recorded) with ``nlm`` False, for fewer than 2
    frames, no measurable noise or movies over ``NLM_MAX_PIXELS``; the mix with ``mix``
    False, fewer than 2 frames or no measurable noise.

    Returns (T, Y, X) float32 and the attributes: 'filter' ('gaussian3d' | 'nlm' |
    'gaussian_mix'), 'sigma' (t, y, x) -- the Gaussian's, (sigma_t, 0, 0) of NL-means'
    average, or the mix's longest sigma_t and shortest sigma_yx --, 'temporal_reach',
    'blind_radius', 'n2s_loss' of the chosen filter's blind version (what :func:`choose`
    compares; ``n2s_loss_frames`` per frame), the Gaussian's score table ('scores'),
    'gaussian' (its sigma and loss), 'nlm' (its setting, loss and score table, 'z' of the
    paired test against the Gaussian (negative: NL-means lower), or why it was skipped)
    and 'mix' (its loss, 'z', 'fit' -- what ``filters.gaussian_mix_apply`` needs, with
    'gate' when gated --, 'classes_loss' (the class mix's) and 'gate' (:func:`gate_mix`'s
    record), or why it was skipped).

    stack: a (T, Y, X) NumPy array (made float32) or a lazy array-like (Zarr), read by
    spatial tiles of all frames (``tile`` px, None: ``filters.auto_tile``) and, for
    NL-means, by blocks of frames.  out: None (the output is a new float32 array) or a
    writable (T, Y, X) array such as a Zarr array sharded by those tiles, filled and
    returned.  scratch: where NL-means keeps its temporal averages, a writable (T, Y, X)
    array (None: in memory).  Memory: bounded by ``filters.TILE_BUDGET`` (and
    ``filters.BLOCK_BYTES`` for NL-means) plus ``out`` and ``scratch`` when in memory.
    max_reach: the longest temporal reach (frames each side) any of them may have
    (``model.max_reach``, :func:`reach_limit`; recorded as 'max_reach'): the Gaussian's
    sigma_t grid and the mix's are cut there, NL-means whose average reaches further is
    skipped; None: any."""
    if isinstance(stack, np.ndarray) or not hasattr(stack, "shape"):
        stack = np.asarray(stack, dtype=np.float32)
    b = int(blind_radius)
    n_t = int(stack.shape[0])
    g = filters.blind_gaussian3d(stack, b, tile=tile, output="none", max_reach=max_reach)
    scores = [{k: None if v != v else float(v) for k, v in row.items()}  # NaN -> null (JSON)
              for row in g.scores.to_dict(orient="records")]
    gauss = {"sigma": [g.sigma[0], g.sigma[1], g.sigma[1]], "n2s_loss": g.loss}
    attrs = {"method": "classical", "filter": "gaussian3d", "sigma": gauss["sigma"], "temporal_reach": g.reach,
             "blind_radius": b, "output": "plain", "n2s_loss": g.loss, "n2s_loss_frames": g.loss_frames.tolist(),
             "scores": scores, "gaussian": gauss, "max_reach": max_reach}
    losses, frames = {"gaussian3d": g.loss}, {"gaussian3d": g.loss_frames}
    skip = None if nlm else "off"
    if skip is None and n_t < 2:
        skip = "fewer than 2 frames"
    if skip is None and n_t * int(stack.shape[1]) * int(stack.shape[2]) > NLM_MAX_PIXELS:
        skip = f"movie over {NLM_MAX_PIXELS} px (filters.NLM cost)"
    noise_sd = float(np.sqrt(metrics.frame_difference_variance(stack))) if n_t >= 2 else float("nan")
    silent = "no measurable noise (frames identical)" if not (noise_sd > 0 and np.isfinite(noise_sd)) else None
    skip = skip or silent
    nlm_sigma_t = max(g.sigma[0], NLM_MIN_SIGMA_T)
    if skip is None and max_reach is not None and filters.gaussian_reach(nlm_sigma_t) > max_reach:
        skip = f"its temporal average (sigma_t {nlm_sigma_t:g}) reaches past model.max_reach ({max_reach} frames)"
    r = None
    if skip is None:
        r = filters.blind_nlm(stack, nlm_sigma_t, noise_sd=noise_sd, average=scratch)
        losses["nlm"], frames["nlm"] = r.loss, r.loss_frames
        attrs["nlm"] = {"sigma_t": r.sigma_t, "patch": r.patch, "distance": r.distance, "h": r.h,
                        "noise_sd": r.noise_sd, "n2s_loss": r.loss, "scores": r.scores.to_dict(orient="records")}
    else:
        attrs["nlm"] = {"skipped": skip}
    m = None
    skip_mix = None if mix else "off"
    if skip_mix is None and n_t < 2:
        skip_mix = "fewer than 2 frames"
    skip_mix = skip_mix or silent
    if skip_mix is None:
        m = filters.blind_gaussian_mix(stack, filters.mix_blind_radius(b), noise_variance=noise_sd ** 2,
                                       output="none", preferred_reach=max(0, metrics.checkable_reach(n_t)),
                                       min_z=metrics.SELECT_MIN_Z, samples=filters.MIX_GATE_SAMPLES if gate else 0,
                                       max_reach=max_reach)
        classes_loss = m.loss
        gated = gate_mix(stack, m, noise_sd ** 2, threads) if gate else {"skipped": "off"}
        losses["gaussian_mix"], frames["gaussian_mix"] = m.loss, m.loss_frames
        attrs["mix"] = {"n2s_loss": m.loss, "fit": m.fit, "classes_loss": classes_loss, "gate": gated}
    else:
        attrs["mix"] = {"skipped": skip_mix}
    # the networks' rule: another filter replaces the Gaussian only when significantly lower
    # (a tie goes to the Gaussian, whose look -- no patch texture -- is the predictable one)
    pick = metrics.select_model(losses, frames, fallback="gaussian3d")
    chosen = pick["chosen"]
    for name, key in (("nlm", "nlm"), ("gaussian_mix", "mix")):
        if name in losses:  # each one's paired test against the Gaussian, chosen or not
            z = (metrics.select_model({"gaussian3d": g.loss, name: losses[name]},
                                      {"gaussian3d": g.loss_frames, name: frames[name]},
                                      fallback="gaussian3d").get("significance") or {}).get("z")
            attrs[key].update(chosen=chosen == name, z=z)
    if chosen == "nlm":
        attrs.update({"filter": "nlm", "sigma": [r.sigma_t, 0.0, 0.0],
                      "temporal_reach": filters.gaussian_reach(r.sigma_t), "n2s_loss": r.loss,
                      "n2s_loss_frames": r.loss_frames.tolist()})
        den, _ = filters.temporal_nlm(stack, r.sigma_t, r.patch, r.distance, r.h, noise_sd=r.noise_sd,
                                      average=scratch, out=out)
    elif chosen == "gaussian_mix":
        s_t = max(s for s, _ in m.fit["sigmas"])
        attrs.update({"filter": "gaussian_mix", "sigma": [s_t] + [min(s for _, s in m.fit["sigmas"])] * 2,
                      "temporal_reach": m.fit["reach"], "n2s_loss": m.loss,
                      "n2s_loss_frames": m.loss_frames.tolist()})
        den, _ = filters.gaussian_mix_apply(stack, m.fit, tile=tile or filters.blind_tile(n_t), out=out)
    else:
        den = filters.normalised_gaussian3d(stack, *g.sigma, tile=tile or filters.blind_tile(n_t), out=out)
    return den, attrs


def classical_blind(stack, attrs: dict, region=None, scratch=None, out=None):
    """The blind (J-invariant) version of the classical candidate recorded in ``attrs``
    (:func:`classical_candidate`) on ``stack``: the Gaussian's f_J at its sigma, NL-means
    of the averages that leave frame t out, or the mix's cross-fitted f_J.  out: as for
    the filters."""
    if attrs.get("filter") == "nlm":
        n = attrs["nlm"]
        return filters.temporal_nlm(stack, n["sigma_t"], n["patch"], n["distance"], n["h"], noise_sd=n["noise_sd"],
                                    blind=True, average=scratch, out=out, region=region)[0]
    tile = None if out is None else filters.blind_tile(stack.shape[0])
    if attrs.get("filter") == "gaussian_mix":
        return filters.gaussian_mix_apply(stack, attrs["mix"]["fit"], output="jinv", tile=tile, out=out)[0]
    return filters.normalised_gaussian3d(stack, *attrs["sigma"][:2], blind_radius=int(attrs["blind_radius"]),
                                         tile=tile, out=out)


def temporal_reach(ds, method: str, attrs: dict | None = None, n_frames: int | None = None) -> int:
    """Frames on each side of t that ``method``'s output frame t depends on: from the
    stack's attributes where the stage that made it recorded it (``temporal_reach``:
    baselines, classical, infer), else from the config (``filters.temporal_reach``)."""
    if attrs and "temporal_reach" in attrs:
        return int(attrs["temporal_reach"])
    if method == "raw":
        return 0
    if method == "gaussian3d":
        return filters.temporal_reach(method, sigma=tuple(ds.baselines.gaussian3d_sigma))
    if candidate_model(method)[0] == "wcvd":
        return filters.temporal_reach("wcvd", params=model_params(ds, method, n_frames=n_frames))
    if method == "shine":
        return ds.shine.frames // 2
    if method == "classical":
        raise InputError(None, "the classical candidate's reach is recorded in its stack's attributes")
    return filters.temporal_reach(method)


def check_frames(ds, n_frames: int) -> None:
    """InputError unless ``n_frames`` suffice for the input windows of every candidate
    (mirrored about their centre frame, then periodic: halo_t + 1 frames).  Depends on
    the config only, so callers check it before any training (a short movie must not
    cost minutes of training first).  ``auto`` needs no more frames than its candidates:
    :func:`choose` compares them on the movie's own frames (Noise2Self), not on frames
    outside their reach."""
    names = [n for n in ds.candidates if n != "pretrained"]  # a checkpoint is checked by check_fit
    for name in names:
        need = min_frames_for_windows(model_params(ds, name, 1, n_frames=n_frames).halo_t)  # any blind spot
        if n_frames < need:
            raise InputError(None, f"has {n_frames} frames; {name} needs at least {need}")


#: ``model: auto``'s ensemble (:func:`ensemble`) needs at least this many sampled pixels of each
#: frame parity for its linear mix (cross-fitted least squares); its MLP gate needs
#: ``train.GATE_MIN_PIXELS`` (the same as the Gaussian mix's gate).
ENSEMBLE_MIN_PIXELS = 256

#: Pixels the ensemble's gate is fitted on, at most (~0.7 GB while fitting): 4x the mix's
#: (filters.MIX_GATE_SAMPLES), since it is fitted once per movie, not per tile -- on a
#: 200 x 256² counting movie 2^21 random pixels gave 29.70 dB, 2^23 29.73 (the members 29.58 at best).
ENSEMBLE_SAMPLES = 2**23


def ensemble_structure(features: np.ndarray) -> np.ndarray:
    """How much the ensemble's members disagree at n pixels: the variance of their blind
    outputs ``features`` (n, K) across the K members, (n,) float64 (data units²).  Read
    only at the pixel itself, so blind wherever the members are."""
    return np.var(np.asarray(features, dtype=np.float64), axis=1)


class Ensembled(filters.FrameMap):
    """A lazy (T, Y, X) float32 stack: the ensemble's blind output, the gate
    (``filters.mix_gate_predict``) of its members' blind stacks at each pixel, frame t with
    the weights fitted on the frames of the other parity.  ``members``: (T, Y, X) stacks,
    NumPy or lazy (Zarr, FrameMap), read frame block by frame block."""

    def __init__(self, members: list, gate: dict):
        super().__init__(members[0], None)
        self.members, self.gate = list(members), gate

    def _compute(self, a: int, b: int) -> np.ndarray:
        blocks = [np.asarray(m[a:b], dtype=np.float32) for m in self.members]
        out = np.empty((b - a,) + self.shape[1:], dtype=np.float32)
        for i in range(b - a):
            f = np.stack([blk[i].ravel() for blk in blocks], 1)
            out[i] = filters.mix_gate_predict(self.gate, (a + i) % 2, f, ensemble_structure(f)).reshape(self.shape[1:])
        return out


def ensemble(blinds: dict, noisy, *, region=None, samples: int = ENSEMBLE_SAMPLES,
             threads: int | None = None) -> tuple[dict, Ensembled | None]:
    """``model: auto``'s ensemble: the candidates' blind outputs combined pixel by pixel.

    blinds: name -> (T, Y, X) blind (J-invariant) output of each candidate the selection
        trusts (blind to the whole noise-correlated window: the networks before their
        low-pass and own pixel, the classical filter's :func:`classical_blind`), NumPy or
        lazy; noisy: the movie they denoised (the aligned one), same shape and units;
        region: (slice_y, slice_x) of the pixels fitted and scored (the canvas every frame
        covers), None: all.
    The output at (t, p) is sum_k (a_k + g_k(x)) f_k(t, p) + c: the gate of the Gaussian
    mix (``models.MixGate``, ``train.fit_mix_gate``) with the members' outputs f_k as its
    dictionary and their disagreement (:func:`ensemble_structure`) as its structure map --
    an MLP where each frame parity has ``train.GATE_MIN_PIXELS`` sampled pixels, the
    linear mix (a, c) alone below.  Fitted on ~``samples`` pixels (a grid fixed in frame
    coordinates, every frame), cross-fitted: frame t takes the weights fitted on the frames
    of the other parity, and each is kept at its lowest loss on the held-out parity.  Every
    input at (t, p) is blind to y(t, p) and its correlated neighbours, and the gate reads
    them at (t, p) only, so the ensemble is blind with any weights and its loss
    (``metrics.self_supervised_loss``) is unbiased: MSE + noise variance, comparable with
    the members'.  Members disagree where each errs differently (a network's texture, a
    temporal average's motion blur); the gate learns whom to trust there.

    Returns (record, lazy blind output or None): record {'members', 'n2s_loss',
    'n2s_loss_frames', 'kind' ('gated' | 'linear'), 'steps', 'pixels', 'gate'} or
    {'members', 'skipped': why} (no member, or fewer than ``ENSEMBLE_MIN_PIXELS``).  One
    member: its calibration a f + c (what is left when the selection trusts one)."""
    from . import train  # torch: only where an ensemble is fitted

    names = list(blinds)
    if not names:
        return {"members": names, "skipped": "no candidate"}, None
    stacks = [blinds[n] for n in names]
    shape = tuple(int(n) for n in noisy.shape)
    for n, st in zip(names, stacks):
        if tuple(int(v) for v in st.shape) != shape:
            raise InputError(None, f"the ensemble's member {n} has shape {tuple(st.shape)}, the movie {shape}")
    cut = tuple(region) if region is not None else (slice(None), slice(None))
    ny, nx = (len(range(*c.indices(n))) for c, n in zip(cut, shape[1:]))
    ratio = shape[0] * ny * nx / max(1, samples)  # a grid of sy x sx px cells, one pixel each
    sy = max(1, int(np.sqrt(ratio)))
    sx = max(1, int(np.ceil(ratio / sy)))
    feats, target, frame = [], [], []
    for t in range(shape[0]):
        f = np.stack([np.asarray(st[t], dtype=np.float32)[cut][::sy, ::sx].ravel() for st in stacks], 1)
        feats.append(f)
        target.append(np.asarray(noisy[t], dtype=np.float32)[cut][::sy, ::sx].ravel())
        frame.append(np.full(len(f), t))
    feats = np.concatenate(feats)
    picked = {"features": feats, "structure": ensemble_structure(feats), "target": np.concatenate(target),
              "frame": np.concatenate(frame)}
    counts = [int(np.sum(picked["frame"] % 2 == p)) for p in (0, 1)]
    if min(counts) < ENSEMBLE_MIN_PIXELS:
        return {"members": names, "skipped": f"{min(counts)} sampled pixels in a frame parity "
                                             f"(< {ENSEMBLE_MIN_PIXELS})"}, None
    gated = min(counts) >= train.GATE_MIN_PIXELS
    gate = train.fit_mix_gate(picked, steps=train.GATE_STEPS if gated else 0, threads=threads,
                              min_pixels=ENSEMBLE_MIN_PIXELS)
    blind = Ensembled(stacks, gate)
    frames = metrics.self_supervised_loss_per_frame(blind, noisy, region)
    return {"members": names, "n2s_loss": float(frames.mean()), "n2s_loss_frames": frames.tolist(),
            "kind": "gated" if gated else "linear", "steps": gate["steps"], "pixels": counts, "gate": gate}, blind


def ensemble_output(blind: Ensembled, noisy, record: dict, region=None) -> tuple:
    """The ensemble's output: its blind output ``blind`` (:func:`ensemble`) with its own
    pixel given back by the networks' rule (:func:`unblind_weight` from ``record``'s loss,
    :func:`with_own_pixel`; lazy).  Returns (stack, the weight's record)."""
    own = unblind_weight(blind, noisy, record["n2s_loss"], region)
    return with_own_pixel(blind, noisy, own["weight"]), own


def prefer_ensemble(choice: dict, record: dict, frame_losses: dict) -> dict:
    """:func:`choose`'s record with the ensemble (:func:`ensemble`'s ``record``) taken in
    its chosen candidate's place only when its loss is lower by ``metrics.SELECT_MIN_Z``
    standard errors of the per-frame difference (the rule every candidate passes: a tie
    keeps the single candidate, the simpler output).  ``frame_losses``: name -> per-frame
    losses of the candidates.  The test is recorded under 'ensemble'."""
    choice = dict(choice)
    if "n2s_loss" not in record:
        choice["ensemble"] = {k: v for k, v in record.items() if k != "gate"}
        return choice
    base = choice["chosen"]
    pick = metrics.select_model({base: float(np.mean(frame_losses[base])), "ensemble": record["n2s_loss"]},
                                {base: frame_losses[base], "ensemble": record["n2s_loss_frames"]}, fallback=base)
    chosen = pick["chosen"] == "ensemble"
    choice["ensemble"] = {"members": record["members"], "n2s_loss": record["n2s_loss"], "kind": record["kind"],
                          "versus": base, "z": (pick.get("significance") or {}).get("z"), "chosen": chosen}
    if "loss" in choice:
        choice["loss"] = {**choice["loss"], "ensemble": record["n2s_loss"]}
    if chosen:
        choice["chosen"] = "ensemble"
    return choice


def choose(losses: dict, ds, blind_radii: dict | None = None, noise_radius: int | None = None,
           frame_losses: dict | None = None) -> dict:
    """Which candidate denoises the dataset.  One candidate: it.  Several (``auto``): the
    lowest self-supervised loss of its J-invariant output (``metrics.select_model``;
    ``losses``: name -> ``metrics.self_supervised_loss``, all on the same pixels).

    The loss is unbiased only for a candidate blind to the whole noise-correlated window:
    one whose blind radius (``blind_radii``: name -> radius in px, e.g. a configured
    ``model.blindspot`` or ``shine.blindspot`` smaller than measured, or a pretrained
    model) is below ``noise_radius`` (the noise stage's blindspot // 2) copies part of the
    noise and scores too low, so it is left out of the comparison (recorded under
    'left_out') unless no candidate is left.  ``frame_losses``: name -> per-frame losses,
    for the significance test against the tuned Gaussian (``metrics.select_model``).
    Returns the choice record."""
    names = list(losses)
    if len(names) == 1:
        return {"chosen": names[0], "rule": f"configured (model: {ds.model.name})"}
    left_out = {}
    if blind_radii and noise_radius is not None:
        left_out = {m: f"blind radius {blind_radii[m]} px < the noise's {noise_radius} px: its loss is biased low"
                    for m in names if m in blind_radii and int(blind_radii[m]) < int(noise_radius)}
    if len(left_out) == len(names):
        left_out = {}
    choice = metrics.select_model({m: v for m, v in losses.items() if m not in left_out}, frame_losses)
    return {**choice, "left_out": left_out} if left_out else choice


#: The canvas fill of :func:`align_on_canvas` is the median of at most this many pixels (a
#: strided sample, read frame by frame; the exact median of movies up to this size).
FILL_SAMPLES = 2**22

#: ``emdenoise denoise`` keeps movies up to this many bytes of float32 frames in memory
#: (the chain holds several copies: input, canvas, one output per candidate); larger ones
#: go through Zarr stores in a work folder (:func:`denoise_stack` ``workdir``).
IN_MEMORY_BYTES = 128 * 2**20


def _tiled_writer(path, shape, tile: int, **kw) -> io.ZarrStackWriter:
    """An OME-Zarr writer whose shards are spatial tiles of all frames: what the tiled
    Gaussians (``filters.blind_gaussian3d``, ``normalised_gaussian3d``) fill, tile by tile."""
    n_t, ny, nx = shape
    ty, tx = min(tile, ny), min(tile, nx)
    return io.ZarrStackWriter(path, shape, chunks=(1, ty, tx), shards=(n_t, ty, tx), **kw)


class Reblinded(filters.FrameMap):
    """A lazy (T, Y, X) stack ``(out - w noisy) / (1 - w)``: the blind output back from one
    that gave its own pixel back with weight w (:func:`with_own_pixel`; float32)."""

    def __init__(self, out, noisy, weight: float):
        super().__init__(out, None)
        self.noisy, self.weight = noisy, float(weight)

    def _compute(self, a: int, b: int) -> np.ndarray:
        f = np.asarray(self.stack[a:b], dtype=np.float64)
        y = np.asarray(self.noisy[a:b], dtype=np.float64)
        return ((f - self.weight * y) / (1.0 - self.weight)).astype(np.float32)


def classical_blind_stack(stack, attrs: dict, workdir=None, output=None):
    """:func:`classical_blind` of ``stack``: in memory (``workdir`` None) or into a Zarr
    store there, by the tiles of the classical filter (lazy, read back).  A gated mix
    (``pipeline.gate_mix``) writes its cross-fitted blind output with the own pixel given
    back, so from its ``output`` the blind one is recovered without a pass of the filter
    (:class:`Reblinded`; float32 rounding divided by 1 - w)."""
    fit = (attrs.get("mix") or {}).get("fit") or {}
    if output is not None and attrs.get("filter") == "gaussian_mix" and "gate" in fit:
        return Reblinded(output, stack, fit["own_pixel"]["weight"])
    if workdir is None:
        return classical_blind(stack, attrs)
    path = _work_path(workdir, "classical_blind")
    with (_scratch(path, stack.shape) as scratch,
          _tiled_writer(path, tuple(stack.shape), filters.blind_tile(int(stack.shape[0])), pyramid=False) as w):
        classical_blind(stack, attrs, scratch=scratch, out=w.array)
    return io.read_zarr(path)[0]


def classical_zarr(stack, blind_radius: int, dst, *, attrs: dict | None = None, pixel_size=None,
                   pyramid: bool = True, threads: int | None = None, max_reach: int | None = None) -> dict:
    """:func:`classical_candidate` from a lazy (T, Y, X) stack into an OME-Zarr at ``dst``
    (sharded by the tuning's tiles, ``filters.blind_tile``), at memory bounded by
    ``filters.TILE_BUDGET``; returns its record (also stored with ``attrs``).  threads: for
    the mix's gate (:func:`gate_mix`); max_reach: :func:`reach_limit`'s."""
    tile = filters.blind_tile(stack.shape[0])
    with (_scratch(dst, stack.shape) as scratch,
          _tiled_writer(dst, tuple(stack.shape), tile, pixel_size=pixel_size, attrs=attrs, pyramid=pyramid) as w):
        _, record = classical_candidate(stack, blind_radius, tile=tile, out=w.array, scratch=scratch,
                                        threads=threads, max_reach=max_reach)
        w.update_attrs({**(attrs or {}), **record})
    return record


def _scratch(near, shape):
    """A Zarr scratch array for NL-means' temporal averages (:func:`io.scratch_array`),
    chunked like the tiles that fill it (``filters.normalised_gaussian3d``, sigma_yx 0)."""
    tile = filters.average_tile(int(shape[0]))
    return io.scratch_array(near, shape, chunks=(1, min(tile, int(shape[1])), min(tile, int(shape[2]))))


def _canvas_blocks(stack, offsets, canvas_shape, fill: float, frames: int):
    """(a, block) pairs of the drift canvas: frame t of ``stack`` placed at ``offsets[t]``
    on a (Y', X') field of ``fill``, ``frames`` frames per block."""
    t, y, x = stack.shape
    for a in range(0, t, frames):
        src = np.asarray(stack[a:a + frames], dtype=np.float32)
        block = np.full((len(src),) + tuple(canvas_shape[1:]), fill, dtype=np.float32)
        for i, (oy, ox) in enumerate(offsets[a:a + len(src)]):
            block[i, oy:oy + y, ox:ox + x] = src[i]
        yield a, block


def align_on_canvas(stack, ds, workdir=None):
    """Whole-pixel drift correction that keeps every input pixel (for ``emdenoise denoise``).

    Drift is measured as in the workflow (``ds.prefilter`` then phase correlation,
    ``ds.drift.upsample``) and undone by whole pixels only (no interpolation: the noise
    stays independent).  Instead of cropping to the region every frame covers (the
    workflow's aligned.zarr), each frame t is placed at offset ``o_t = d_max - d_t`` on a
    canvas of (Y + d_max - d_min, X + ...) px filled with the stack's median (of at most
    ``FILL_SAMPLES`` pixels), so that the output can be shifted back onto the input's grid
    for every pixel.
    The border: pixels within the drift range of a frame edge have fewer real temporal
    neighbours (the fill carries no noise and no signal), so they are denoised mostly
    from their own frame; the selection between candidates uses only the region every
    frame covers.  Returns (canvas (T, Y', X') float32, record with 'offsets' (T, 2) int,
    'measured' (T, 2) px, 'common' [y0, y1, x0, x1] on the canvas, 'still': the stillness
    test of each axis, :func:`drift.still_axes`: a still axis is not shifted).
    ``workdir``: None (NumPy in memory) or a folder: ``stack`` is then a Zarr array read
    lazily, the pre-filtered movie and the canvas are Zarr stores there
    (``prefiltered.zarr``, ``canvas.zarr``) and the canvas comes back as a lazy array:
    memory does not grow with T (same values).
    """
    pf = ds.prefilter
    kw = dict(method=pf.method, sigma=pf.sigma, wcid_params=ds.model.wcvd_params(dims=2),
              train_params=dataclasses.replace(ds.train, epochs=pf.epochs))
    if workdir is None:
        pre = prefilter(stack, **kw)
    else:
        prefilter_zarr(io.zarr_array_path(stack), _work_path(workdir, "prefiltered"), **kw)
        pre, _ = io.read_zarr(_work_path(workdir, "prefiltered"))
    measured, check = drift.measure_drift(pre, upsample=ds.drift.upsample, min_peak_z=ds.drift.min_peak_z,
                                          return_info=True)
    del pre
    d = drift.whole_pixel_shifts(measured)
    t, y, x = stack.shape
    off = d.max(0)[None, :] - d                       # (T, 2) offsets of each frame on the canvas
    span = d.max(0) - d.min(0)
    shape = (t, y + int(span[0]), x + int(span[1]))
    size = t * y * x
    fill = float(np.median(io.strided_sample(stack, -(-size // FILL_SAMPLES))))
    k = filters.block_frames(shape[1:])
    if workdir is None:
        canvas = np.empty(shape, dtype=np.float32)
        for a, block in _canvas_blocks(stack, off, shape, fill, k):
            canvas[a:a + len(block)] = block
    else:
        io.write_zarr_blocks(_work_path(workdir, "canvas"), shape, _canvas_blocks(stack, off, shape, fill, k), k,
                             pyramid=False)
        canvas, _ = io.read_zarr(_work_path(workdir, "canvas"))
    common = [int(span[0]), int(y), int(span[1]), int(x)]  # covered by every frame
    return canvas, {"measured": measured.tolist(), "offsets": off.tolist(), "common": common,
                    "max_shift_px": float(np.abs(measured).max()), "check": check,
                    "still": drift.still_axes(measured)}


class OnInputGrid(filters.FrameMap):
    """A lazy (T, Y, X) view of a drift canvas shifted back onto the input grid: frame t
    is canvas frame t cropped at ``offsets[t]`` (:func:`from_canvas`); read frame by frame."""

    def __init__(self, canvas, offsets, shape):
        super().__init__(canvas, None)
        self.offsets = [tuple(int(v) for v in o) for o in offsets]
        self.shape = tuple(int(n) for n in shape)

    def _compute(self, a: int, b: int) -> np.ndarray:
        _, y, x = self.shape
        block = np.asarray(self.stack[a:b], dtype=np.float32)
        out = np.empty((b - a, y, x), dtype=np.float32)
        for i, (oy, ox) in enumerate(self.offsets[a:b]):
            out[i] = block[i, oy:oy + y, ox:ox + x]
        return out


def from_canvas(canvas, record: dict, shape):
    """Shift a (T, Y', X') canvas back onto the input grid (T, Y, X): the inverse of
    :func:`align_on_canvas`.  A NumPy canvas gives a NumPy array, a lazy one (Zarr,
    ``filters.FrameMap``) a lazy :class:`OnInputGrid`."""
    view = OnInputGrid(canvas, record["offsets"], shape)
    return view[:] if isinstance(canvas, np.ndarray) else view


def _work_path(workdir, name: str) -> Path:
    return Path(workdir) / f"{name}.zarr"


def denoise_stack(stack, ds, *, train_overrides: dict | None = None, device: str = "auto",
                  progress: Callable[[str, dict], None] | None = None, align: bool | None = None,
                  pixel_size: float | None = None, workdir=None) -> dict:
    """The whole chain on one (T, Y, X) stack in data units.

    align: whole-pixel drift correction before denoising and back after
        (:func:`align_on_canvas`), so the networks see a still scene while the output
        stays registered to the input; None = ``ds.drift_enabled`` (movies yes, tilt
        series no).
    ``ds.model.checkpoint`` set: that trained model is applied (candidate 'pretrained',
    no training), after :func:`check_fit` (its sentences in 'warnings').
    progress: called with (candidate, row): after every training epoch (the training log
        row, ``stage`` 'train', ``of`` the epochs) and every inference batch (``stage``
        'infer', ``done`` frames of ``of``; once at the end with ``workdir``).
    workdir: None -- ``stack`` is made a float32 NumPy array and every intermediate is in
        memory (several copies of the movie); a folder -- ``stack`` is a float32 Zarr
        array (``io.read_zarr``) and every intermediate a Zarr store there: the
        pre-filter and the canvas (:func:`align_on_canvas`), each network's blind output
        (``chunked.infer_zarr``, by tiles), the tuned Gaussian (by tiles); training reads
        crops above ``train.IN_MEMORY_BYTES``, the low-pass and the shift back are lazy
        (``filters.FrameMap``), the losses read frame by frame.  Memory then does not grow
        with the movie; the values are those of the in-memory chain (CPU).
    Returns {'chosen', 'output' (T, Y, X) float32 in data units, 'outputs' per candidate
    ('classical' and, with ``model.ensemble``, 'ensemble' too for ``auto``: :func:`ensemble`,
    :func:`prefer_ensemble`; on the input grid), 'checkpoints' per trained model,
    'choice' (record), 'blindspot' (noise stage result), 'drift' (record or None),
    'warnings' (list of str)}.  With ``workdir`` the outputs are lazy arrays reading
    from its stores: write them before the folder is removed.
    """
    from . import chunked, infer, train
    from .checkpoint import for_stack, load_checkpoint, model_from_checkpoint

    if workdir is None:
        stack = np.asarray(stack, dtype=np.float32)
    check_frames(ds, stack.shape[0])  # before any training
    shape = tuple(int(n) for n in stack.shape)
    record = None
    if (ds.drift_enabled if align is None else align) and shape[0] >= 2:
        canvas, record = align_on_canvas(stack, ds, workdir)
        if any(v for row in record["offsets"] for v in row):
            stack = canvas
        else:
            record = {**record, "offsets": None}  # no whole-pixel drift: nothing to undo
    spot = noise.estimate_blindspot(stack, max_lag=ds.noise.max_lag, threshold=ds.noise.threshold,
                                    estimate=ds.noise.estimate)
    shifted = record is not None and record["offsets"] is not None
    # the selection compares losses on the region every frame covers (the canvas fill has no noise)
    region = (slice(*record["common"][:2]), slice(*record["common"][2:])) if shifted else None

    frame_losses = {}

    def loss(blind, name: str) -> float:
        frame_losses[name] = metrics.self_supervised_loss_per_frame(blind, stack, region)
        return float(np.mean(frame_losses[name]))  # = metrics.self_supervised_loss

    outputs, ckpts, losses, warnings, blinds = {}, {}, {}, [], {}
    for name in ds.candidates:
        if name == "pretrained":
            model, ckpt = load_checkpoint(ds.model.checkpoint, device=device)
            ckpt = for_stack(ckpt, stack)  # a model of several datasets: this stack's own normalisation
            warnings += check_fit(ckpt, stack, pixel_size, blindspot=spot["blindspot"])
        else:
            cb = (lambda row, n=name: progress(n, {**row, "stage": "train"})) if progress else None
            small = workdir is not None and 4 * np.prod(shape, dtype=np.int64) <= train.IN_MEMORY_BYTES
            ckpt = train_candidate(np.asarray(stack[:], dtype=np.float32) if small else stack, ds, name,
                                   spot["blindspot"], train_overrides=train_overrides,
                                   progress=cb, data_info={"pixel_size": pixel_size})
            model = model_from_checkpoint(ckpt, device=device)
        done = ((lambda d, t, n=name: progress(n, {"stage": "infer", "done": d, "of": t})) if progress else None)
        if workdir is None:
            out = infer.denoise(model, ckpt, stack, device=device, progress=done, precision=ds.infer.precision)
        else:  # by tiles, Zarr to Zarr
            dst = _work_path(workdir, f"{name}_blind")
            chunked.infer_zarr(model, ckpt, io.zarr_array_path(stack), dst, device=device,
                               precision=ds.infer.precision, progress=False)
            out, _ = io.read_zarr(dst)
            if done:
                done(shape[0], shape[0])
        losses[name] = loss(out, name)  # the network's own (blind) output, before any low-pass
        blinds[name] = out
        outputs[name], _ = postprocess(out, ds, name, stack, model.params.halo_t, model_kind=ckpt.get("model"),
                                       ks_max=max(ckpt["model_params"].get("ks", [7])), loss=losses[name],
                                       region=region)
        ckpts[name] = ckpt
    if "classical" in ds.select_candidates:
        b = spot["blindspot"] // 2
        lim = reach_limit(ds.model.max_reach, shape[0])
        if workdir is None:
            outputs["classical"], attrs = classical_candidate(stack, b, max_reach=lim)
        else:
            attrs = classical_zarr(stack, b, _work_path(workdir, "classical"), pyramid=False, max_reach=lim)
            outputs["classical"], _ = io.read_zarr(_work_path(workdir, "classical"))
        if shifted or "ensemble" in ds.select_candidates:  # the blind version (a pass, unless a gated mix)
            blinds["classical"] = classical_blind_stack(stack, attrs, workdir, outputs["classical"])
        if not shifted:
            losses["classical"] = attrs["n2s_loss"]
            frame_losses["classical"] = attrs["n2s_loss_frames"]
        else:
            losses["classical"] = loss(blinds["classical"], "classical")
    radii = {m: int(c.get("blind_radius", 0)) for m, c in ckpts.items()}
    choice = choose(losses, ds, radii, spot["blindspot"] // 2, frame_losses)
    if "ensemble" in ds.select_candidates:  # the candidates the selection trusts, combined
        ens, blind = ensemble({m: blinds[m] for m in losses if m not in choice.get("left_out", {})}, stack,
                              region=region)
        choice = prefer_ensemble(choice, ens, frame_losses)
        if blind is not None:
            outputs["ensemble"], own = ensemble_output(blind, stack, ens, region)
            if workdir is None:
                outputs["ensemble"] = np.asarray(outputs["ensemble"], dtype=np.float32)
            choice["ensemble"]["own_pixel"] = own["weight"]
    if shifted:  # back onto the input grid
        outputs = {m: from_canvas(o, record, shape) for m, o in outputs.items()}
    if choice["chosen"] == "classical":
        choice.update(sigma=attrs["sigma"], filter=attrs["filter"])
        choice["nlm"] = {k: v for k, v in attrs["nlm"].items() if k != "scores"}  # tried or not, chosen or not
        choice["mix"] = attrs["mix"]
    return {"chosen": choice["chosen"], "output": outputs[choice["chosen"]], "outputs": outputs,
            "checkpoints": ckpts, "choice": choice, "blindspot": spot, "drift": record, "warnings": warnings}
