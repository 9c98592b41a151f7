"""Running a pipeline stage from a Snakemake ``script:``: logging and clean errors.

A script does ``stage.run(snakemake, main)``; ``main(snakemake)`` does the work. Bad input
(:class:`emdenoise.errors.InputError`) ends the job with one line naming the file and
the problem, in the rule's log and on stderr, instead of a traceback.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from .errors import InputError

log = logging.getLogger("emdenoise")


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to ``log_path`` (the rule's ``log:`` file)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def run(smk: Any, main: Callable[[Any], None]) -> None:
    """Run ``main(smk)`` with logging set up; exit 1 with one clear line on bad input."""
    setup_logging(smk.log[0] if len(smk.log) else None)
    name = getattr(smk, "rule", "stage")
    wildcards = dict(smk.wildcards.items()) if hasattr(smk.wildcards, "items") else {}
    log.info("start %s %s", name, wildcards)
    t0 = time.perf_counter()
    try:
        main(smk)
    except InputError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except Exception:  # a bug, not bad input: keep the traceback in the rule's log file too
        log.exception("%s failed", name)
        raise
    log.info("done %s in %.1f s", name, time.perf_counter() - t0)


# --------------------------------------------------------------------------- resources
def stack_megabytes(path) -> float:
    """What a stack at ``path`` occupies in memory as float32, in MB (1e6 bytes).

    A Zarr store: exactly, from the shape in its ``zarr.json`` (the store on disk is
    compressed and says nothing about memory).  Any other file, or a folder of frame
    files: twice its size on disk (16-bit detector data become float32; compressed or
    8-bit files are underestimated, float32 files overestimated).  Missing: 0.
    """
    import json
    import math
    import os

    path = os.fspath(path)
    meta = os.path.join(path, "zarr.json")
    if os.path.isfile(meta):
        with open(meta) as fh:
            node = json.load(fh)
        if node.get("node_type") == "group":  # OME-Zarr: the full-resolution array of its multiscales
            ms = node.get("attributes", {}).get("ome", {}).get("multiscales") or [{}]
            first = (ms[0].get("datasets") or [{"path": "0"}])[0].get("path", "0")
            return stack_megabytes(os.path.join(path, first))
        return 4.0 * math.prod(node.get("shape") or []) / 1e6
    if os.path.isdir(path):
        return 2.0 * sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6
    return 2.0 * os.path.getsize(path) / 1e6 if os.path.isfile(path) else 0.0


def job_memory_mb(stacks_mb: float, copies: float, base_mb: int = 1000, attempt: int = 1) -> int:
    """``mem_mb`` of a workflow job: ``base_mb`` (interpreter, torch, buffers) plus
    ``copies`` float32 copies of its input stacks (``stacks_mb``, :func:`stack_megabytes`),
    doubled on every retry (``attempt`` 1, 2, ...) so a job killed for memory gets more."""
    return int(math.ceil((base_mb + copies * stacks_mb) * 2 ** (max(1, int(attempt)) - 1)))


def job_runtime_min(stacks_mb: float, minutes: float, per_gb: float = 0.0, attempt: int = 1) -> int:
    """``runtime`` (minutes) of a workflow job: ``minutes`` plus ``per_gb`` minutes per GB
    (1e9 bytes) of its input stacks as float32 (``stacks_mb``, :func:`stack_megabytes`),
    doubled on every retry so a job killed at its time limit gets twice as long."""
    return int(math.ceil((minutes + per_gb * stacks_mb / 1e3) * 2 ** (max(1, int(attempt)) - 1)))


def disk_usage(path) -> tuple[int, int]:
    """(bytes on disk, files) of a file or a folder tree: allocated blocks (st_blocks x
    512, what quotas count) where the filesystem reports them, else the file sizes;
    0, 0 for a missing path."""
    import os
    from pathlib import Path

    def one(st) -> int:
        blocks = getattr(st, "st_blocks", None)
        return int(blocks) * 512 if blocks is not None else int(st.st_size)

    p = Path(path)
    if not p.exists():
        return 0, 0
    if p.is_file():
        return one(p.stat()), 1
    total = files = 0
    for root, _, names in os.walk(p):
        for name in names:
            try:
                total += one(os.stat(os.path.join(root, name)))
                files += 1
            except FileNotFoundError:  # removed meanwhile (a temp() output)
                pass
    return total, files


def gpus_visible() -> bool:
    """Whether jobs on this machine may use a CUDA GPU, decided without importing torch
    (for the workflow's `gpu` resource): ``EMDENOISE_GPU`` = 0 / 1 decides when set; else
    ``CUDA_VISIBLE_DEVICES`` set to '' or '-1' means none; else an NVIDIA device node
    (/dev/nvidia0, /dev/nvidia1, ...) means yes."""
    import glob
    import os

    forced = os.environ.get("EMDENOISE_GPU")
    if forced is not None and forced.strip() != "":
        return forced.strip() not in ("0", "false", "no")
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))
