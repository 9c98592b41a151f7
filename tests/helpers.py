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


def random_gate(k: int, y, seed: int = 0, hidden: int = 8) -> dict:
    """A gate (``models.MixGate`` of k features, exported for ``filters.mix_gate_predict``)
    of random weights -- its MLP's last layer too, so no trained state hides a leak."""
    from emdenoise.models import MixGate

    g = torch.Generator().manual_seed(seed)
    weights = []
    for _ in (0, 1):
        net = MixGate(k, hidden, g)
        with torch.no_grad():
            net.l3.weight.normal_(0.0, 0.3, generator=g)
            net.l3.bias.normal_(0.0, 0.3, generator=g)
        weights.append(net.export())
    return {"scale": [float(y.mean()), float(y.std())], "structure": [0.0, 2.0, 1e-6], "hidden": hidden,
            "weights": weights}
