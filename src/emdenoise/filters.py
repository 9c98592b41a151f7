"""Classical filters: Gaussian baselines (WCVD paper, section 4.3).

All functions take and return ``(T, Y, X)`` float32 stacks; sigmas are in pixels
(spatial) and frames (temporal).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def gaussian2d(stack: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian filter of each frame on its own (no temporal mixing).

    stack: (T, Y, X) array; sigma in pixels. Returns float32 (T, Y, X).
    Borders are reflected, so no wrap-around from the opposite edge.
    """
    stack = np.asarray(stack, dtype=np.float32)
    return ndimage.gaussian_filter(stack, sigma=(0.0, sigma, sigma), mode="reflect").astype(np.float32)


def gaussian3d(stack: np.ndarray, sigma: float | tuple[float, float, float] = 1.0) -> np.ndarray:
    """Gaussian filter over time and space, sigma = (t, y, x) or one value for all.

    stack: (T, Y, X) array; sigma in frames / pixels. Returns float32 (T, Y, X).
    """
    stack = np.asarray(stack, dtype=np.float32)
    sig = (float(sigma),) * 3 if np.isscalar(sigma) else tuple(float(s) for s in sigma)
    return ndimage.gaussian_filter(stack, sigma=sig, mode="reflect").astype(np.float32)
