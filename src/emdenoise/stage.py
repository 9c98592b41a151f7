"""Running a pipeline stage from a Snakemake ``script:``: logging and clean errors.

A script does ``stage.run(snakemake, main)``; ``main(snakemake)`` does the work. Bad input
(:class:`emdenoise.errors.InputError`) ends the job with one line naming the file and
the problem, in the rule's log and on stderr, instead of a traceback.
"""
from __future__ import annotations

import logging
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
