"""Blindness audit: every model x every inference path x every frame index, random weights.

For output frame t and pixel p, changing the input pixels of frame t inside the model's
blind window around p (the pixel itself for WCVD / WCID, the blindspot x blindspot square
for SHINE) must leave output (t, p) unchanged -- at the first and last frames, at 1 and
T-2 (where mirrored windows used to repeat the centre frame), and everywhere between --
in whole-array inference, chunked Zarr inference with small tiles, and the tiled
tilt-series path.  Each check also asserts that the change *is* seen just outside the
blind window, so the audit cannot pass by looking at nothing.  The last tests show the
audit fails on the old edge handling (windows mirrored about frame 0) and that frames
smaller than the receptive field are refused instead of wrapped onto themselves.
"""
import numpy as np
import pytest
import torch

import emdenoise.chunked as chunked
import emdenoise.infer as infer
import emdenoise.tiling as tiling
from emdenoise import io
from emdenoise.config import SHINEParams, WCVDParams
from emdenoise.errors import InputError
from emdenoise.models import build_any

CKPT = {"normalisation": {"offset": 1.0, "scale": 4.0}}
T = 9  # frames 0..3 and 5..8 use mirrored windows; reaches over 4 frames also periodic ones
SHINE_TINY = dict(channels=6, centre_channels=4, neighbour_channels=3, blocks=2, head_layers=1)

MODELS = (
    [pytest.param(WCVDParams(kt=kt, ks=(3, 5)), id=f"wcvd-kt{kt}") for kt in (3, 5, 7, 9)]
    + [pytest.param(WCVDParams(dims=2, ks=(3, 5)), id="wcid")]
    # temporal context channels (means without the centre frame) and wider blind spots
    + [pytest.param(WCVDParams(context=2, ks=(3, 5)), id="wcvd-ctx2"),
       pytest.param(WCVDParams(context=4, blindspot=3, ks=(3, 5)), id="wcvd-ctx4-b3"),
       pytest.param(WCVDParams(kt=5, context=1, blindspot=5, ks=(3, 7)), id="wcvd-kt5-ctx1-b5"),
       # reaches beyond half the movie: windows continue periodically past the mirror image
       pytest.param(WCVDParams(context=6, blindspot=3, ks=(3, 5)), id="wcvd-ctx6-b3"),
       pytest.param(WCVDParams(context=T - 1, ks=(3,)), id="wcvd-ctx-whole-movie")]
    + [pytest.param(SHINEParams(blindspot=b, frames=5, **SHINE_TINY), id=f"shine-b{b}") for b in (1, 3, 5, 7, 9)]
    + [pytest.param(SHINEParams(blindspot=3, frames=f, **SHINE_TINY), id=f"shine-f{f}") for f in (3, 7)]
)


def random_model(params, seed=0):
    """The model with every weight replaced by random values (blind masks kept): a
    generic network, not the structured initialisation."""
    m = build_any(params, seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + 0.05)
    return m.eval()


def _size(params) -> int:
    return 2 * params.halo_s + 9  # just wider than the receptive field


def _paths(model, tmp_path):
    """name -> function(stack) -> (T, Y, X) output, for the three inference paths."""
    def whole(stack):
        return infer.denoise(model, CKPT, stack, device="cpu", batch_frames=3)

    def chunk(stack):
        src, dst = tmp_path / "src.zarr", tmp_path / "dst.zarr"
        for p in (src, dst):
            if p.exists():
                import shutil
                shutil.rmtree(p)
        io.write_zarr(src, stack, chunks=(2, 8, 8))
        n = stack.shape[1]
        chunked.infer_zarr(model, CKPT, src, dst, device="cpu", tile=(4, n // 2 + 1, n - 5), workers=1,
                           progress=False)
        return io.read_zarr(dst)[0][:]

    def tiled(stack):
        n = stack.shape[1]
        return infer.denoise_tiled(model, CKPT, stack, tile=n // 2 + 4, overlap=6, device="cpu", batch_frames=4)

    return {"whole": whole, "chunked": chunk, "tiled": tiled}


def audit(model, run, n, rng) -> list[str]:
    """Perturb frame t inside the blind window around p, for every t; return the leaks."""
    params = model.params
    b = params.blind_radius
    stack = rng.poisson(3.0, (T, n, n)).astype(np.float32)
    base = run(stack)
    p = (n // 2, n // 2 - 1)
    leaks = []
    for t in range(T):
        moved = stack.copy()
        moved[t, p[0] - b:p[0] + b + 1, p[1] - b:p[1] + b + 1] += rng.uniform(20, 40, (2 * b + 1, 2 * b + 1))
        out = run(moved)
        if not np.isclose(out[t, p[0], p[1]], base[t, p[0], p[1]], rtol=1e-5, atol=1e-5):
            leaks.append(f"frame {t}: output at p moved {base[t, p[0], p[1]]:.6g} -> {out[t, p[0], p[1]]:.6g}")
        # the perturbation is visible outside the blind window (the check can see a change)
        ring = np.abs(out[t] - base[t])
        ring[p[0] - b:p[0] + b + 1, p[1] - b:p[1] + b + 1] = 0
        assert ring.max() > 1e-4, f"frame {t}: the perturbation changed nothing; the audit would be vacuous"
    return leaks


@pytest.mark.parametrize("path", ["whole", "chunked", "tiled"])
@pytest.mark.parametrize("params", MODELS)
def test_blind_on_every_frame_and_path(params, path, tmp_path):
    model = random_model(params)
    leaks = audit(model, _paths(model, tmp_path)[path], _size(params), np.random.default_rng(1))
    assert not leaks, f"{type(model).__name__} {params} leaks its own pixel ({path}): " + "; ".join(leaks)


def _old_window_index(start, stop, n, halo):
    """The edge handling before the fix: the movie extended by reflection about frame 0."""
    idx = np.pad(np.arange(n), halo, mode="reflect")
    return np.stack([idx[t:t + 2 * halo + 1] for t in range(start, stop)])


@pytest.mark.parametrize("path", ["whole", "chunked", "tiled"])
def test_the_audit_fails_on_windows_mirrored_about_frame_zero(path, tmp_path, monkeypatch):
    for mod in (infer, chunked, tiling):
        monkeypatch.setattr(mod, "window_index", _old_window_index)
    params = SHINEParams(blindspot=3, **SHINE_TINY)
    model = random_model(params)
    leaks = audit(model, _paths(model, tmp_path)[path], _size(params), np.random.default_rng(1))
    assert [s.split(":")[0] for s in leaks] == ["frame 1", f"frame {T - 2}"]


@pytest.mark.parametrize("path", ["whole", "chunked", "tiled"])
def test_frames_smaller_than_the_receptive_field_are_refused(path, tmp_path):
    params = SHINEParams(blindspot=3)  # the paper's network: receptive field 2 * 37 + 1 px
    model = random_model(params)
    stack = np.random.default_rng(0).poisson(3.0, (T, 24, 24)).astype(np.float32)
    with pytest.raises(InputError, match="too small"):
        _paths(model, tmp_path)[path](stack)
    assert not (tmp_path / "dst.zarr").exists()
