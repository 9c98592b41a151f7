"""Provenance: which code, settings, inputs and machine produced a dataset's results.

``provenance.json`` (one per dataset) records the config actually used, the code
version, package versions, input and output sha256, seeds, device and the start / end
times of every stage; ``verify`` recomputes the checksums months later and lists what
changed.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from . import __version__
from .config import StageConfig
from .io import atomic_path, read_stack, sha256_path

PACKAGES = ("numpy", "scipy", "scikit-image", "torch", "zarr", "dask", "tifffile", "mrcfile",
            "pandas", "snakemake",
            "rosettasciio", "h5py", "imagecodecs", "mdocfile")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def code_version() -> str:
    """``git describe`` of the source tree when it is a git checkout, else the package version."""
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return f"{__version__}+git.{out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return __version__


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stage_times(log_paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, str]]:
    """First and last time stamp of each stage log (``emdenoise.stage`` format)."""
    times = {}
    for path in log_paths:
        stamps = [m.group(1) for line in Path(path).read_text().splitlines() if (m := _STAMP.match(line))]
        if stamps:
            times[Path(path).stem] = {"start": stamps[0], "end": stamps[-1]}
    return times


def _jsonable(obj):
    if isinstance(obj, StageConfig):  # the settings a rule passed (emdenoise.config.stage_params)
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def build_record(dataset_config, *, input_path: str, input_sha256: str | None, outputs: Iterable[str],
                 logs: Iterable[str], model_info: dict | None = None, acquisition: dict | None = None) -> dict:
    """The provenance dict of one dataset (see module docstring).

    dataset_config: DatasetConfig, or the StageConfig of all its sections that the
    provenance rule passes; recorded in full under "config".
    acquisition: what the input file recorded and ingest kept (format, pixel size in Å and
    where it came from, frame time s, exposure, dose, tilt angles, EER grouping);
    recorded under "input".
    """
    return {
        "dataset": dataset_config.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "packages": package_versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "workdir": os.getcwd(),
        "config": _jsonable(dataset_config),
        "input": {"path": os.path.abspath(input_path), "sha256": input_sha256,
                  **({"acquisition": _jsonable(acquisition)} if acquisition else {})},
        "model": model_info or {},
        "stages": stage_times(logs),
        "outputs": {os.fspath(p): sha256_path(p) for p in outputs},
    }


def write_record(record: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str))


def _input_sha256(path: str) -> str:
    """The input checksum exactly as ingest computed it (a folder: its frame files only)."""

    return read_stack(path)[1]["sha256"]


def verify(results_dir: str | os.PathLike) -> list[str]:
    """Recompute the checksums recorded in every ``provenance.json`` under ``results_dir``.

    Returns one line per difference (empty list: everything matches). Output paths are
    taken relative to the directory the workflow ran in (the parent of ``results``).
    """
    problems = []
    records = sorted(Path(results_dir).rglob("provenance.json"))
    if not records:
        return [f"{results_dir}: no provenance.json found"]
    for rec_path in records:
        rec = json.loads(rec_path.read_text())
        base = Path(rec.get("workdir", "."))
        src = rec["input"]
        if not os.path.exists(src["path"]):
            problems.append(f"{rec['dataset']}: input {src['path']} is missing")
        elif src.get("sha256") and _input_sha256(src["path"]) != src["sha256"]:
            problems.append(f"{rec['dataset']}: input {src['path']} changed (sha256 differs)")
        for out, digest in rec["outputs"].items():
            p = base / out
            if not p.exists():
                problems.append(f"{rec['dataset']}: output {out} is missing")
            elif sha256_path(p) != digest:
                problems.append(f"{rec['dataset']}: output {out} changed (sha256 differs)")
    return problems
