"""`model: auto`'s ensemble (emdenoise.pipeline.ensemble): the candidates' blind outputs
combined pixel by pixel.  Blind with any weights, unbiased in its loss, better than its
members where they err differently, chosen only where significantly lower."""
from __future__ import annotations

import numpy as np
import pytest

from emdenoise import filters, metrics, pipeline
from emdenoise.errors import InputError
from emdenoise.synthetic import simulate_scene
from helpers import random_gate

#: blind Gaussians (sigma_t, sigma_yx) standing in for the candidates: a short temporal
#: reach (sharp where the scene moves, noisy) and long ones (clean, blurred by motion)
MEMBERS = ((1.0, 1.0), (4.0, 0.75), (12.0, 0.5))


@pytest.fixture(scope="module")
def dynamic():
    """A 24 x 96² counting movie (4 e-/px) whose particles move, grow and dissolve."""
    return simulate_scene(24, (96, 96), dose=4.0, dynamic=True, seed=3)


def _members(y: np.ndarray, b: int = 0) -> dict:
    return {f"g{s_t}_{s_yx}": filters.normalised_gaussian3d(y, s_t, s_yx, blind_radius=b) for s_t, s_yx in MEMBERS}


@pytest.mark.parametrize("b", [0, 2])
@pytest.mark.parametrize("t", [0, 11, 23])  # first, interior and last frame
def test_the_ensemble_never_sees_its_own_pixels(dynamic, b, t):
    """Random gate weights, members blind to b px: a change of frame t within b px of p
    never reaches the ensemble's output (t, p) -- neither through the members nor through
    their disagreement (the gate's structure input) -- and a pixel just outside does."""
    y = dynamic.noisy.astype(np.float32)
    gate = random_gate(len(MEMBERS), y, seed=t + b)
    ref = pipeline.Ensembled(list(_members(y, b).values()), gate)[t]
    py, px = 40, 51
    inside = y.copy()
    inside[t, py - b:py + b + 1, px - b:px + b + 1] += 40.0
    out = pipeline.Ensembled(list(_members(inside, b).values()), gate)[t]
    assert out[py, px] == pytest.approx(ref[py, px], abs=1e-4)
    assert np.abs(out - ref).max() > 0.1  # its neighbours do see the change
    outside = y.copy()
    outside[t, py, px + b + 1] += 40.0
    out = pipeline.Ensembled(list(_members(outside, b).values()), gate)[t]
    assert abs(out[py, px] - ref[py, px]) > 1e-2


def test_the_ensemble_beats_its_members_and_its_loss_is_its_mse_plus_the_noise(dynamic):
    """Members that err differently (motion blur vs noise): the linear ensemble (few
    sampled pixels) has a lower true MSE than every member, and its cross-fitted loss is
    still MSE + noise variance (unbiased), so the selection can compare it with theirs."""
    y = dynamic.noisy.astype(np.float32)
    x = dynamic.clean.astype(np.float64)
    members = _members(y)
    rec, blind = pipeline.ensemble(members, y, samples=20_000)
    assert rec["kind"] == "linear" and rec["members"] == list(members) and min(rec["pixels"]) >= 5_000
    out = np.asarray(blind)
    mse = {m: float(np.mean((f - x) ** 2)) for m, f in members.items()}
    assert np.mean((out - x) ** 2) < 0.9 * min(mse.values()), mse
    noise = float(np.mean((y - x) ** 2))
    assert rec["n2s_loss"] == pytest.approx(np.mean((out - x) ** 2) + noise, rel=3e-3)
    assert rec["n2s_loss"] == pytest.approx(metrics.self_supervised_loss(out, y), rel=1e-6)
    assert rec["n2s_loss"] < min(metrics.self_supervised_loss(f, y) for f in members.values())
    again, _ = pipeline.ensemble(members, y, samples=20_000)
    assert again == rec  # same data, same numbers (CPU)
    # the own pixel given back lowers the error further, as for every candidate
    w = pipeline.unblind_weight(blind, y, rec["n2s_loss"])["weight"]
    own = np.asarray(pipeline.with_own_pixel(blind, y, w))
    assert 0.0 < w < 0.3 and np.mean((own - x) ** 2) < np.mean((out - x) ** 2)


def test_the_gate_replaces_the_linear_weights_on_enough_pixels(dynamic):
    """Every pixel sampled (110 000 per parity): the MLP gate is fitted, its kept step is
    the lowest held-out one (the linear start included), and its loss stays unbiased."""
    y = dynamic.noisy.astype(np.float32)
    x = dynamic.clean.astype(np.float64)
    members = _members(y)
    linear, lin_blind = pipeline.ensemble(members, y, samples=20_000)
    rec, blind = pipeline.ensemble(members, y, threads=1)
    assert rec["kind"] == "gated" and min(rec["pixels"]) == y.size // 2
    assert rec["n2s_loss"] <= linear["n2s_loss"] * 1.0005
    out = np.asarray(blind)
    assert rec["n2s_loss"] == pytest.approx(np.mean((out - x) ** 2) + np.mean((y - x) ** 2), rel=3e-3)


def test_the_ensemble_streams_from_zarr_with_the_in_memory_values(tmp_path, dynamic):
    """Members read lazily from Zarr stores give the in-memory numbers."""
    from emdenoise import io

    y = dynamic.noisy.astype(np.float32)
    members = _members(y)
    lazy = {}
    for m, f in members.items():
        io.write_zarr(tmp_path / f"{m}.zarr", f)
        lazy[m] = io.read_zarr(tmp_path / f"{m}.zarr")[0]
    rec, blind = pipeline.ensemble(members, y, samples=20_000)
    rec_z, blind_z = pipeline.ensemble(lazy, y, samples=20_000)
    assert rec_z == rec
    assert np.array_equal(np.asarray(blind_z), np.asarray(blind))


def test_the_ensemble_replaces_the_choice_only_when_significantly_lower():
    """prefer_ensemble: the rule every candidate passes (metrics.SELECT_MIN_Z against the
    choice it would replace); a tie keeps the single candidate."""
    rng = np.random.default_rng(0)
    base = 1.0 + rng.normal(0, 0.01, 30)
    frames = {"classical": base.tolist(), "wcvd": (base + 0.01).tolist()}
    choice = metrics.select_model({m: float(np.mean(v)) for m, v in frames.items()}, frames)
    assert choice["chosen"] == "classical"
    for shift, expect in ((-0.01, "ensemble"), (-1e-5, "classical")):
        ens = base + shift + rng.normal(0, 1e-4, 30)
        rec = {"members": ["wcvd", "classical"], "n2s_loss": float(ens.mean()), "n2s_loss_frames": ens.tolist(),
               "kind": "linear"}
        out = pipeline.prefer_ensemble(choice, rec, frames)
        assert out["chosen"] == expect and out["ensemble"]["versus"] == "classical"
        assert out["ensemble"]["chosen"] == (expect == "ensemble") and out["loss"]["ensemble"] == rec["n2s_loss"]
        assert ("chosen" if expect == "ensemble" else "not chosen") in metrics.ensemble_sentence(out["ensemble"])
    skipped = pipeline.prefer_ensemble(choice, {"members": [], "skipped": "no candidate"}, frames)
    assert skipped["chosen"] == "classical" and "not fitted (no candidate)" in metrics.ensemble_sentence(
        skipped["ensemble"])


def test_the_ensemble_refuses_what_it_cannot_fit(dynamic):
    y = dynamic.noisy.astype(np.float32)
    members = _members(y[:4, :8, :8])
    rec, blind = pipeline.ensemble(members, y[:4, :8, :8])
    assert blind is None and "sampled pixels" in rec["skipped"]
    with pytest.raises(InputError, match="shape"):
        pipeline.ensemble({"a": y[:, :90]}, y)
