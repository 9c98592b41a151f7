"""Small helpers shared by several test modules (importable: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch

from emdenoise.models import WCVDParams, build_model


def perturbed_model(params=WCVDParams(), seed=0):
    """A WCVD whose weights are moved away from the symmetric init (centre kept at zero),
    so that tests see a generic model, not the neighbour-average initialisation."""
    m = build_model(params, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for b in m.branches:
            b.bck.weight.mul_(b.bck.mask)
    return m.eval()
