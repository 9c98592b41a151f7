"""The one exception type users see for bad input."""
from __future__ import annotations

import os


class InputError(ValueError):
    """Bad input data or configuration.

    The message always names the offending file (or config key) and the problem, so
    that the pipeline can print it as a single line without a traceback.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class DiskFullError(InputError):
    """An output could not be written because its file system is full (ENOSPC/EDQUOT).

    The message names the output path and says "no space left on device"; the writer has
    already removed its temporary output.
    """

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(path, "no space left on device" + (f" ({detail})" if detail else ""))
