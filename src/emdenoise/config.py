"""Typed pipeline configuration.

The JSON schema ``emdenoise/schemas/config.schema.yaml`` checks keys and types. It is
package data, so a plain ``pip install .`` has it; ``workflow/schemas/config.schema.yaml``
links to it and the Snakefile validates with it. This module holds the *defaults* of
every stage, in one place, and turns a validated config dict into typed, frozen objects. A dataset entry may
override any stage setting; what it does not set comes from ``defaults:`` in the config
file, and what that does not set comes from the dataclasses below.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import inspect
import os
import re
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import InputError

#: The config schema, shipped inside the package (``workflow/schemas/`` links to it).
SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def setting(default, **schema):
    """A config field: its default (written here and nowhere else) and its JSON-schema
    constraints (``minimum``, ``enum``, ...; ``also``: extra constant values allowed, e.g.
    ``'auto'`` beside numbers).  The type comes from the annotation; :func:`json_schema`
    turns both into the schema the workflow validates with."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"schema": schema})


#: device settings: auto (CUDA when available), cpu, cuda, or one GPU as cuda:N
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


@dataclass(frozen=True)
class WCVDParams:
    """Architecture hyper-parameters (paper values as defaults).

    kt: temporal kernel size (odd, >= 3) for ``dims=3``; ignored for ``dims=2``.
    ks: spatial kernel sizes of the parallel branches (odd, >= 3).
    channels: C_out of the BCK and of the hidden 1x1 layers.
    n_layers: N_L, number of hidden 1x1 layers with LeakyReLU.
    negative_slope: LeakyReLU slope.
    dims: 3 = WCVD (video, 3D kernel), 2 = WCID (image, 2D kernel per frame).
    bias: bias in the 1x1 layers (the BCK never has one); see the module docstring.
    blindspot: side of the square centre-frame blind spot in px (1, 3, 5, 7, 9; the
        paper's WCVD: 1).  Detector-correlated noise (linear mode, PSF) needs the size
        the ``noise`` stage measured, else the kernel copies the correlated noise of the
        neighbours.  Only the centre frame is masked: other frames carry independent noise.
    context: temporal context radius R in frames (0 = off, the paper's WCVD).  R > 0 adds
        input channels that are means of the frames t-r..t+r *without frame t* for
        r = R, R/2, R/4, ... 1 (``context_radii``), seen through an unmasked Ks x Ks kernel.
        They never contain the centre frame, so the blind spot is unchanged, and the
        network can average as many frames as a slowly changing scene allows.  The input
        window grows to ``max(kt, 2 R + 1)`` frames; R may be up to T - 1: past the
        movie's ends the window continues mirrored, then periodically
        (``tiling.window_index``), so R = T - 1 averages every other frame of the movie.
    """

    kt: int = 3
    ks: tuple[int, ...] = (3, 5, 7)
    channels: int = 3
    n_layers: int = 4
    negative_slope: float = 0.1
    dims: int = 3
    bias: bool = True
    blindspot: int = 1
    context: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        problems = []
        if self.dims not in (2, 3):
            problems.append(f"dims must be 2 (WCID) or 3 (WCVD), got {self.dims}")
        if self.blindspot not in (1, 3, 5, 7, 9):
            problems.append(f"blindspot must be 1, 3, 5, 7 or 9, got {self.blindspot}")
        if self.dims == 2 and self.ks and self.blindspot >= min(self.ks):
            problems.append(f"WCID (dims=2) sees only the centre frame: blindspot {self.blindspot} must be "
                            f"smaller than every kernel size {self.ks}")
        if self.context < 0 or (self.dims == 2 and self.context):
            problems.append(f"context must be >= 0 (and 0 for dims=2), got {self.context}")
        if self.dims == 3 and (self.kt < 3 or self.kt % 2 == 0):
            problems.append(f"kt must be odd and >= 3 for dims=3, got {self.kt}")
        if not self.ks or any(k < 3 or k % 2 == 0 for k in self.ks):
            problems.append(f"ks must be odd kernel sizes >= 3, got {self.ks}")
        if self.channels < 1 or self.n_layers < 0:
            problems.append("channels must be >= 1 and n_layers >= 0")
        if problems:
            raise InputError(None, "invalid WCVDParams: " + "; ".join(problems))

    @property
    def kt_eff(self) -> int:
        """Number of frames in one input window (max(kt, 2 context + 1) for WCVD, 1 for WCID)."""
        return max(self.kt, 2 * self.context + 1) if self.dims == 3 else 1

    @property
    def halo_t(self) -> int:
        """Frames needed on each side of a predicted frame."""
        return self.kt_eff // 2

    @property
    def halo_s(self) -> int:
        """Pixels needed on each side of a predicted pixel (Ks_max // 2)."""
        return max(self.ks) // 2

    @property
    def blind_radius(self) -> int:
        """b = blindspot // 2: centre-frame pixels within Chebyshev distance b are unseen
        (0: only the predicted pixel)."""
        return self.blindspot // 2

    @property
    def context_radii(self) -> tuple[int, ...]:
        """Radii of the context channels, largest first: R, R // 2, ... >= 1 (() if off)."""
        out, r = [], self.context
        while r >= 1:
            out.append(r)
            r //= 2
        return tuple(out)

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) safe for ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WCVDParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "ks" else v) for k, v in d.items() if k in known})


@dataclass(frozen=True)
class TrainParams:
    """Training settings.

    epochs: passes; one epoch = one random crop of every training window.
    lr: Adam learning rate (paper: 1e-3).
    batch_size: windows per optimiser step.
    crop: output crop size in px (int) or None for full frames (paper setting, slow on CPU).
    steps_per_epoch: optimiser steps per epoch; None = ceil(n_train_windows / batch_size),
        at most ``max_steps_per_epoch``.
    max_steps_per_epoch: caps the automatic steps per epoch, so the training budget
        (epochs x steps) stops growing with the length of the movie: a 200-frame movie
        trains as many steps as a 40-frame one (WCVD: 1608 s vs 27 s before the cap).
    augment: random flips in y and x and transposes (square crops) of each window.
    seed: seeds the weight init and the crop sampler; same seed -> same weights (CPU).
    val_frames: target frames held out for validation and best-checkpoint selection
        (0 = no validation: the last epoch is kept).  See ``_split`` for small T.
    val_crop: validation uses a fixed centre crop of this size (px) of each held-out
        frame, to bound its cost per epoch; None = full frames.
    device: 'auto' | 'cpu' | 'cuda' | 'cuda:N' (one GPU of several).
    amp: mixed precision (bf16 or fp16 autocast) -- only ever used on CUDA.
    lr_schedule: 'cosine' (decay to lr/100 over the epochs; default) or 'constant'
        (paper).  Adam at a constant 1e-3 keeps jittering (+-0.15 dB PSNR between epochs
        on the benchmark movie); the cosine decay lets the weights settle, so the epoch
        chosen by validation is not a random point of that jitter.
    val_tolerance: checkpoint = setting(latest epoch with val loss <= min + val_tolerance * its, minimum=0)
        standard error (see ``_select_epoch``); 0 = plain minimum.
    linear_start: start from the best linear blind-spot predictor fitted by least squares
        on the movie (``BlindSpotModel.initialise``; WCVD/WCID), not from the fixed
        neighbour-average initialisation; SHINE has no such start.
    checkpoint_minutes: the workflow saves a resume state this often (wall time), so a
        training job killed at a cluster's time limit continues when it is resubmitted
        (``train.train_model(resume=...)``); it does not change the result.
    """

    epochs: int = setting(300, minimum=1)
    lr: float = setting(1e-3, exclusiveMinimum=0)
    batch_size: int = setting(8, minimum=1)
    crop: int | None = setting(128, minimum=8)
    steps_per_epoch: int | None = setting(None, minimum=1)
    max_steps_per_epoch: int = setting(4, minimum=1)
    augment: bool = setting(True)
    seed: int = setting(0, minimum=0)
    val_frames: int = setting(2, minimum=0)
    val_crop: int | None = setting(256, minimum=8)
    device: str = setting("auto", pattern=DEVICE_PATTERN)
    amp: bool = setting(True)
    lr_schedule: str = setting("cosine", enum=["cosine", "constant"])
    val_tolerance: float = setting(1.0, minimum=0)
    checkpoint_minutes: float = setting(10.0, exclusiveMinimum=0)
    linear_start: bool = setting(True)

    def __post_init__(self):
        if self.lr_schedule not in ("constant", "cosine"):
            raise InputError(None, f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InputError(None, "epochs and batch_size must be >= 1 and lr > 0")
        if self.crop is not None and self.crop < 1:
            raise InputError(None, f"crop must be None or >= 1, got {self.crop}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class SHINEParams:
    """SHINE blind-spot video denoiser architecture (SHINE paper, Materials and Methods).

    blindspot: side of the square blind spot in px (1, 3, 5, 7 or 9); per dataset from
        ``blindspot.json`` (``emdenoise.noise``).  The output at pixel p never depends on
        centre-frame pixels q with max(|q_y - p_y|, |q_x - p_x|) <= blindspot // 2.
    frames: input frames per window (odd; paper 5: the centre frame and 2 on each side).
    centre_channels: 1x1 convolution of the centre frame (paper 48).
    neighbour_channels: 3x3 convolution of the neighbour frames (paper 16).
    channels: width of the convolution blocks, collection convolutions and head; the
        paper's blocks take the concatenated 48 + 16 = 64 features.
    blocks: convolution blocks of two 3x3 convolutions each (paper 8).
    head_layers: hidden 1x1 layers after the collected features.
    negative_slope: LeakyReLU slope.
    """

    blindspot: int = 1
    frames: int = 5
    centre_channels: int = 48
    neighbour_channels: int = 16
    channels: int = 64
    blocks: int = 8
    head_layers: int = 2
    negative_slope: float = 0.1

    def __post_init__(self):
        problems = []
        if self.blindspot not in (1, 3, 5, 7, 9):
            problems.append(f"blindspot must be 1, 3, 5, 7 or 9, got {self.blindspot}")
        if self.frames < 3 or self.frames % 2 == 0:
            problems.append(f"frames must be odd and >= 3, got {self.frames}")
        if min(self.centre_channels, self.neighbour_channels, self.channels, self.blocks) < 1:
            problems.append("channel counts and blocks must be >= 1")
        if self.head_layers < 0:
            problems.append("head_layers must be >= 0")
        if problems:
            raise InputError(None, "invalid SHINEParams: " + "; ".join(problems))

    @property
    def kt_eff(self) -> int:
        """Frames in one input window."""
        return self.frames

    @property
    def halo_t(self) -> int:
        """Frames needed on each side of a predicted frame."""
        return self.frames // 2

    @property
    def blind_radius(self) -> int:
        """b = blindspot // 2: centre-frame pixels within Chebyshev distance b are unseen."""
        return self.blindspot // 2

    def dilation(self, block: int) -> int:
        """Dilation of the collection convolution after block i (1-based): r_i + b + 1,
        with r_i = 2 i the centre-frame receptive radius of the block's output."""
        return 2 * block + self.blind_radius + 1

    @property
    def halo_s(self) -> int:
        """Receptive-field radius in px (pixels needed on each side of a predicted pixel):
        the last block's neighbour-frame radius 2B + 1 plus its collection dilation."""
        return 2 * self.blocks + 1 + self.dilation(self.blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SHINEParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: SHINE training settings of the paper (batch 16, 256 px crops, RAdam lr 1e-3 with
#: linear warm-up and cosine annealing); the epoch count stays a per-dataset choice.
SHINE_TRAIN_DEFAULTS = {"batch_size": 16, "crop": 256, "lr": 1e-3, "lr_schedule": "cosine"}

#: SHINE sizes.  'paper': the published network (~0.9 M parameters), meant for a GPU.
#: 'cpu': 16 / 8 / 16 channels and 4 blocks, trainable in minutes on a 2-core CPU
#: (measured on the Au movie: uPSNR 40.9 dB vs WCVD 35.3 dB); with 64 px crops,
#: lr 2e-3 (fewer, smaller steps need a larger rate) and one step of 16 crops per epoch
#: (300 steps by default: ~8 min on 2 cores whatever the movie's length).  ``shine.size: auto`` takes
#: 'paper' where training runs on CUDA and 'cpu' elsewhere; explicit channel / block
#: settings override the preset.
SHINE_SIZES = {
    "paper": {"arch": {"centre_channels": 48, "neighbour_channels": 16, "channels": 64, "blocks": 8},
              "train": SHINE_TRAIN_DEFAULTS},
    "cpu": {"arch": {"centre_channels": 16, "neighbour_channels": 8, "channels": 16, "blocks": 4},
            "train": {**SHINE_TRAIN_DEFAULTS, "crop": 64, "lr": 2e-3, "max_steps_per_epoch": 1, "val_crop": 128}},
}


def shine_train_params(**overrides) -> "TrainParams":
    """TrainParams with the SHINE paper defaults, overridden by ``overrides``."""
    return TrainParams(**{**SHINE_TRAIN_DEFAULTS, **overrides})


# --------------------------------------------------------------------------------------
# intensity normalisation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefilterConfig:
    """Pre-denoising used only to *measure* drift (never applied to the output)."""

    method: str = setting("wcid", enum=["gaussian2d", "wcid", "none"])  # wcid | gaussian2d | none
    sigma: float = setting(1.5, exclusiveMinimum=0)  # px, for gaussian2d
    epochs: int = setting(100, minimum=1)  # for wcid: a rough denoise is enough to register frames


@dataclass(frozen=True)
class DriftConfig:
    enabled: bool | None = setting(None)  # None: on for movies, off for tilt series
    upsample: int = setting(20, minimum=10)  # phase-correlation upsampling -> 1/20 px precision
    apply: str = setting("integer", enum=["integer", "fourier", "spline"])  # integer | fourier | spline
    crop: bool = setting(True)  # crop the border that lacks data after shifting
    min_peak_z: float = setting(6.0, minimum=0)  # trust a frame's shift only above this correlation-peak z-score (0 = off)


@dataclass(frozen=True)
class NoiseConfig:
    max_lag: int = setting(4, minimum=4, maximum=16)  # heatmap covers lags -max_lag..max_lag in y and x
    threshold: float = setting(0.05, exclusiveMinimum=0, exclusiveMaximum=1)  # |r| above this at a lag must be inside the blind spot
    estimate: str = setting("auto", enum=["auto", "frame", "difference"])  # auto | frame | difference


@dataclass(frozen=True)
class BaselinesConfig:
    gaussian2d_sigma: float = setting(1.0, exclusiveMinimum=0)  # px (WCVD paper: Gaussian 2D per frame)
    gaussian3d_sigma: tuple[float, float, float] = setting((1.0, 1.0, 1.0), exclusiveMinimum=0)  # (t, y, x)


@dataclass(frozen=True)
class MetricsConfig:
    peak: float | None = setting(None, exclusiveMinimum=0)  # M of uPSNR; None: max of the raw aligned stack
    temporal_radius: int = setting(2, minimum=0, maximum=8)  # uMSE views a, b, c start r+1 frames from t (see metrics.umse)


@dataclass(frozen=True)
class ModelConfig:
    """Which model denoises the dataset, and its architecture (see WCVDParams)."""

    name: str = setting("auto", enum=["wcvd", "shine", "auto", "none"])  # auto (every candidate, the lowest self-supervised loss wins) | wcvd | shine | none (baselines only)
    kt: int = setting(3, minimum=3)
    # auto also trains a WCVD with this longer temporal window (candidate 'wcvd_kt<N>').
    # null = no such candidate (the default: the context candidate below reaches further).
    long_kt: int | None = setting(None, minimum=3)
    # temporal context of the candidate 'wcvd_ctx' (WCVDParams.context: frames on each
    # side whose means, without the centre frame, are extra inputs): 'auto' = T - 1 (the
    # whole movie), at most 99 (tilt series 6), or the longest reach uMSE can still check
    # ((T - 11) // 2) where the longer one is not significantly better on held-out frames
    # (pipeline.choose_reach); 0 = no such candidate in auto
    context: int | str = setting("auto", minimum=0, also=["auto"])
    # the longest temporal reach (frames each side of t) any tuned candidate may have: 'any'
    # (the default: a candidate keeps to the reach uMSE can check unless reaching further is
    # significantly better), 'checkable' (never further than uMSE can check on the movie,
    # (T - 11) // 2, so the report scores every candidate; no limit where the movie is too
    # short for any check) or a number of frames.  Limits the classical candidate's Gaussians,
    # NL-means and mix and wcvd_ctx's context; WCVD's and SHINE's fixed windows stay as set.
    max_reach: int | str = setting("any", minimum=0, also=["any", "checkable"])
    # auto also combines its candidates' blind outputs pixel by pixel (pipeline.ensemble:
    # a small MLP gate fitted on the movie, cross-fitted by frame parity) and takes that
    # where its self-supervised loss is significantly lower than the chosen candidate's
    ensemble: bool = setting(True)
    # WCVD's centre-frame blind spot (px, odd): null = the size the noise stage measured
    # (1 for uncorrelated counting noise; the detector PSF of linear mode needs more)
    blindspot: int | None = setting(None, enum=[1, 3, 5, 7, 9])
    # a trained model (model.pt of an earlier run or `emdenoise denoise --save-model`) to
    # apply instead of training: candidate 'pretrained', no `train` job
    checkpoint: str | None = setting(None)
    # one model for several datasets ("one model per session"): every candidate is trained
    # once, on crops from the datasets named here (names or globs such as 'au_*'; this
    # dataset need not be one of them: train on some, apply to the rest), and applied to
    # each dataset whose train_on names the same datasets; each keeps its own normalisation
    train_on: tuple[str, ...] | None = setting(None)
    ks: tuple[int, ...] = setting((3, 5, 7), minimum=3)
    channels: int = setting(3, minimum=1)
    n_layers: int = setting(4, minimum=0)
    negative_slope: float = setting(0.1, minimum=0)
    bias: bool = setting(True)

    def wcvd_params(self, dims: int = 3, kt: int | None = None, *, context: int = 0,
                    blindspot: int = 1) -> WCVDParams:
        """Architecture of WCVD (dims=3) or of its 2D twin WCID (dims=2).

        Reads exactly ``wcvd_arch(dims)`` (named, not probed with hasattr, so a stage view
        that lacks one of them raises instead of silently taking a default); WCID has no
        temporal kernel, so ``kt`` is not read for dims=2.  ``kt`` given: that temporal
        window instead of ``self.kt`` (the 'wcvd_kt<N>' candidates), not read either.
        ``context`` / ``blindspot``: resolved by the caller (``pipeline.model_params``:
        the movie's length, the noise stage); WCID keeps a 1 px blind spot and no context.
        """
        names = wcvd_arch(dims) if kt is None else wcvd_arch(2)
        arch = {name: getattr(self, name) for name in names}
        extra = {"kt": kt} if kt is not None and dims == 3 else {}
        if dims == 3:
            extra.update(context=int(context), blindspot=int(blindspot))
        return WCVDParams(**{**arch, "dims": dims, **extra})


def candidate_model(name: str) -> tuple[str, int | None]:
    """A candidate's model class name and temporal window: 'wcvd' -> ('wcvd', None),
    'wcvd_kt7' -> ('wcvd', 7), 'wcvd_ctx' -> ('wcvd', None), 'shine' -> ('shine', None)."""
    if name.endswith(CONTEXT_SUFFIX):
        return candidate_model(name[:-len(CONTEXT_SUFFIX)])
    m = re.fullmatch(r"(\w+?)_kt(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


#: model classes whose method ends in the FFT low-pass (WCVD paper, SM 2): WCVD and its 2-D
#: form WCID; SHINE's method has none.  Here, not on the torch model classes, so that the
#: post-processing jobs need not import torch.
LOWPASS_MODELS = frozenset({"wcvd", "wcid"})


def lowpass_in_method(kind: str) -> bool:
    """Whether model class ``kind`` ('wcvd', 'wcid', 'shine', any case) includes the low-pass."""
    return str(kind).lower() in LOWPASS_MODELS


#: name suffix of the WCVD candidate with temporal context channels ('wcvd_ctx')
CONTEXT_SUFFIX = "_ctx"
#: the longest temporal context ``model.context: auto`` gives the 'wcvd_ctx' candidate, by
#: kind of data (frames on each side; a cost bound: the input window is 2 R + 1 frames, the
#: context means cost O(R) per output frame and chunked inference's tiles shrink as R
#: grows, ``chunked.auto_tile``).  Movies 99: a movie of up to 100 frames is averaged whole
#: for every frame (bench_quality, the trained context network, 256² count-1 static scenes:
#: 50 frames R 24 26.59 -> R 49 27.73 dB, oracle Gaussian 27.28; 200 frames R 24 27.85 ->
#: R 99 31.33 dB (R 199 32.53), oracle 29.17; dynamic 50 frames R 24 26.96 -> R 49 27.45,
#: blind-tuned Gaussian 27.30).  Time grows with R: 100 x 1024² chunked inference 45 s at
#: R 24, 184 s at R 99 (at ~1.1 GB either way); training on the 100-frame Au movie 73 s
#: at R 24, 194 s at R 99.
#: Tilt series 6: their "frames" are projections ~3 degrees apart, and tilts 20 degrees
#: away hold a different projection of the specimen.
MAX_AUTO_REACH = {"movie": 99, "tilt_series": 6}


def auto_reach_cap(kind: str) -> int:
    """:data:`MAX_AUTO_REACH` for a dataset ``kind`` ('movie' | 'tilt_series')."""
    return MAX_AUTO_REACH.get(kind, min(MAX_AUTO_REACH.values()))


def max_auto_reach(n_frames: int, kind: str = "movie") -> int:
    """The longest context radius ``auto`` gives for an n-frame stack: the cap of its
    ``kind`` (:func:`auto_reach_cap`) and the movie's own length (T - 1: a window of 2 R + 1
    frames continued past the movie's ends, ``tiling.window_index``, averages every other
    frame of the movie); >= 0.  The model choice (Noise2Self, ``metrics.select_model``)
    scores any reach without bias."""
    return max(0, min(auto_reach_cap(kind), int(n_frames) - 1))


def context_frames(setting_value, n_frames: int | None, source=None, kind: str = "movie") -> int:
    """The context radius R of a 'wcvd_ctx' candidate: an int as configured, or for 'auto'
    :func:`max_auto_reach`, at least 1 (the longest; training may then keep a shorter,
    uMSE-checkable one: ``pipeline.choose_reach``)."""
    if setting_value != "auto":
        return int(setting_value)
    if n_frames is None:
        raise InputError(source, "model.context: auto depends on the number of frames; pass n_frames")
    return max(1, max_auto_reach(n_frames, kind))


def wcvd_arch(dims: int = 3) -> tuple[str, ...]:
    """ModelConfig fields that make the WCVD (dims=3) or WCID (dims=2) architecture:
    all but ``name``, and without ``kt`` for WCID (one frame per window)."""
    names = ("kt", "ks", "channels", "n_layers", "negative_slope", "bias")
    return names if dims == 3 else names[1:]


@dataclass(frozen=True)
class ShineConfig:
    """SHINE architecture (see SHINEParams); ``blindspot: None`` takes the size the
    ``noise`` stage chose from the noise-correlation heatmap (blindspot.json).
    ``size``: 'auto' (paper-size network when training runs on a GPU, CPU-sized
    otherwise), 'paper' or 'cpu' (``SHINE_SIZES``); channel counts and blocks set here
    (not None) override the preset."""

    blindspot: int | None = setting(None, enum=[1, 3, 5, 7, 9])
    size: str = setting("auto", enum=["auto", "paper", "cpu"])
    frames: int = setting(SHINEParams.frames, minimum=3)
    centre_channels: int | None = setting(None, minimum=1)
    neighbour_channels: int | None = setting(None, minimum=1)
    channels: int | None = setting(None, minimum=1)
    blocks: int | None = setting(None, minimum=1)
    head_layers: int = setting(SHINEParams.head_layers, minimum=0)
    negative_slope: float = setting(SHINEParams.negative_slope, minimum=0)

    def resolved_size(self, gpu: bool) -> str:
        """'paper' or 'cpu': what ``size`` means on this machine."""
        if self.size not in ("auto", "paper", "cpu"):
            raise InputError(None, f"shine.size must be auto, paper or cpu, got {self.size!r}")
        return ("paper" if gpu else "cpu") if self.size == "auto" else self.size

    def params(self, measured_blindspot: int, gpu: bool = False) -> SHINEParams:
        """The architecture for a blind spot (the config's, else ``measured_blindspot``),
        sized for a GPU (``gpu=True``) or a CPU when ``size`` is 'auto'."""
        preset = SHINE_SIZES[self.resolved_size(gpu)]["arch"]
        arch = {f.name: getattr(self, f.name) for f in fields(SHINEParams) if hasattr(self, f.name)}
        arch = {k: (preset[k] if v is None and k in preset else v) for k, v in arch.items()}
        return SHINEParams(**{**arch, "blindspot": self.blindspot or int(measured_blindspot)})


@dataclass(frozen=True)
class InferConfig:
    """Chunked inference (emdenoise.infer.infer_zarr) and tilt-series tiling."""

    device: str = setting("auto", pattern=DEVICE_PATTERN)  # auto: CUDA when available, else CPU; cuda:N picks a GPU
    batch_frames: int = setting(8, minimum=1)  # frames per forward pass; bounds memory
    tile: int | None = setting(None, minimum=16)  # movies: square tile edge in px; None = sized from free RAM / GPU memory
    workers: int | None = setting(None, minimum=1)  # None = the rule's threads (one per GPU on a GPU machine)
    scheduler_address: str | None = setting(None)  # an existing Dask cluster, e.g. from dask-jobqueue
    tilt_tile: int = setting(1024, minimum=32)  # tilt series: overlapping tiles stitched with a blending window (SHINE)
    tilt_overlap: int = setting(256, minimum=0)
    # auto: SHINE runs in bfloat16 on a CPU that computes it natively (AMX / AVX512-BF16:
    # ~4-6x faster, output within 1e-3 of float32); float32: always float32 (bit-for-bit
    # the same numbers on any CPU of the same kind). WCVD's CPU path is always float32.
    precision: str = setting("auto", enum=["auto", "float32"])


@dataclass(frozen=True)
class LowpassConfig:
    """FFT low-pass after the network (WCVD paper, SM 2).

    diameter: fraction of N (see ``filters.fft_lowpass``); None = N / Ks_max (paper text);
    'auto' (default) = whichever of no low-pass, 1/2 and 1/3 (the released code's) gives
    the lowest uMSE on this movie (``pipeline.postprocess``): a fixed cutoff removes
    lattice fringes finer than 2/diameter px (1/3: 6 px), which many HRTEM movies have.
    """

    enabled: bool = setting(True)
    diameter: float | str | None = setting("auto", exclusiveMinimum=0, maximum=1, also=["auto"])
    pad: str = setting("symmetric", enum=["symmetric", "periodic"])  # symmetric: mirror-extended frame, no wrap-around ringing
    edge_width: float = setting(0.0, minimum=0)


@dataclass(frozen=True)
class UnblindConfig:
    """The network's own pixel given back after inference (``pipeline.unblind``).

    A blind-spot network predicts each pixel from its neighbours only: it never sees the
    pixel's own measurement, which carries information too.  The output becomes
    f + w (y - f), with the weight w = MSE_f / (MSE_f + sigma^2) that minimises the
    mean squared error (the posterior-mean idea of Laine et al. 2019, with one global
    weight), estimated from the network's self-supervised loss L = MSE_f + sigma^2 and
    the noise variance sigma^2 from differences of adjacent frames (which the scene's
    own change can only inflate: w is then smaller, never larger, than the best).
    Applies to every network candidate, before the low-pass; the model choice and the
    blindness audit use the network's own (blind) output.
    """

    enabled: bool = setting(True)


STAGES = {
    "prefilter": PrefilterConfig,
    "drift": DriftConfig,
    "noise": NoiseConfig,
    "baselines": BaselinesConfig,
    "metrics": MetricsConfig,
    "model": ModelConfig,
    "train": TrainParams,
    "shine": ShineConfig,
    "shine_train": dict,  # overrides of `train` for SHINE, on top of the paper's settings
    "infer": InferConfig,
    "lowpass": LowpassConfig,
    "unblind": UnblindConfig,
}


@dataclass(frozen=True)
class DemoConfig:
    """A synthetic demo movie written by the `demo` rule (see emdenoise.synthetic)."""

    mode: str = setting("counting", enum=["counting", "linear"])
    n_frames: int = setting(20, minimum=4)
    shape: tuple[int, int] = setting((192, 192), minimum=16)
    spacing: float = setting(9.0, exclusiveMinimum=0)
    dose: float = setting(1.0, exclusiveMinimum=0)
    max_drift: float = setting(6.0, minimum=0)
    psf_sigma: float = setting(1.0, minimum=0)
    format: str = setting("tif", enum=["tif", "mrc", "npy"])
    seed: int = setting(0, minimum=0)


class _DatasetHelpers:
    """Derived settings, shared by DatasetConfig and StageConfig (which reads only the
    sections its rule passed: each helper names the sections it needs)."""

    @property
    def candidates(self) -> list[str]:
        """Models trained for this dataset: one, both for ``auto``, none for ``none``.
        Needs ``model.name``."""
        if self.model.checkpoint:  # apply a trained model: nothing to train or to choose
            return ["pretrained"]
        if self.model.name == "auto":  # the paper's WCVD, WCVD with temporal context, SHINE
            long_kt = self.model.long_kt
            return (["wcvd"] + ([f"wcvd_kt{long_kt}"] if long_kt and long_kt != self.model.kt else [])
                    + ([f"wcvd{CONTEXT_SUFFIX}"] if self.model.context != 0 else []) + ["shine"])
        return {"none": []}.get(self.model.name, [self.model.name])

    @property
    def select_candidates(self) -> list[str]:
        """What ``auto`` chooses from: the trained models, the Gaussian 3D tuned without
        ground truth ('classical', no checkpoint) and, with ``model.ensemble``, their
        combination ('ensemble', ``pipeline.ensemble``); the configured model otherwise.
        Needs ``model.name`` (and ``model.ensemble``)."""
        auto = self.model.name == "auto" and not self.model.checkpoint
        ensemble = auto and self.model.ensemble and bool(self.candidates)  # of the networks and 'classical'
        return self.candidates + (["classical"] if auto else []) + (["ensemble"] if ensemble else [])

    def train_params(self, model: str, gpu: bool = False) -> TrainParams:
        """Training settings of one model: SHINE takes its size's batch / crop / schedule
        (``SHINE_SIZES``, the paper's on a GPU) over ``train`` and then its own
        ``shine_train`` overrides.  Needs ``train`` (and ``shine``, ``shine_train`` for
        SHINE)."""
        if model != "shine":
            return self.train
        preset = SHINE_SIZES[self.shine.resolved_size(gpu)]["train"]
        return dataclasses.replace(self.train, **{**preset, **self.shine_train})

    def gpu_jobs(self, stage: str) -> int:
        """GPUs a workflow job of ``stage`` ('train' | 'infer' | 'prefilter') may occupy:
        1 when it runs a network on a device that may be CUDA (``auto``, ``cuda``,
        ``cuda:N``), 0 on the CPU or without a network (prefilter other than WCID).
        Needs ``train``, ``infer`` and ``prefilter``."""
        if stage == "prefilter" and self.prefilter.method != "wcid":
            return 0
        device = self.infer.device if stage == "infer" else self.train.device
        return 0 if device == "cpu" else 1

    @property
    def drift_enabled(self) -> bool:
        """Needs ``drift`` and ``kind``."""
        if self.drift.enabled is None:
            return self.kind == "movie"
        return bool(self.drift.enabled)


#: What each helper of _DatasetHelpers reads, for the error when a stage view lacks it.
_HELPER_NEEDS = {"candidates": ("model.name", "model.kt", "model.long_kt", "model.context", "model.checkpoint"),
                 "select_candidates": ("model.name", "model.kt", "model.long_kt", "model.context",
                                       "model.checkpoint", "model.ensemble"),
                 "drift_enabled": ("drift", "kind"), "gpu_jobs": ("train", "infer", "prefilter")}


@dataclass(frozen=True)
class DatasetConfig(_DatasetHelpers):
    name: str
    path: str
    kind: str = setting("movie", enum=["movie", "tilt_series"])
    pixel_size: float | None = setting(None, exclusiveMinimum=0)
    ground_truth: str | None = setting(None)
    frames: tuple[int, int] | None = setting(None, minimum=0)
    #: Falcon EER only: raw EER frames summed into one frame (a "fraction"), and the
    #: super-resolution factor (1 = the detector grid, 2 or 4 = sub-pixel event positions).
    eer_group: int = setting(20, minimum=1)
    eer_upsampling: int = setting(1, enum=[1, 2, 4])
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainParams = field(default_factory=TrainParams)
    shine: ShineConfig = field(default_factory=ShineConfig)
    shine_train: dict = field(default_factory=dict)
    infer: InferConfig = field(default_factory=InferConfig)
    lowpass: LowpassConfig = field(default_factory=LowpassConfig)
    unblind: UnblindConfig = field(default_factory=UnblindConfig)


@dataclass(frozen=True)
class PipelineConfig:
    results: str
    datasets: dict[str, DatasetConfig]
    demo: dict[str, DemoConfig]
    #: keep the intermediates nobody reads after the next stage (prefiltered.zarr, each
    #: model's denoised_raw.zarr); false: Snakemake temp() deletes them once read, which
    #: saves disk on archives but makes a later edit of a downstream setting re-run the
    #: stage that made them too
    keep_intermediates: bool = True
    #: datasets whose models are trained on several datasets (``model.train_on``) -> the
    #: sorted names of the datasets they train on (:func:`train_groups`)
    train_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)


def group_key(members) -> str:
    """The folder name of a model shared by ``members`` (results/_shared/<key>/): their
    names joined by '+', or for long lists the first name, the count and a short hash."""
    members = sorted(members)
    key = "+".join(members)
    if len(key) <= 64:
        return key
    digest = hashlib.sha1("\n".join(members).encode()).hexdigest()[:8]
    return f"{members[0]}+{len(members) - 1}more-{digest}"


def train_groups(datasets: dict) -> dict[str, tuple[str, ...]]:
    """``model.train_on`` resolved: dataset -> sorted names of the datasets its models train
    on (patterns matched with fnmatch against the dataset names).  InputError for a
    pattern that names no dataset, ``train_on`` together with ``checkpoint``, or two
    datasets that share a model but differ in a setting its training reads."""
    groups = {}
    for name, ds in datasets.items():
        patterns = ds.model.train_on
        if not patterns:
            continue
        if ds.model.checkpoint:
            raise InputError(None, f"config key datasets.{name}.model: train_on and checkpoint exclude each "
                                   f"other (a given checkpoint is not trained)")
        members = set()
        for pattern in patterns:
            hits = fnmatch.filter(list(datasets), pattern)
            if not hits:
                raise InputError(None, f"config key datasets.{name}.model.train_on: '{pattern}' names no dataset")
            members.update(hits)
        groups[name] = tuple(sorted(members))
    by_key: dict[str, list[str]] = {}
    for name, members in groups.items():
        by_key.setdefault(group_key(members), []).append(name)
    for users in by_key.values():
        first = datasets[users[0]]
        for other in users[1:]:
            ds = datasets[other]
            for cand in [c for c in first.candidates if c in ds.candidates]:  # in order: one message
                keys = ["train", *model_settings(first, cand)]
                a, b = stage_params(first, *keys), stage_params(ds, *keys)
                if a != b:
                    raise InputError(None, f"datasets {first.name} and {other} share one {cand} model "
                                           f"(model.train_on) but differ in {_first_difference(a, b)}")
    return groups


def _first_difference(a: dict, b: dict) -> str:
    """The first setting ('train.epochs', 'kind') whose value differs between two
    ``stage_params`` dicts of the same sections."""
    for section, value in a.items():
        other = b.get(section)
        if isinstance(value, dict):
            for key in value:
                if value[key] != (other or {}).get(key):
                    return f"{section}.{key}"
        elif value != other:
            return section
    return "?"


def _typed(cls, values: dict[str, Any], where: str):
    """Instantiate a stage dataclass, turning lists into tuples for tuple fields."""
    if cls is dict:
        return dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:  # the schema catches this in the workflow; this guards direct API use
        raise InputError(None, f"config key {where}.{sorted(unknown)[0]} is not a known setting")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# --------------------------------------------------------------------------------------
# per-stage params: what a rule hands its script
# --------------------------------------------------------------------------------------
#
# Snakemake re-runs a job when its recorded params change, but it records only plain
# values (str, int, float, bool, None, list, dict): a dataclass param is silently dropped.
# So each rule passes ``stage_params(ds, <the sections its script reads>)`` and the script
# reads them back through ``stage_config``, which refuses any section the rule did not
# pass: a script cannot depend on a setting whose edit would not re-run it.

#: Every field of a dataset entry, in DatasetConfig order (provenance records them all).
DATASET_SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(DatasetConfig))
#: Sections that are stage dataclasses (the rest are plain values: name, path, kind, ...).
_SECTION_TYPES: dict[str, type] = {f.name: STAGES[f.name] for f in fields(DatasetConfig) if f.name in STAGES}


def plain(value: Any) -> Any:
    """A JSON-able copy of ``value``: dataclasses and mappings -> dicts, tuples -> lists.

    Snakemake records exactly such values for its params rerun trigger.
    """
    if isinstance(value, (StageConfig, SectionView)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def stage_params(ds: DatasetConfig, *sections: str) -> dict[str, Any]:
    """The settings of ``ds`` that one stage reads, as a plain dict (see ``plain``).

    sections: fields of DatasetConfig (``"drift"``, ``"kind"``) or single settings inside
    a stage section (``"model.name"``); single settings of one section are grouped, e.g.
    ``stage_params(ds, "drift", "kind", "model.ks")`` ->
    ``{"drift": {"enabled": None, "upsample": 20, ...}, "kind": "movie", "model": {"ks": [3, 5, 7]}}``.
    Keys keep the order given, so the same rule always yields the same dict (and repr).
    Raises KeyError for an unknown section or setting.
    """
    out: dict[str, Any] = {}
    whole: set[str] = set()
    for spec in sections:
        section, _, key = spec.partition(".")
        if section not in DATASET_SECTIONS:
            raise KeyError(f"unknown dataset section {section!r} in {spec!r}; known: {', '.join(DATASET_SECTIONS)}")
        value = getattr(ds, section)
        if not key:
            out[section] = plain(value)
            whole.add(section)
            continue
        if _SECTION_TYPES.get(section, dict) is dict:
            raise KeyError(f"{spec!r}: {section!r} has no named settings; pass the whole section")
        if key not in {f.name for f in fields(_SECTION_TYPES[section])}:
            raise KeyError(f"unknown setting {spec!r}")
        if section not in whole:
            out.setdefault(section, {})[key] = plain(getattr(value, key))
    return out


def _not_passed(what: str) -> AttributeError:
    return AttributeError(f"setting '{what}' was not passed to this rule: add it to the rule's "
                          f"stage(...) params, so that editing it re-runs the rule")


class SectionView:
    """Some settings of one stage section (e.g. only ``model.ks``), read-only.

    Passed settings read as attributes; reading another setting of the section raises
    AttributeError naming it. Methods and properties of the section's dataclass work and
    read through the view, so they too raise if they need a setting that was not passed.
    """

    __slots__ = ("_section", "_cls", "_values")

    def __init__(self, section: str, cls: type, values: Mapping[str, Any]):
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise KeyError(f"unknown setting {section}.{sorted(unknown)[0]}")
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        typed = {k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()}
        for slot, value in (("_section", section), ("_cls", cls), ("_values", typed)):
            object.__setattr__(self, slot, value)

    def __getattr__(self, name: str) -> Any:
        values, cls = object.__getattribute__(self, "_values"), object.__getattribute__(self, "_cls")
        if name in values:
            return values[name]
        attr = inspect.getattr_static(cls, name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        if inspect.isfunction(attr):
            return types.MethodType(attr, self)
        section = object.__getattribute__(self, "_section")
        if name in {f.name for f in fields(cls)}:
            raise _not_passed(f"{section}.{name}")
        raise AttributeError(f"{cls.__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stage settings are read-only ({self._section}.{name})")

    def replace(self, **changes: Any):
        """The full dataclass from the passed settings and ``changes`` (like
        ``dataclasses.replace``); raises AttributeError if some setting is in neither."""
        missing = [f.name for f in fields(self._cls) if f.name not in self._values and f.name not in changes]
        if missing:
            raise _not_passed(f"{self._section}.{missing[0]}")
        return self._cls(**{**self._values, **changes})

    def to_dict(self) -> dict[str, Any]:
        return plain(dict(self._values))

    def __repr__(self) -> str:
        return f"SectionView({self._section}: {self._values!r})"


class StageConfig(_DatasetHelpers):
    """Read-only, typed view of the dataset settings one rule passed (see stage_params).

    Exposes only the sections in ``params``: a whole stage section as its dataclass
    (``cfg.drift.upsample``), some settings of one as a SectionView (``cfg.model.ks``),
    plain sections as values (``cfg.name``, ``cfg.frames`` as a tuple). Reading a section
    the rule did not pass raises AttributeError naming it. The DatasetConfig helpers
    (``candidates``, ``drift_enabled``, ``train_params``) work when their sections are here.
    """

    __slots__ = ("_values",)

    def __init__(self, params: Mapping[str, Any]):
        values: dict[str, Any] = {}
        for section, value in params.items():
            if section not in DATASET_SECTIONS:
                raise KeyError(f"unknown dataset section {section!r}; known: {', '.join(DATASET_SECTIONS)}")
            cls = _SECTION_TYPES.get(section)
            if cls is dict:
                value = MappingProxyType(dict(value))
            elif cls is not None:
                whole = set(value) == {f.name for f in fields(cls)}
                value = _typed(cls, value, section) if whole else SectionView(section, cls, value)
            elif isinstance(value, list):  # frames
                value = tuple(value)
            values[section] = value
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name in _HELPER_NEEDS:  # a helper property failed: say what it needs
            needs = _HELPER_NEEDS[name]
            raise AttributeError(f"'{name}' needs the settings {', '.join(needs)}; this rule passed only "
                                 f"{', '.join(values) or 'none'}: add them to its stage(...) params")
        if name in DATASET_SECTIONS:
            raise _not_passed(name)
        raise AttributeError(f"dataset settings have no section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stage settings are read-only ({name})")

    def to_dict(self) -> dict[str, Any]:
        """The plain dict this view was built from (as stage_params made it)."""
        return {k: plain(v) for k, v in self._values.items()}

    def __repr__(self) -> str:
        return f"StageConfig({self.to_dict()!r})"


# Which settings each stage reads, per case: what a rule passes as params (common.smk), so
# that editing a setting re-runs exactly the stages that read it.
def prefilter_settings(ds) -> list[str]:
    """The chosen pre-filter method's settings only: a Gaussian pre-filter must not re-run
    drift (and everything after it) when training settings change.  WCID trains
    ``prefilter.epochs``, not ``train.epochs``, and is 2D (no ``model.kt``)."""
    if ds.prefilter.method == "wcid":
        train = [f"train.{f.name}" for f in fields(TrainParams) if f.name != "epochs"]
        return ["prefilter.method", "prefilter.epochs", *(f"model.{f}" for f in wcvd_arch(2)), *train]
    if ds.prefilter.method == "gaussian2d":
        return ["prefilter.method", "prefilter.sigma"]
    return ["prefilter.method"]


def model_settings(ds, model: str) -> list[str]:
    """Candidate ``model``'s own architecture: SHINE edits do not retrain WCVD, and
    ``model.name`` (which candidates exist) retrains neither; 'wcvd_kt7' has its window
    in its name; only 'wcvd_ctx' reads ``model.context`` (and ``kind``: its reach cap)."""
    if model == "shine":
        return ["shine", "shine_train"]
    _, kt = candidate_model(model)
    return ([f"model.{f}" for f in wcvd_arch(3 if kt is None else 2)] + ["model.blindspot"]
            + (["model.context", "model.max_reach", "kind"] if model.endswith(CONTEXT_SUFFIX) else []))


def lowpass_settings(ds, model: str) -> list[str]:
    """The post-processing of a model's output: every network gets its own pixel back
    (``unblind``); the low-pass belongs to WCVD's method only (``lowpass_in_method``).
    A pretrained model's kind and kernel sizes come from its checkpoint."""
    if model == "pretrained":
        return ["unblind", "lowpass", "metrics.temporal_radius"]
    if candidate_model(model)[0] != "wcvd":
        return ["unblind"]
    return ["unblind", "lowpass", "model.ks", "metrics.temporal_radius"]


def stage_config(params: Mapping[str, Any]) -> StageConfig:
    """The typed, read-only view a script reads its rule's ``stage_params`` through."""
    return StageConfig(params)


def demo_path(name: str, demo: DemoConfig, truth: bool = False) -> str:
    """Where the `demo` rule writes a demo movie (and its ground truth)."""
    return f"resources/demo/{name}{'_truth' if truth else ''}.{demo.format}"


def _dataset_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".mrcs", ".mrc", ".st", ".npy", ".zarr",
                ".dm3", ".dm4", ".ser", ".emi", ".emd", ".eer"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def _glob_datasets(entries: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for entry in entries:
        matches = sorted(glob.glob(entry["pattern"]))
        if not matches:
            raise InputError(entry["pattern"], "datasets_glob pattern matches no file")
        for path in matches:
            name = entry.get("prefix", "") + _dataset_name(path)
            if name in out:
                raise InputError(path, f"dataset name '{name}' derived from this file collides with "
                                 f"{out[name]['path']}; rename one or use a 'prefix'")
            ds = {"path": path, **{k: entry[k] for k in ("kind", "pixel_size", "eer_group", "eer_upsampling")
                                   if k in entry}}
            out[name] = ds
    return out


def build(config: dict[str, Any], check_paths: bool = True) -> PipelineConfig:
    """Typed configuration from a schema-validated config dict.

    Dataset entries from ``datasets`` and ``datasets_glob`` are merged (a name defined
    twice is an error); stage settings are defaults <- ``defaults:`` <- dataset entry.
    With ``check_paths`` every input path must exist unless a demo rule makes it.
    """
    demo = {name: _typed(DemoConfig, d or {}, f"demo.{name}") for name, d in (config.get("demo") or {}).items()}
    entries = dict(config.get("datasets") or {})
    for name, entry in _glob_datasets(config.get("datasets_glob") or []).items():
        if name in entries:
            raise InputError(entry["path"], f"dataset name '{name}' is also defined under 'datasets'")
        entries[name] = entry
    defaults = config.get("defaults") or {}
    made_by_demo = {demo_path(n, d, t) for n, d in demo.items() for t in (False, True)}
    datasets = {}
    for name, entry in entries.items():
        stages = {
            stage: _typed(cls, {**(defaults.get(stage) or {}), **(entry.get(stage) or {})}, f"datasets.{name}.{stage}")
            for stage, cls in STAGES.items()
        }
        for key in ("path", "ground_truth"):
            p = entry.get(key)
            if check_paths and p and p not in made_by_demo and not os.path.exists(p):
                raise InputError(p, f"does not exist (datasets.{name}.{key})")
        ckpt = stages["model"].checkpoint
        if check_paths and ckpt and not os.path.isfile(ckpt):
            raise InputError(ckpt, f"does not exist (datasets.{name}.model.checkpoint)")
        frames = entry.get("frames")
        if frames is not None and frames[1] <= frames[0]:
            raise InputError(None, f"config key datasets.{name}.frames: stop {frames[1]} must exceed start {frames[0]}")
        datasets[name] = DatasetConfig(
            name=name,
            path=entry["path"],
            kind=entry.get("kind", "movie"),
            pixel_size=entry.get("pixel_size"),
            ground_truth=entry.get("ground_truth"),
            frames=tuple(frames) if frames else None,
            **{k: entry[k] for k in ("eer_group", "eer_upsampling") if k in entry},
            **stages,
        )
    if not datasets:
        raise InputError(None, "the config lists no datasets (keys 'datasets' or 'datasets_glob')")
    results = config.get("results", "results")
    if config.get("run"):  # a run tag keeps reprocessings side by side
        results = f"{results.rstrip('/')}/{config['run']}"
    return PipelineConfig(results=results, datasets=datasets, demo=demo,
                          keep_intermediates=bool(config.get("keep_intermediates", True)),
                          train_groups=train_groups(datasets))


def validate(config: dict[str, Any]) -> None:
    """Validate a config dict against the JSON schema (for use outside Snakemake).

    Raises InputError naming the offending key, e.g. ``config key datasets.au.pathh``.
    """
    import jsonschema
    import yaml

    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.path) or "(top level)"
        raise InputError(None, f"config key {where}: {err.message}")


def load(path: str | os.PathLike, check_paths: bool = True) -> PipelineConfig:
    """Read, validate and type a YAML config file."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(path, f"cannot read config: {exc}") from exc
    validate(config)
    return build(config, check_paths=check_paths)


# --------------------------------------------------------------------------------------
# the JSON schema, generated from the typed settings above
# --------------------------------------------------------------------------------------
_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
_NAME = "^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_DATASET_DOCS = {
    "path": "TIFF, MRC, NPY, Zarr, DM3/DM4, SER/EMI, EMD, EER file or a folder of single-frame files",
    "pixel_size": "Å per pixel; overrides the file's",
    "eer_group": "Falcon EER: raw frames summed per output frame",
    "eer_upsampling": "Falcon EER: super-resolution factor",
    "ground_truth": "clean stack of the same shape (synthetic data)",
    "frames": "[start, stop) frame range to process",
}


def _split_union(ann: str) -> list[str]:
    """'tuple[int, int] | None' -> ['tuple[int, int]', 'None'] (top-level | only)."""
    parts, depth, cur = [], 0, ""
    for ch in ann:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def _field_schema(f) -> dict:
    """JSON schema of one settings field, from its annotation and ``setting`` metadata."""
    cons = dict(f.metadata.get("schema", {}))
    also = cons.pop("also", [])
    parts = _split_union(str(f.type))
    nullable = "None" in parts
    base = [p for p in parts if p not in ("None",) and not (also and p == "str")]
    if len(base) != 1:
        raise TypeError(f"setting {f.name}: cannot map type {f.type!r} to JSON schema")
    t = base[0]
    if t.startswith("tuple["):
        items = [x.strip() for x in t[6:-1].split(",")]
        out = {"type": ["array", "null"] if nullable else "array", "items": {"type": _JSON_TYPES[items[0]], **cons}}
        if items[-1] == "...":
            out["minItems"] = 1
        else:
            out["minItems"] = out["maxItems"] = len(items)
        return out
    if "enum" in cons and nullable:
        cons["enum"] = [*cons["enum"], None]
    typ = _JSON_TYPES[t]
    if also:
        return {"anyOf": [{"type": typ, **cons}, *([{"type": "null"}] if nullable else []),
                          *({"const": v} for v in also)]}
    return {"type": [typ, "null"] if nullable else typ, **cons}


def _object_schema(cls, names=None, docs=None) -> dict:
    props = {}
    for f in fields(cls):
        if names is None or f.name in names:
            props[f.name] = {**_field_schema(f), **({"description": docs[f.name]} if docs and f.name in docs else {})}
    return {"type": "object", "additionalProperties": False, "properties": props}


def json_schema() -> dict:
    """The config's JSON schema (draft 2020-12), built from the typed settings of this
    module, so that a setting, its type, its constraints and its default are written
    once.  ``python -m emdenoise.config`` writes it to ``SCHEMA`` (what Snakemake's
    ``validate`` reads); ``tests/test_config.py`` keeps the file equal to this."""
    ref = {stage: {"$ref": f"#/definitions/{'train' if stage == 'shine_train' else stage}"} for stage in STAGES}
    own = ("path", "kind", "pixel_size", "eer_group", "eer_upsampling", "ground_truth", "frames")
    dataset = _object_schema(DatasetConfig, own, _DATASET_DOCS)
    dataset["properties"]["path"] = {"type": "string", "description": _DATASET_DOCS["path"]}
    dataset["properties"] = {k: dataset["properties"][k] for k in own} | ref
    dataset["required"] = ["path"]
    glob_props = {"pattern": {"type": "string", "description": "glob, e.g. /data/archive/*.mrc"}}
    glob_props |= {k: dataset["properties"][k] for k in ("kind", "pixel_size", "eer_group", "eer_upsampling")}
    glob_props["prefix"] = {"type": "string", "description": "prepended to every derived dataset name"}
    definitions = {stage: _object_schema(cls) for stage, cls in STAGES.items() if cls is not dict}
    definitions["stages"] = {"type": "object", "additionalProperties": False, "properties": ref}
    definitions["dataset"] = dataset
    definitions["glob_entry"] = {"type": "object", "additionalProperties": False, "required": ["pattern"],
                                 "properties": glob_props}
    definitions["demo_entry"] = _object_schema(DemoConfig)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "description": "emdenoise pipeline configuration. GENERATED from the typed settings in "
                       "emdenoise/config.py by `python -m emdenoise.config`: edit those, not this file. "
                       "Unknown keys are errors so that a typo is never silently ignored.",
        "type": "object",
        "additionalProperties": False,
        "patternProperties": {"^x-": {"description": "free blocks for YAML anchors (&name / <<: *name), ignored"}},
        "properties": {
            "results": {"type": "string",
                        "description": "folder that receives all outputs (results/{dataset}/..., results/report/...)"},
            "run": {"type": ["string", "null"], "pattern": _NAME,
                    "description": "run tag: outputs go to {results}/{run}/{dataset}/... so that reprocessing an "
                                   "archive with a new version or config never overwrites earlier results"},
            "keep_intermediates": {"type": "boolean", "default": True,
                                   "description": "keep prefiltered.zarr and each model's denoised_raw.zarr "
                                                  "(false: temp(), deleted once read; a later downstream edit "
                                                  "then re-runs their stage too)"},
            "demo": {"type": "object", "additionalProperties": {"$ref": "#/definitions/demo_entry"},
                     "description": "synthetic demo datasets written under resources/demo/ by the `demo` rule"},
            "datasets": {"type": "object", "propertyNames": {"pattern": _NAME},
                         "additionalProperties": {"$ref": "#/definitions/dataset"},
                         "description": "dataset name -> dataset entry"},
            "datasets_glob": {"type": "array", "items": {"$ref": "#/definitions/glob_entry"},
                              "description": "archive folders; each matching file (or folder) becomes a dataset"},
            "defaults": {"$ref": "#/definitions/stages"},
        },
        "definitions": definitions,
    }


def schema_text() -> str:
    """:func:`json_schema` as the YAML text of ``SCHEMA``."""
    import yaml

    return yaml.safe_dump(json_schema(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":  # python -m emdenoise.config: regenerate the schema file
    SCHEMA.write_text(schema_text())
    print(f"wrote {SCHEMA}")
