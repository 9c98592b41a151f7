"""Checkpoints and intensity normalisation: what a trained model needs to be used again.

A checkpoint is a plain dict (``torch.save``-d atomically, loaded with
``weights_only=True`` so it cannot execute code): 'model' (registry name), 'state_dict',
'model_params', 'train_params', 'normalisation', code and torch versions, training
history and timings.  :func:`model_from_checkpoint` rebuilds the model through the
registry in ``emdenoise.models`` and refuses weights that are not blind.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import io
from .errors import InputError
from .models import BlindSpotModel, model_class, resolve_device

__all__ = ["Normalisation", "save_checkpoint", "load_checkpoint", "model_from_checkpoint", "normalisation_of",
           "for_stack"]


@dataclass(frozen=True)
class Normalisation:
    """x_norm = (x - offset) / scale, and back.

    offset: the ``low_pct`` percentile of the data (background / detector offset, e.g.
        0 for counting mode, ~100 for linear-mode data).  Subtracting it puts the data at
        >= 0 (up to the lowest 0.5 % of noisy pixels), where the final ReLU of the
        network can represent it, and lets the bias-free network model an offset.
    scale: ``high_pct`` minus ``low_pct`` percentile (robust to hot pixels); falls back
        to the mean absolute deviation from the offset for very sparse data (where the
        99.5 % percentile is still 0), then to 1.
    Units: the data's own (counts, grey levels, ADU).
    """

    offset: float
    scale: float
    low_pct: float = 0.5
    high_pct: float = 99.5

    @classmethod
    def fit(cls, stack: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5,
            max_samples: int = 4_000_000) -> "Normalisation":
        if not hasattr(stack, "shape"):
            stack = np.asarray(stack, dtype=np.float32)
        size = int(np.prod(stack.shape))
        # deterministic subsample: percentiles need no more (frame by frame for a Zarr array)
        flat = io.strided_sample(stack, int(math.ceil(size / max_samples)) if size > max_samples else 1)
        lo, hi = np.percentile(flat, [low_pct, high_pct])
        scale = float(hi - lo)
        if not scale > 0:
            scale = float(np.mean(np.abs(flat - lo)))
        if not scale > 0:
            scale = 1.0
        return cls(offset=float(lo), scale=scale, low_pct=low_pct, high_pct=high_pct)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., Y, X) data units -> float32 normalised."""
        return ((np.asarray(x, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)).astype(
            np.float32, copy=False)

    def invert(self, y: np.ndarray) -> np.ndarray:
        """float32 normalised -> data units."""
        return (np.asarray(y, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(
            np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"method": "percentile", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalisation":
        return cls(**{k: d[k] for k in ("offset", "scale", "low_pct", "high_pct") if k in d})


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def save_checkpoint(ckpt: dict, path) -> None:
    """torch.save the checkpoint dict atomically (temp file in the same folder, then rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(ckpt, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_REQUIRED = ("state_dict", "model_params", "normalisation")


def load_checkpoint(path, device: str = "cpu") -> tuple[BlindSpotModel, dict]:
    """Load a checkpoint written by ``save_checkpoint``; returns (model in eval mode, dict).

    Raises ``InputError(path, ...)`` for a missing / unreadable file, missing keys, a
    weight shape mismatch, or a blind kernel whose centre weight is not exactly zero.
    Uses ``torch.load(weights_only=True)``: a checkpoint cannot execute code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(path, "checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, unsafe pickle ...
        raise InputError(path, f"not a readable emdenoise checkpoint ({exc.__class__.__name__}: {exc})") from None
    return model_from_checkpoint(ckpt, path, device), ckpt


def model_from_checkpoint(ckpt: dict, source=None, device: str = "cpu") -> BlindSpotModel:
    """The model (eval mode) of an in-memory checkpoint dict, with the same checks as
    :func:`load_checkpoint`; ``source`` names the file in error messages.  The class
    comes from the registry (``models.MODELS``) by ``ckpt['model']`` ('wcvd' when
    absent: checkpoints written before the key existed)."""
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        raise InputError(source, f"not an emdenoise checkpoint (needs keys {', '.join(_REQUIRED)})")
    try:
        cls = model_class(ckpt.get("model", "wcvd"))
    except InputError as exc:
        raise InputError(source, exc.problem) from None
    try:
        params = cls.params_class.from_dict(ckpt["model_params"])
    except (TypeError, InputError) as exc:
        raise InputError(source, f"invalid {ckpt.get('model', 'wcvd')} model parameters: {exc}") from None
    cls.check_state(ckpt["state_dict"], source, params=params)
    model = cls(params)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise InputError(source, f"weights do not match the model parameters (a checkpoint of an older "
                                 f"emdenoise version?): {exc}") from None
    return model.to(resolve_device(device)).eval()


def for_stack(ckpt: dict, stack) -> dict:
    """The checkpoint to apply to ``stack`` (T, Y, X; numpy or Zarr): itself, or for a
    model trained on several datasets at once (``normalise: per_dataset``, workflow
    ``model.train_on``) a copy whose 'normalisation' is the stack's own
    (:meth:`Normalisation.fit`, as each dataset was normalised for training)."""
    if ckpt.get("normalise") != "per_dataset":
        return ckpt
    return {**ckpt, "normalisation": Normalisation.fit(stack).to_dict()}


def normalisation_of(ckpt) -> Normalisation | None:
    """The Normalisation of a checkpoint dict (or a Normalisation, or its dict); None
    passes through (data already normalised)."""
    if ckpt is None or isinstance(ckpt, Normalisation):
        return ckpt
    return Normalisation.from_dict(ckpt["normalisation"] if "normalisation" in ckpt else ckpt)
