"""Typed pipeline configuration.

The JSON schema in ``workflow/schemas/config.schema.yaml`` checks keys and types (the
Snakefile validates with it); this module holds the *defaults* of every stage, in one
place, and turns a validated config dict into typed, frozen objects. A dataset entry may
override any stage setting; what it does not set comes from ``defaults:`` in the config
file, and what that does not set comes from the dataclasses below.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@dataclass(frozen=True)
class PrefilterConfig:
    """Pre-denoising used only to *measure* drift (never applied to the output)."""

    method: str = "gaussian2d"  # gaussian2d | wcid | none
    sigma: float = 1.5  # px, for gaussian2d


@dataclass(frozen=True)
class DriftConfig:
    enabled: bool | None = None  # None: on for movies, off for tilt series
    upsample: int = 20  # phase-correlation upsampling -> 1/20 px precision
    apply: str = "integer"  # integer | fourier | spline
    crop: bool = True  # crop the border that lacks data after shifting


@dataclass(frozen=True)
class NoiseConfig:
    max_lag: int = 4  # heatmap covers lags -max_lag..max_lag in y and x
    threshold: float = 0.1  # |r| above this at a lag must be inside the blind spot
    estimate: str = "auto"  # auto | frame | difference


@dataclass(frozen=True)
class BaselinesConfig:
    gaussian2d_sigma: float = 1.0  # px (WCVD paper: Gaussian 2D per frame)
    gaussian3d_sigma: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (t, y, x)


@dataclass(frozen=True)
class MetricsConfig:
    peak: float | None = None  # M of uPSNR; None: max of the raw aligned stack
    temporal_radius: int = 2  # uMSE views a, b, c start r+1 frames from t (see metrics.umse)


STAGES = {
    "prefilter": PrefilterConfig,
    "drift": DriftConfig,
    "noise": NoiseConfig,
    "baselines": BaselinesConfig,
    "metrics": MetricsConfig,
}


@dataclass(frozen=True)
class DemoConfig:
    """A synthetic demo movie written by the `demo` rule (see emdenoise.synthetic)."""

    mode: str = "counting"
    n_frames: int = 20
    shape: tuple[int, int] = (192, 192)
    spacing: float = 9.0
    dose: float = 1.0
    max_drift: float = 6.0
    psf_sigma: float = 1.0
    format: str = "tif"
    seed: int = 0


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    path: str
    kind: str = "movie"
    pixel_size: float | None = None
    ground_truth: str | None = None
    frames: tuple[int, int] | None = None
    prefilter: PrefilterConfig = field(default_factory=PrefilterConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def drift_enabled(self) -> bool:
        if self.drift.enabled is None:
            return self.kind == "movie"
        return bool(self.drift.enabled)


@dataclass(frozen=True)
class PipelineConfig:
    results: str
    datasets: dict[str, DatasetConfig]
    demo: dict[str, DemoConfig]


def _typed(cls, values: dict[str, Any], where: str):
    """Instantiate a stage dataclass, turning lists into tuples for tuple fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:  # the schema catches this in the workflow; this guards direct API use
        raise InputError(None, f"config key {where}.{sorted(unknown)[0]} is not a known setting")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def demo_path(name: str, demo: DemoConfig, truth: bool = False) -> str:
    """Where the `demo` rule writes a demo movie (and its ground truth)."""
    return f"resources/demo/{name}{'_truth' if truth else ''}.{demo.format}"


def _dataset_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".ome.tif", ".ome.tiff", ".tif", ".tiff", ".mrcs", ".mrc", ".st", ".npy", ".zarr"):
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
            ds = {"path": path, **{k: entry[k] for k in ("kind", "pixel_size") if k in entry}}
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
            **stages,
        )
    if not datasets:
        raise InputError(None, "the config lists no datasets (keys 'datasets' or 'datasets_glob')")
    return PipelineConfig(results=config.get("results", "results"), datasets=datasets, demo=demo)


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
