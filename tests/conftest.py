"""Shared fixtures: small synthetic movies (fast, deterministic) and the real Au movie.

Synthetic fixtures are session-scoped and must not be modified in place by tests
(copy first). Sizes are kept small so the whole suite stays fast on 2 CPU cores.
"""
from __future__ import annotations

import os

# Two shared cores: OpenBLAS threads spin against other processes and made the small
# matrix products of the drift registration ~6x slower. Must precede numpy's import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from emdenoise.synthetic import simulate_movie  # noqa: E402

#: The real in-situ Au movie (SHINE), beside the repository at ../shared/data; read-only.
AU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "au_graphene_liquid_cell"


@pytest.fixture(scope="session")
def counting_movie():
    """Counting mode, 1 count/px, 12 frames of 160x160 px, drift up to 8 px."""
    return simulate_movie(12, (160, 160), mode="counting", dose=1.0, max_drift=8.0, seed=0)


@pytest.fixture(scope="session")
def static_counting_movie():
    """Counting mode, 2 counts/px, 16 frames of 128x128 px, no drift, static specimen."""
    return simulate_movie(16, (128, 128), mode="counting", dose=2.0, max_drift=0.0, seed=2)


@pytest.fixture(scope="session")
def linear_movie():
    """Linear detector (gain 100, offset 100, read noise 5, PSF sigma 1 px), 6 frames of
    128x128 px, no drift: spatially correlated noise."""
    return simulate_movie(6, (128, 128), mode="linear", psf_sigma=1.0, max_drift=0.0, seed=1)


def load_au_frames(n: int = 4) -> np.ndarray:
    """First ``n`` frames of the real Au movie as (n, 512, 512) float32; skips the test
    when ../shared/data is not there."""
    files = sorted(AU_DIR.glob("*.tif")) if AU_DIR.is_dir() else []
    if len(files) < n:
        pytest.skip(f"real data not found at {AU_DIR}")
    tifffile = pytest.importorskip("tifffile")
    return np.stack([tifffile.imread(f) for f in files[:n]]).astype(np.float32)


@pytest.fixture(scope="session")
def au_frames():
    """First 4 frames of the real Au movie (skip if ../shared/data is missing)."""
    return load_au_frames(4)
