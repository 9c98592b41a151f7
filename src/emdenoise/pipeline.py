"""The denoising chain shared by ``emdenoise denoise`` and the workflow's scripts.

train candidates -> infer -> post-process -> choose.  Each step is one function here;
the workflow runs them as separate rules (``train``, ``infer``, ``lowpass``, ``select``),
the CLI calls :func:`denoise_stack`, which runs the same functions in sequence, so the
two paths cannot disagree on what a model's method includes (e.g. the FFT low-pass is
part of WCVD's method, ``models.WCVD.lowpass``) or on how ``auto`` chooses.
The WCID pre-filter used only to measure drift is here too: it trains a model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import filters, infer, metrics, noise
from .checkpoint import model_from_checkpoint
from .config import ModelConfig, TrainParams
from .errors import InputError
from .models import model_class
from .train import train_model

__all__ = ["prefilter", "model_params", "train_candidate", "postprocess", "choose", "check_frames",
           "denoise_stack"]


def prefilter(stack: np.ndarray, method: str = "wcid", sigma: float = 1.5, *,
              wcid_params=None, train_params: TrainParams | None = None) -> np.ndarray:
    """Pre-denoise a (T, Y, X) stack for drift measurement only (never for the output).

    method: 'wcid' (a WCID model, WCVD paper section 2.1, trained on this very stack
    with ``wcid_params`` / ``train_params``), 'gaussian2d' (per frame, sigma px) or
    'none'.  Per-frame filters on purpose: a temporal filter would smear the very motion
    that drift correction measures.  Returns float32 (T, Y, X).
    """
    if method == "gaussian2d":
        return filters.gaussian2d(stack, sigma)
    if method == "none":
        return np.asarray(stack, dtype=np.float32)
    if method == "wcid":
        params = wcid_params or ModelConfig().wcvd_params(dims=2)
        ckpt = train_model(np.asarray(stack, dtype=np.float32), params, train_params or TrainParams())
        model = model_from_checkpoint(ckpt, device=ckpt["device"])
        return infer.denoise(model, ckpt, stack, device=ckpt["device"])
    raise ValueError(f"unknown prefilter method {method!r}")


def model_params(ds, name: str, blindspot: int | None = None):
    """Architecture of candidate ``name`` ('wcvd' | 'shine') for dataset config ``ds``;
    SHINE's blind spot comes from the noise stage (``blindspot``) unless the config
    fixes it."""
    if name == "shine":
        if ds.shine.blindspot is None and blindspot is None:
            raise InputError(None, "SHINE needs the blind-spot size from the noise stage")
        return ds.shine.params(blindspot or ds.shine.blindspot)
    if name == "wcvd":
        return ds.model.wcvd_params()
    raise InputError(None, f"unknown candidate model {name!r}")


def train_candidate(stack: np.ndarray, ds, name: str, blindspot: int | None = None, *,
                    train_overrides: dict | None = None, log_csv=None,
                    progress: Callable[[dict], None] | None = None) -> dict:
    """Train candidate ``name`` on a (T, Y, X) stack (data units); returns its checkpoint.
    ``train_overrides``: TrainParams fields replacing the config's (e.g. device, epochs)."""
    tp = ds.train_params(name)
    if train_overrides:
        tp = dataclasses.replace(tp, **{k: v for k, v in train_overrides.items() if v is not None})
    ckpt = train_model(stack, model_params(ds, name, blindspot), tp, log_csv=log_csv, progress=progress)
    ckpt["dataset"] = ds.name
    return ckpt


def postprocess(denoised: np.ndarray, ds, name: str) -> tuple[np.ndarray, dict]:
    """The post-processing of a model's method: the FFT low-pass for models whose method
    includes it (WCVD), nothing otherwise.  Returns (stack, record of what was done)."""
    lp = ds.lowpass
    applied = bool(lp.enabled and model_class(name).lowpass)
    record = {"applied": applied, "diameter": lp.diameter, "pad": lp.pad}
    if not applied:
        return np.asarray(denoised, dtype=np.float32), record
    out = filters.fft_lowpass(denoised, diameter=lp.diameter, ks_max=max(ds.model.ks), pad=lp.pad,
                              edge_width=lp.edge_width)
    return out, record


def _umse_radius(ds, reaches: dict | None) -> int:
    """Temporal radius of the uMSE comparison: outside every candidate's reach."""
    return max(2, ds.metrics.temporal_radius, *(reaches or {}).values())


def check_frames(ds, n_frames: int) -> None:
    """InputError unless ``n_frames`` suffice for the chain: one input window of every
    candidate and, with several candidates (``auto``), the 2r + 4 frames of the uMSE
    comparison in :func:`choose`.  Depends on the config only, so callers check it
    before any training (a short movie must not cost minutes of training first)."""
    reaches = {name: model_params(ds, name, 1).halo_t for name in ds.candidates}  # halo_t: any blind spot
    for name, h in reaches.items():
        if n_frames < 2 * h + 1:
            raise InputError(None, f"has {n_frames} frames; {name} needs at least {2 * h + 1}")
    if len(reaches) > 1:
        need = 2 * _umse_radius(ds, reaches) + 4
        if n_frames < need:
            raise InputError(None, f"model: auto compares candidates by uMSE, which needs at least {need} "
                                   f"frames; this movie has {n_frames}: choose one model")


def choose(outputs: dict, noisy: np.ndarray, ds, reaches: dict | None = None) -> dict:
    """Which candidate denoises the dataset.  One candidate: it.  Several (``auto``): the
    lowest uMSE against the noisy movie (``metrics.select_model``) at one temporal
    radius outside every candidate's reach.  Returns the choice record."""
    names = list(outputs)
    if len(names) == 1:
        return {"chosen": names[0], "rule": f"configured (model: {ds.model.name})"}
    r = _umse_radius(ds, reaches)
    if noisy.shape[0] < 2 * r + 4:
        raise InputError(None, f"model: auto compares candidates by uMSE, which needs at least {2 * r + 4} "
                               f"frames; this movie has {noisy.shape[0]}: choose one model")
    return metrics.select_model(outputs, noisy, temporal_radius=r)


def denoise_stack(stack: np.ndarray, ds, *, train_overrides: dict | None = None, device: str = "auto",
                  progress: Callable[[str, dict], None] | None = None) -> dict:
    """The whole chain on one (T, Y, X) stack in data units (no drift correction).

    Returns {'chosen', 'output' (T, Y, X) float32 in data units, 'outputs' per candidate,
    'checkpoints' per candidate, 'choice' (record), 'blindspot' (noise stage result)}.
    """
    stack = np.asarray(stack, dtype=np.float32)
    check_frames(ds, stack.shape[0])  # before training: auto needs more frames than one model
    spot = noise.estimate_blindspot(stack, max_lag=ds.noise.max_lag, threshold=ds.noise.threshold,
                                    estimate=ds.noise.estimate) if "shine" in ds.candidates else None
    outputs, ckpts, reaches = {}, {}, {}
    for name in ds.candidates:
        cb = (lambda row, n=name: progress(n, row)) if progress else None
        ckpt = train_candidate(stack, ds, name, spot["blindspot"] if spot else None,
                               train_overrides=train_overrides, progress=cb)
        model = model_from_checkpoint(ckpt, device=device)
        out = infer.denoise(model, ckpt, stack, device=device)
        outputs[name], _ = postprocess(out, ds, name)
        ckpts[name], reaches[name] = ckpt, model.params.halo_t
    choice = choose(outputs, stack, ds, reaches)
    return {"chosen": choice["chosen"], "output": outputs[choice["chosen"]], "outputs": outputs,
            "checkpoints": ckpts, "choice": choice, "blindspot": spot}
