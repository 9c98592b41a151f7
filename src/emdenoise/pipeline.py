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
from .models import model_class, resolve_device
from .train import train_model

__all__ = ["prefilter", "model_params", "train_candidate", "postprocess", "classical_candidate",
           "temporal_reach", "choose", "denoise_stack"]


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


def on_gpu(ds, name: str, device: str | None = None) -> bool:
    """Whether candidate ``name`` trains on CUDA (sizes SHINE when ``shine.size: auto``)."""
    return resolve_device(device or ds.train.device).type == "cuda"


def model_params(ds, name: str, blindspot: int | None = None, device: str | None = None):
    """Architecture of candidate ``name`` ('wcvd' | 'shine') for dataset config ``ds``;
    SHINE's blind spot comes from the noise stage (``blindspot``) unless the config
    fixes it, and its size from ``shine.size`` and the training device."""
    if name == "shine":
        if ds.shine.blindspot is None and blindspot is None:
            raise InputError(None, "SHINE needs the blind-spot size from the noise stage")
        return ds.shine.params(blindspot or ds.shine.blindspot, gpu=on_gpu(ds, name, device))
    if name == "wcvd":
        return ds.model.wcvd_params()
    raise InputError(None, f"unknown candidate model {name!r}")


def train_candidate(stack: np.ndarray, ds, name: str, blindspot: int | None = None, *,
                    train_overrides: dict | None = None, log_csv=None,
                    progress: Callable[[dict], None] | None = None) -> dict:
    """Train candidate ``name`` on a (T, Y, X) stack (data units); returns its checkpoint.
    ``train_overrides``: TrainParams fields replacing the config's (e.g. device, epochs)."""
    device = (train_overrides or {}).get("device")
    gpu = on_gpu(ds, name, device)
    tp = ds.train_params(name, gpu=gpu)
    if train_overrides:
        tp = dataclasses.replace(tp, **{k: v for k, v in train_overrides.items() if v is not None})
    ckpt = train_model(stack, model_params(ds, name, blindspot, device), tp, log_csv=log_csv, progress=progress)
    ckpt["dataset"] = ds.name
    if name == "shine":  # which size ran, and why (recorded in provenance and the report)
        ckpt["shine_size"] = {"setting": ds.shine.size, "used": ds.shine.resolved_size(gpu), "gpu": gpu}
    return ckpt


def postprocess(denoised: np.ndarray, ds, name: str) -> tuple[np.ndarray, dict]:
    """The post-processing of a model's method: the FFT low-pass for models whose method
    includes it (WCVD), nothing otherwise.  Returns (stack, record of what was done)."""
    if not (model_class(name).lowpass and ds.lowpass.enabled):  # SHINE: reads no lowpass setting
        return np.asarray(denoised, dtype=np.float32), {"applied": False}
    lp = ds.lowpass
    record = {"applied": True, "diameter": lp.diameter, "pad": lp.pad}
    out = filters.fft_lowpass(denoised, diameter=lp.diameter, ks_max=max(ds.model.ks), pad=lp.pad,
                              edge_width=lp.edge_width)
    return out, record


def classical_candidate(stack: np.ndarray, blind_radius: int) -> tuple[np.ndarray, dict]:
    """The Gaussian 3D tuned on the movie itself (``filters.blind_gaussian3d``, Noise2Self
    with the noise stage's blind spot): (T, Y, X) float32 and the attributes recording
    sigma (t, y, x), temporal reach, blind radius and the score table."""
    res = filters.blind_gaussian3d(np.asarray(stack, dtype=np.float32), int(blind_radius))
    scores = [{k: None if v != v else float(v) for k, v in row.items()}  # NaN -> null (JSON)
              for row in res.scores.to_dict(orient="records")]
    attrs = {"method": "classical", "filter": "gaussian3d blind-tuned (Noise2Self)",
             "sigma": [res.sigma[0], res.sigma[1], res.sigma[1]], "temporal_reach": res.reach,
             "blind_radius": int(blind_radius), "output": res.output, "scores": scores}
    return res.denoised, attrs


def temporal_reach(ds, method: str, attrs: dict | None = None) -> int:
    """Frames on each side of t that ``method``'s output frame t depends on: from the
    stack's attributes where the stage that made it recorded it (``temporal_reach``:
    baselines, classical, infer), else from the config (``filters.temporal_reach``)."""
    if attrs and "temporal_reach" in attrs:
        return int(attrs["temporal_reach"])
    if method == "raw":
        return 0
    if method == "gaussian3d":
        return filters.temporal_reach(method, sigma=tuple(ds.baselines.gaussian3d_sigma))
    if method == "wcvd":
        return filters.temporal_reach(method, params=ds.model.wcvd_params())
    if method == "shine":
        return ds.shine.frames // 2
    if method == "classical":
        raise InputError(None, "the classical candidate's reach is recorded in its stack's attributes")
    return filters.temporal_reach(method)


def choose(outputs: dict, noisy: np.ndarray, ds, reaches: dict) -> dict:
    """Which candidate denoises the dataset.  One candidate: it.  Several (``auto``): the
    lowest uMSE against the noisy movie (``metrics.select_model``) at one temporal
    radius outside every candidate's reach.  Returns the choice record."""
    names = list(outputs)
    if len(names) == 1:
        return {"chosen": names[0], "rule": f"configured (model: {ds.model.name})"}
    try:
        return metrics.select_model(outputs, noisy, reaches={m: reaches[m] for m in names},
                                    temporal_radius=ds.metrics.temporal_radius)
    except InputError as exc:
        raise InputError(None, f"model: auto compares candidates by uMSE: {exc.problem}; "
                               "choose model: wcvd or shine") from None


def denoise_stack(stack: np.ndarray, ds, *, train_overrides: dict | None = None, device: str = "auto",
                  progress: Callable[[str, dict], None] | None = None) -> dict:
    """The whole chain on one (T, Y, X) stack in data units (no drift correction).

    Returns {'chosen', 'output' (T, Y, X) float32 in data units, 'outputs' per candidate
    ('classical' too for ``auto``), 'checkpoints' per trained model, 'choice' (record),
    'blindspot' (noise stage result)}.
    """
    stack = np.asarray(stack, dtype=np.float32)
    spot = noise.estimate_blindspot(stack, max_lag=ds.noise.max_lag, threshold=ds.noise.threshold,
                                    estimate=ds.noise.estimate)
    outputs, ckpts, reaches = {}, {}, {}
    for name in ds.candidates:
        cb = (lambda row, n=name: progress(n, row)) if progress else None
        ckpt = train_candidate(stack, ds, name, spot["blindspot"], train_overrides=train_overrides,
                               progress=cb)
        model = model_from_checkpoint(ckpt, device=device)
        out = infer.denoise(model, ckpt, stack, device=device)
        outputs[name], _ = postprocess(out, ds, name)
        ckpts[name], reaches[name] = ckpt, model.params.halo_t
    if "classical" in ds.select_candidates:
        outputs["classical"], attrs = classical_candidate(stack, spot["blindspot"] // 2)
        reaches["classical"] = attrs["temporal_reach"]
    choice = choose(outputs, stack, ds, reaches)
    if choice["chosen"] == "classical":
        choice["sigma"] = attrs["sigma"]
    return {"chosen": choice["chosen"], "output": outputs[choice["chosen"]], "outputs": outputs,
            "checkpoints": ckpts, "choice": choice, "blindspot": spot}
