"""The Gaussian mix: the third classical filter of `model: auto` (emdenoise.filters.blind_gaussian_mix /
gaussian_mix_apply, chosen by emdenoise.pipeline.classical_candidate)."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from emdenoise import filters, metrics, pipeline
from emdenoise.errors import InputError
from emdenoise.synthetic import simulate_scene
from helpers import random_gate


@pytest.fixture(scope="module")
def dynamic():
    """A 40 x 112² counting movie (4 e-/px) whose particles move, grow and dissolve."""
    return simulate_scene(40, (112, 112), dose=4.0, dynamic=True, seed=7)


@pytest.fixture(scope="module")
def mixed(dynamic):
    y = dynamic.noisy.astype(np.float32)
    return filters.blind_gaussian_mix(y, 0, noise_variance=metrics.frame_difference_variance(y))


@pytest.fixture(scope="module")
def blind_fits(dynamic, mixed):
    """Fits of blind radius 0 (the default mix) and 2 (correlated noise's extra radius)."""
    y = dynamic.noisy.astype(np.float32)
    return {0: mixed.fit, 2: filters.blind_gaussian_mix(y, 2, classes=(1, 2), noise_variance=4.0, output="none").fit}


def _assert_blind(y, fit: dict, b: int, t: int, tol: float, rel: float) -> float:
    """With the fit fixed, output (t, p) of the J-invariant mix does not change (within
    ``tol``) when the input changes anywhere within b px of p on frame t, and does change
    when a pixel just outside does (so the check can fail); the denoised output gives the
    pixel back its own value with the recorded weight (returned)."""
    ref, _ = filters.gaussian_mix_apply(y, fit, output="jinv")
    py, px = 50, 61
    inside = y.copy()
    inside[t, py - b:py + b + 1, px - b:px + b + 1] += 40.0
    out, _ = filters.gaussian_mix_apply(inside, fit, output="jinv")
    assert out[t, py, px] == pytest.approx(ref[t, py, px], abs=tol)
    assert np.abs(out[t] - ref[t]).max() > 0.1  # its neighbours do see the change
    outside = y.copy()
    outside[t, py, px + b + 1] += 40.0
    out, _ = filters.gaussian_mix_apply(outside, fit, output="jinv")
    assert abs(out[t, py, px] - ref[t, py, px]) > 1e-2
    den, _ = filters.gaussian_mix_apply(inside, fit)
    den_ref, _ = filters.gaussian_mix_apply(y, fit)
    w = fit["own_pixel"]["weight"]
    assert den[t, py, px] - den_ref[t, py, px] == pytest.approx(40.0 * w, rel=rel)
    return w


@pytest.mark.parametrize("b", [0, 2])
@pytest.mark.parametrize("t", [0, 7, 39])  # first, interior and last frame
def test_the_blind_mix_never_sees_its_own_pixels(dynamic, blind_fits, b, t):
    """Blind radius b: frame t within b px of p never reaches output (t, p) of the J-invariant
    mix; up to float32 rounding: f_J = (G * y - masked part) / (its weight), as in the tuned
    Gaussian."""
    w = _assert_blind(dynamic.noisy.astype(np.float32), blind_fits[b], b, t, tol=1e-4, rel=1e-3)
    assert 0.0 < w < 0.2


def test_the_mix_loss_is_its_mse_plus_the_noise_variance(dynamic, mixed):
    """Noise2Self with cross-fitted coefficients: the loss estimates the blind mix's MSE
    against the truth + the noise variance, so it can be compared with the other candidates'."""
    y = dynamic.noisy.astype(np.float32)
    x = dynamic.clean.astype(np.float64)
    blind, sums = filters.gaussian_mix_apply(y, mixed.fit, output="jinv", loss=True)
    np.testing.assert_allclose(sums / (112 * 112), mixed.loss_frames, rtol=1e-9)
    np.testing.assert_allclose(mixed.loss_frames, metrics.self_supervised_loss_per_frame(blind, y), rtol=1e-5)
    mse, noise = np.mean((blind - x) ** 2), np.mean((y - x) ** 2)
    assert mixed.loss == pytest.approx(mse + noise, rel=2e-3)
    assert mixed.fit["classes"] in (1, 2, 4, 8) and set(mixed.fit["class_losses"]) == {"1", "2", "4", "8"}
    assert mixed.loss == pytest.approx(min(mixed.fit["class_losses"].values()))


def test_the_mix_beats_the_best_gaussian_chosen_with_the_truth(dynamic, mixed):
    """What it is for: on a dynamic scene with lattice fringes the mix (tuned without the
    truth) is above every Gaussian 3D of the blind grid scored against the truth
    (measured: 29.49 vs 28.50 dB)."""
    y = dynamic.noisy.astype(np.float32)
    best = max(metrics.psnr(filters.normalised_gaussian3d(y, s_t, s_yx), dynamic.clean)
               for s_t in filters.BLIND_SIGMAS_T for s_yx in filters.BLIND_SIGMAS_YX)
    assert metrics.psnr(mixed.denoised, dynamic.clean) > best + 0.5
    g = filters.blind_gaussian3d(y, 0, output="none")
    assert mixed.loss < g.loss  # and the loss says so


def test_the_mix_does_not_depend_on_the_tiles_and_streams_into_zarr(tmp_path, dynamic, mixed):
    y = dynamic.noisy.astype(np.float32)
    out = zarr.create_array(str(tmp_path / "mix.zarr"), shape=y.shape, chunks=(40, 48, 48), dtype="float32")
    again = filters.blind_gaussian_mix(y, 0, noise_variance=metrics.frame_difference_variance(y), tile=48, out=out)
    assert again.fit == mixed.fit  # same data, same numbers (the fit does not see the output's tiles)
    np.testing.assert_allclose(np.asarray(out[:]), mixed.denoised, rtol=1e-6, atol=1e-5)
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=y.shape, chunks=(40, 32, 32), dtype="float32")
    src[:] = y  # a lazy input, read by tiles
    blind, _ = filters.gaussian_mix_apply(src, mixed.fit, output="jinv")
    ref, _ = filters.gaussian_mix_apply(y, mixed.fit, output="jinv")
    np.testing.assert_array_equal(blind, ref)


def test_small_movies_choose_fewer_classes():
    """Few pixels cannot afford 8 x 29 coefficients: the cross-fitted loss picks fewer."""
    m = simulate_scene(24, (96, 96), dose=4.0, dynamic=True, seed=7)
    r = filters.blind_gaussian_mix(m.noisy.astype(np.float32), 0, output="none")
    assert r.fit["classes"] <= 2 and r.fit["class_losses"]["8"] > r.loss


def test_the_classical_candidate_takes_the_mix_when_significantly_lower(dynamic):
    y = dynamic.noisy.astype(np.float32)
    den, attrs = pipeline.classical_candidate(y, 0, nlm=False)
    assert attrs["filter"] == "gaussian_mix" and attrs["mix"]["chosen"] and attrs["mix"]["z"] < -2
    assert attrs["n2s_loss"] == attrs["mix"]["n2s_loss"] < attrs["gaussian"]["n2s_loss"]
    assert attrs["temporal_reach"] == attrs["mix"]["fit"]["reach"] == filters.gaussian_reach(32.0)
    # reaching past what uMSE can check (14 frames of 40) only because it is significantly better
    rc = attrs["mix"]["fit"]["reach_choice"]
    assert rc["preferred_reach"] == metrics.checkable_reach(40) == 14 and rc["z"] < -2
    assert metrics.psnr(den, dynamic.clean) > metrics.psnr(
        filters.normalised_gaussian3d(y, *attrs["gaussian"]["sigma"][:2]), dynamic.clean) + 0.5
    blind = pipeline.classical_blind(y, attrs)  # the recorded blind version is the one scored
    assert metrics.self_supervised_loss(blind, y) == pytest.approx(attrs["n2s_loss"], rel=1e-6)
    g = attrs["mix"]["gate"]  # the gate was fitted, and kept only when significantly lower
    assert g["chosen"] == (g["z"] is not None and g["z"] < -metrics.SELECT_MIN_Z) == ("gate" in attrs["mix"]["fit"])
    assert attrs["mix"]["n2s_loss"] == min(attrs["mix"]["classes_loss"], g["n2s_loss"]) or not g["chosen"]
    said = metrics.mix_sentence(attrs["mix"])
    assert said.startswith(f"Gaussian mix ({len(attrs['mix']['fit']['sigmas'])} Gaussians x ")
    assert said.endswith("against the tuned Gaussian: chosen over the Gaussian")
    _, off = pipeline.classical_candidate(y, 0, nlm=False, mix=False)
    assert off["filter"] == "gaussian3d" and off["mix"] == {"skipped": "off"}
    assert metrics.mix_sentence(off["mix"]) == "Gaussian mix not tried (off)"


def test_the_mix_refuses_what_it_cannot_fit():
    rng = np.random.default_rng(0)
    y = rng.poisson(2.0, (6, 32, 32)).astype(np.float32)
    with pytest.raises(InputError, match="at least 2 frames"):
        filters.blind_gaussian_mix(y[:1], 0)
    with pytest.raises(InputError, match="classes must be"):
        filters.blind_gaussian_mix(y, 0, classes=(2, 3))
    with pytest.raises(InputError, match="output must be"):
        filters.blind_gaussian_mix(y, 0, output="blind")
    with pytest.raises(InputError, match="keeps"):
        filters.blind_gaussian_mix(y, 3, sigmas_t=(0.0,), sigmas_yx=(0.5,))
    _, attrs = pipeline.classical_candidate(np.full((4, 16, 16), 3.0, np.float32), 0)
    assert attrs["filter"] == "gaussian3d" and "no measurable noise" in attrs["mix"]["skipped"]
    _, attrs = pipeline.classical_candidate(y, 0, nlm=False)  # too small for a gate: the class mix
    assert "6 x 32" not in attrs["mix"]["gate"]["skipped"] and "sampled pixels" in attrs["mix"]["gate"]["skipped"]
    assert "gate" not in attrs["mix"]["fit"] and attrs["mix"]["n2s_loss"] == attrs["mix"]["classes_loss"]
    assert pipeline.classical_candidate(y, 0, nlm=False, gate=False)[1]["mix"]["gate"] == {"skipped": "off"}


def test_the_mix_keeps_to_the_checkable_reach_unless_reaching_further_is_significantly_better(dynamic):
    """The networks' rule for their temporal reach (pipeline.choose_reach), so that uMSE can score
    the output: the dictionary without the Gaussians reaching past ``preferred_reach`` is
    fitted from the same normal equations and kept unless the whole one is lower by min_z."""
    y = dynamic.noisy.astype(np.float32)
    var = metrics.frame_difference_variance(y)
    kept = filters.blind_gaussian_mix(y, 0, classes=(1, 2), noise_variance=var, preferred_reach=14, min_z=1e9,
                                      output="none")
    assert max(s for s, _ in kept.fit["sigmas"]) == 4.0 and kept.fit["classes"] == 2  # 2 sigma_t <= 14
    assert kept.fit["reach"] == 14 and kept.fit["structure_sigma_t"] == 7.0  # the classes' map keeps within it
    assert kept.fit["reach_choice"]["reaches"] == [8, 14, 64] and kept.fit["reach_choice"]["z"] < -2
    far = filters.blind_gaussian_mix(y, 0, classes=(1, 2), noise_variance=var, preferred_reach=14, output="none")
    assert far.fit["reach"] == 64 and far.loss < kept.loss
    # the blind version of the shorter dictionary is the one scored
    blind, sums = filters.gaussian_mix_apply(y, kept.fit, output="jinv", loss=True)
    np.testing.assert_allclose(sums / y[0].size, kept.loss_frames, rtol=1e-9)
    assert filters.blind_gaussian_mix(y, 0, classes=1, preferred_reach=100, output="none").fit["reach_choice"][
        "reaches"] == [64]


def test_the_mix_reach_counts_the_frames_its_classes_read(dynamic):
    """Output frame t depends on every frame the structure map of frame t averages (its
    classes pick the coefficients), not only on the dictionary's Gaussians: the recorded
    reach is the longer of the two (the map keeps within the preferred reach), and a frame
    just past it changes nothing."""
    y = dynamic.noisy.astype(np.float32)
    fit = filters.blind_gaussian_mix(y, 0, sigmas_t=(0.0, 1.0, 2.0), classes=2, preferred_reach=14,
                                     output="none").fit
    assert fit["classes"] == 2 and max(filters.gaussian_reach(s) for s, _ in fit["sigmas"]) == 4
    assert fit["structure_sigma_t"] == 7.0 and fit["reach"] == filters.mix_reach(fit) == 14
    assert filters.mix_reach({**fit, "classes": 1}) == 4 and filters.mix_reach({**fit, "classes": 1, "gate": {"k": 1}}) == 14
    t = 12
    base = filters.gaussian_mix_apply(y, fit)[0][t]
    stripes = np.zeros(y.shape[1:], np.float32)
    stripes[30:80, 30:80:2] = 40.0  # strong fringes: a high-structure patch in one frame

    def changed(lag):
        z = y.copy()
        z[t + lag] += stripes
        return np.abs(filters.gaussian_mix_apply(z, fit)[0][t] - base).max() > 1e-4

    assert changed(10) and changed(14) and not changed(15) and not changed(25)


def test_max_reach_cuts_the_mix(dynamic):
    """model.max_reach: no Gaussian and no structure map past it; 0 leaves one class and no gate."""
    y = dynamic.noisy.astype(np.float32)
    cut = filters.blind_gaussian_mix(y, 0, classes=(1, 2), max_reach=6, preferred_reach=14, output="none")
    assert max(filters.gaussian_reach(s) for s, _ in cut.fit["sigmas"]) <= 6 and cut.fit["structure_sigma_t"] == 3.0
    assert cut.fit["reach"] <= 6 and max(cut.fit["reach_choice"]["reaches"]) <= 6
    zero = filters.blind_gaussian_mix(y, 0, max_reach=0, output="none", samples=filters.MIX_GATE_SAMPLES)
    assert zero.fit["classes"] == 1 and zero.fit["reach"] == 0 and zero.samples is None


def test_the_mix_is_blind_to_more_than_the_noise_stage_where_the_noise_is_correlated():
    """Linear mode (PSF-correlated noise): the mix's blind radius is the noise stage's + 2 px
    (filters.MIX_EXTRA_BLIND; what the noise stage leaves outside, a least-squares mix of 28
    filters exploits); white counting noise keeps 0."""
    from emdenoise.noise import estimate_blindspot

    assert filters.mix_blind_radius(0) == 0 and filters.mix_blind_radius(3) == 3 + filters.MIX_EXTRA_BLIND
    m = simulate_scene(16, (64, 64), mode="linear", dose=2.0, psf_sigma=1.0, seed=3)
    y = m.noisy.astype(np.float32)
    b = estimate_blindspot(y)["blindspot"] // 2
    assert b > 0
    _, attrs = pipeline.classical_candidate(y, b, nlm=False)
    assert attrs["mix"]["fit"]["blind_radius"] == b + filters.MIX_EXTRA_BLIND and attrs["blind_radius"] == b


# ------------------------------------------------------------------------------ the gate

@pytest.mark.parametrize("b", [0, 2])
@pytest.mark.parametrize("t", [0, 7, 39])  # first, interior and last frame
def test_the_gated_mix_never_sees_its_own_pixels(tmp_path, dynamic, blind_fits, b, t):
    """The gate mixes blind outputs pixel by pixel, so with any weights (random here) output
    (t, p) does not change when frame t changes within b px of p, and does change when a
    pixel just outside does (so the test can fail); the NumPy forward pass that applies
    it is the torch module's, and the tiles do not change it."""
    import torch

    from emdenoise.models import MixGate

    y = dynamic.noisy.astype(np.float32)
    fit = {**blind_fits[b], "gate": random_gate(len(blind_fits[b]["sigmas"]), y, seed=b + t)}
    _assert_blind(y, fit, b, t, tol=1e-3, rel=1e-2)
    # NumPy (filters.mix_gate_predict) == torch (models.MixGate) on the same inputs
    rng = np.random.default_rng(t)
    feats = rng.normal(y.mean(), y.std(), (500, len(fit["sigmas"]))).astype(np.float32)
    struct = rng.uniform(0.01, 10.0, 500)
    gate = fit["gate"]
    f, x = filters.mix_gate_inputs(gate, feats, struct)
    net = MixGate.from_export(gate["weights"][1], gate["hidden"])
    with torch.no_grad():
        want = net(torch.from_numpy(f), torch.from_numpy(x)).double().numpy() * gate["scale"][1] + gate["scale"][0]
    np.testing.assert_allclose(filters.mix_gate_predict(gate, 1, feats, struct), want, rtol=1e-4, atol=1e-3)
    src = zarr.create_array(str(tmp_path / "in.zarr"), shape=y.shape, chunks=(40, 32, 32), dtype="float32")
    src[:] = y
    np.testing.assert_array_equal(filters.gaussian_mix_apply(src, fit, output="jinv")[0],
                                  filters.gaussian_mix_apply(y, fit, output="jinv")[0])


@pytest.fixture(scope="module")
def gated(dynamic):
    from emdenoise import train

    y = dynamic.noisy.astype(np.float32)
    r = filters.blind_gaussian_mix(y, 0, noise_variance=metrics.frame_difference_variance(y), output="none",
                                   samples=filters.MIX_GATE_SAMPLES)
    return r, train.fit_mix_gate(r.samples, steps=500)


def test_the_gate_is_fitted_across_parities_so_its_loss_is_its_mse_plus_the_noise(dynamic, mixed, gated):
    """Frame t's gate is fitted on the frames of the other parity (and its step chosen on
    frame t's parity, as a network's epoch on validation frames): the loss of the gated
    blind mix is still an unbiased estimate of its MSE + the noise variance."""
    from emdenoise import train

    y = dynamic.noisy.astype(np.float32)
    x = dynamic.clean.astype(np.float64)
    r, gate = gated
    assert r.fit == mixed.fit  # sampling does not change the mix
    assert r.samples["features"].shape == (y.size, len(r.fit["sigmas"]))  # every pixel of a small movie
    blind, sums = filters.gaussian_mix_apply(y, {**r.fit, "gate": gate}, output="jinv", loss=True)
    loss = float(sums.sum() / y.size)
    assert loss == pytest.approx(metrics.self_supervised_loss(blind, y), rel=1e-6)
    assert loss == pytest.approx(np.mean((blind - x) ** 2) + np.mean((y - x) ** 2), rel=2e-3)
    for p in (0, 1):  # the least-squares start is measured first; the kept step is the lowest measured
        held = gate["held_out"][p]
        assert gate["steps"][p] == train.GATE_EVAL_EVERY * int(np.argmin(held)) and min(held) <= held[0]
    assert train.fit_mix_gate(r.samples, steps=500) == gate  # same samples, same gate (CPU)
    import torch

    before = torch.get_num_threads()  # the workflow job's threads while fitting, then torch's again
    assert train.fit_mix_gate(r.samples, steps=1, threads=1)["steps"] in ([0, 0], [0, 1], [1, 0], [1, 1])
    assert torch.get_num_threads() == before
    few = {k: v[:2 * train.GATE_MIN_PIXELS - 10] for k, v in r.samples.items()}
    with pytest.raises(InputError, match="sampled pixels of each frame parity"):
        train.fit_mix_gate(few)


def test_the_gated_mix_blind_output_is_recovered_from_its_output(dynamic, gated):
    """The ensemble's classical member (pipeline.classical_blind_stack): a gated mix's
    output gives its pixel back with weight w on the same cross-fitted blind output, so
    (out - w y) / (1 - w) is that blind output (float32 rounding apart) -- no pass of the
    filter; without a gate it takes the pass (pipeline.classical_blind)."""
    y = dynamic.noisy.astype(np.float32)
    r, gate = gated
    fit = {**r.fit, "gate": gate, "own_pixel": {**r.fit["own_pixel"], "weight": 0.3}}
    attrs = {"filter": "gaussian_mix", "mix": {"fit": fit}}
    out, _ = filters.gaussian_mix_apply(y, fit)
    jinv, _ = filters.gaussian_mix_apply(y, fit, output="jinv")
    back = pipeline.classical_blind_stack(y, attrs, output=out)
    assert isinstance(back, pipeline.Reblinded)
    np.testing.assert_allclose(np.asarray(back), jinv, rtol=1e-5, atol=1e-5 * float(np.abs(jinv).max()))
    plain = {"filter": "gaussian_mix", "mix": {"fit": r.fit}}  # classes: the output's mix is not cross-fitted
    assert np.array_equal(pipeline.classical_blind_stack(y, plain, output=out),
                          filters.gaussian_mix_apply(y, r.fit, output="jinv")[0])


def test_the_sentence_says_whether_the_gate_or_the_classes_mix():
    fit = {"sigmas": [[0.0, 1.0]] * 3, "classes": 8, "own_pixel": {"weight": 0.031}}
    gated = {"fit": {**fit, "gate": {"hidden": 32}}, "gate": {"z": -5.24, "chosen": True}, "z": -9.0, "chosen": True}
    assert metrics.mix_sentence(gated) == (
        "Gaussian mix (3 Gaussians, per-pixel coefficients from a gate (MLP, 32 hidden units) fitted on the movie, "
        "z -5.2 against 8 structure classes, own-pixel weight 0.031), z -9.0 against the tuned Gaussian: chosen over "
        "the Gaussian")
    classes = {"fit": fit, "gate": {"z": -1.0, "chosen": False}, "z": 1.5, "chosen": False}
    assert metrics.mix_sentence(classes) == ("Gaussian mix (3 Gaussians x 8 structure classes, own-pixel weight "
                                             "0.031), z +1.5 against the tuned Gaussian: not chosen")
