"""The chain shared by the CLI and the workflow (emdenoise.pipeline): drift-aware
denoising keeps the output on the input's grid, auto includes the tuned classical filter,
post-processing follows the model's method."""
import numpy as np
import pytest

from emdenoise import config as emcfg
from emdenoise import filters, io, metrics, pipeline
from emdenoise.errors import InputError
from emdenoise.metrics import psnr
from emdenoise.synthetic import simulate_movie


def _ds(**defaults):
    return emcfg.build({"datasets": {"x": {"path": "x"}}, "defaults": defaults}, check_paths=False).datasets["x"]


@pytest.fixture(scope="module")
def drifting():
    """Counting movie drifting by up to 8 px: whole-pixel shifts between frames."""
    return simulate_movie(10, (96, 96), mode="counting", dose=2.0, max_drift=8.0, seed=4)


def test_canvas_round_trip_keeps_every_pixel_and_aligns_the_scene(drifting):
    ds = _ds(prefilter={"method": "gaussian2d"})
    canvas, rec = pipeline.align_on_canvas(drifting.noisy, ds)
    off = np.array(rec["offsets"])
    assert off.min() == 0 and canvas.shape[1:] == (96 + off[:, 0].max(), 96 + off[:, 1].max())
    assert np.array_equal(pipeline.from_canvas(canvas, rec, drifting.noisy.shape), drifting.noisy)
    # on the canvas the clean scene is still: frames agree far better than on the input grid
    clean, _ = pipeline.align_on_canvas(drifting.clean, ds)
    y0, y1, x0, x1 = rec["common"]
    still = np.abs(np.diff(clean[:, y0:y1, x0:x1], axis=0)).mean()
    moving = np.abs(np.diff(drifting.clean, axis=0)).mean()
    assert off.max() >= 3 and still < 0.7 * moving  # what remains is the sub-pixel residual


def test_drift_aware_denoising_stays_registered_to_the_input(drifting):
    ds = _ds(model={"name": "wcvd"}, train={"epochs": 20, "crop": 32, "val_crop": 32},
             prefilter={"method": "gaussian2d"})
    res = pipeline.denoise_stack(drifting.noisy, ds, device="cpu")
    out = res["output"]
    assert res["drift"]["offsets"] is not None and out.shape == drifting.noisy.shape
    # registered: of all shifts up to 3 px, the output matches the truth best unshifted
    scores = {(dy, dx): psnr(np.roll(out, (dy, dx), axis=(1, 2))[:, 4:-4, 4:-4], drifting.clean[:, 4:-4, 4:-4])
              for dy in range(-3, 4) for dx in range(-3, 4)}
    assert max(scores, key=scores.get) == (0, 0)
    assert psnr(out, drifting.clean) > psnr(drifting.noisy, drifting.clean) + 8.0


def test_auto_includes_the_classical_candidate_and_postprocess_follows_the_method():
    movie = simulate_movie(12, (64, 64), mode="counting", dose=2.0, max_drift=0.0, seed=6)
    ds = _ds(train={"epochs": 3, "crop": 32, "val_crop": 32}, shine={"blocks": 2, "channels": 8,
             "centre_channels": 8, "neighbour_channels": 4}, shine_train={"batch_size": 4, "crop": 32})
    assert ds.model.name == "auto" and ds.select_candidates == ["wcvd", "wcvd_ctx", "shine", "classical", "ensemble"]
    res = pipeline.denoise_stack(movie.noisy, ds, device="cpu", align=False)
    assert set(res["outputs"]) == {"wcvd", "wcvd_ctx", "shine", "classical", "ensemble"}
    assert set(res["checkpoints"]) == {"wcvd", "wcvd_ctx", "shine"}
    # context 'auto' for 12 frames: min(99, 12 - 1) = 11 frames each side (the whole movie; too
    # few frames for any reach uMSE could check, so no shorter one is tried)
    assert res["checkpoints"]["wcvd_ctx"]["model_params"]["context"] == 11
    assert "reach_choice" not in res["checkpoints"]["wcvd_ctx"]
    assert res["checkpoints"]["wcvd"]["model_params"]["context"] == 0
    losses = res["choice"]["loss"]
    single = {m: v for m, v in losses.items() if m != "ensemble"}  # the ensemble: only significantly lower
    assert set(losses) == set(res["outputs"]) and res["chosen"] in (min(single, key=single.get), "ensemble")
    assert res["choice"]["ensemble"]["members"] == ["wcvd", "wcvd_ctx", "shine", "classical"]
    x = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    assert pipeline.postprocess(x, _ds(lowpass={"diameter": 0.5}), "wcvd")[1]["applied"] is True
    out, rec = pipeline.postprocess(x, ds, "shine")
    assert rec == {"applied": False} and np.array_equal(out, x)


@pytest.mark.parametrize("period,expect", [(3.0, None), (24.0, "lowpass")])
def test_lowpass_auto_keeps_fine_fringes_and_removes_high_frequency_residue(period, expect):
    """A fixed N/3 cutoff removes fringes finer than 6 px: 'auto' scores the options by
    uMSE against the noisy movie and keeps what the data supports."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    truth = 10 + 5 * np.cos(2 * np.pi * (yy + 0.5 * xx) / period)
    noisy = (truth + rng.normal(0, 3, (12, 64, 64))).astype(np.float32)
    fake = (truth + rng.normal(0, 1.5, (12, 64, 64))).astype(np.float32)  # a "network" with HF residue
    ds = _ds(model={"name": "wcvd"}, unblind={"enabled": False})  # the low-pass alone
    out, rec = pipeline.postprocess(fake, ds, "wcvd", noisy, reach=1)
    assert rec["diameter"] == (None if expect is None else rec["diameter"]) and "auto" in rec
    assert (rec["diameter"] is None) == (expect is None)
    assert ((out - truth) ** 2).mean() <= ((fake - truth) ** 2).mean() + 1e-6
    # too short to score: no low-pass rather than an unvouched cutoff
    out, rec = pipeline.postprocess(fake[:6], ds, "wcvd", noisy[:6], reach=1)
    assert rec["applied"] is False and np.array_equal(out, fake[:6])


def test_auto_picks_the_lower_true_mse_between_kt3_and_kt7():
    """Candidates of different temporal reach (WCVD kt 3: reach 1; kt 7: reach 3): the
    Noise2Self loss of their (blind) outputs ranks them like their true MSE (a static
    scene: the longer window averages more frames)."""
    import torch

    from emdenoise import infer
    from emdenoise.checkpoint import model_from_checkpoint

    torch.set_num_threads(1)
    movie = simulate_movie(24, (64, 64), mode="counting", dose=1.0, max_drift=0.0, seed=8)
    ds = _ds(model={"name": "auto", "long_kt": 7}, train={"epochs": 40, "crop": 32, "val_crop": 32},
             lowpass={"enabled": False})
    outs, reaches = {}, {}
    for name in ("wcvd", "wcvd_kt7"):
        ckpt = pipeline.train_candidate(movie.noisy, ds, name, 1, train_overrides={"device": "cpu"})
        model = model_from_checkpoint(ckpt)
        outs[name] = infer.denoise(model, ckpt, movie.noisy, device="cpu")
        reaches[name] = model.params.halo_t
    assert reaches == {"wcvd": 1, "wcvd_kt7": 3}
    true_mse = {m: float(((o - movie.clean) ** 2).mean()) for m, o in outs.items()}
    lo, hi = sorted(true_mse.values())
    assert hi > 1.15 * lo, true_mse  # a clear difference, or the test proves nothing
    choice = pipeline.choose({m: pipeline.metrics.self_supervised_loss(o, movie.noisy) for m, o in outs.items()}, ds)
    assert choice["chosen"] == min(true_mse, key=true_mse.get), (true_mse, choice)


def test_max_reach_limits_every_tuned_reach():
    """model.max_reach: 'any' limits nothing, 'checkable' keeps to what uMSE can score on the
    movie (nothing where it can score no reach at all), a number of frames is that; the
    context candidate keeps at least one frame each side."""
    assert pipeline.reach_limit("any", 100) is None and pipeline.reach_limit(7, None) == 7
    assert pipeline.reach_limit("checkable", 100) == metrics.checkable_reach(100) == 44
    assert pipeline.reach_limit("checkable", 11) == 0 and pipeline.reach_limit("checkable", 10) is None
    for bad in (-1, True, "far"):
        with pytest.raises(InputError, match="max_reach"):
            pipeline.reach_limit(bad, 100)
    with pytest.raises(InputError, match="number of frames"):
        pipeline.reach_limit("checkable", None)
    ctx = {m: pipeline.model_params(_ds(model={"max_reach": m}), "wcvd_ctx", n_frames=100).context
           for m in ("any", "checkable", 3, 0)}
    assert ctx == {"any": 99, "checkable": 44, 3: 3, 0: 1}
    assert pipeline.model_params(_ds(model={"max_reach": 0}), "wcvd", n_frames=100).context == 0
    for bad in ("far", -1):  # the schema refuses what the code would
        with pytest.raises(InputError, match="max_reach"):
            emcfg.validate({"datasets": {"x": {"path": "x", "model": {"max_reach": bad}}}})
    emcfg.validate({"datasets": {"x": {"path": "x", "model": {"max_reach": "checkable"}}}})


def test_the_classical_candidate_keeps_within_max_reach():
    """Every classical filter tried keeps within the limit, and the record says so."""
    y = simulate_movie(24, (64, 64), mode="counting", dose=2.0, seed=3).noisy.astype(np.float32)
    _, free = pipeline.classical_candidate(y, 0, gate=False)
    assert free["max_reach"] is None and free["gaussian"]["sigma"][0] >= 2  # a still scene: long averages
    _, cut = pipeline.classical_candidate(y, 0, gate=False, max_reach=3)
    assert cut["max_reach"] == 3 and cut["temporal_reach"] <= 3, cut["filter"]
    assert filters.gaussian_reach(cut["gaussian"]["sigma"][0]) <= 3
    assert filters.mix_reach(cut["mix"]["fit"]) <= 3 and cut["mix"]["fit"]["structure_sigma_t"] == 1.5
    assert "reaches past model.max_reach" in cut["nlm"].get("skipped", "") or cut["nlm"]["sigma_t"] <= 1.5
    _, none = pipeline.classical_candidate(y, 0, gate=False, nlm=False, max_reach=0)
    assert none["temporal_reach"] == 0 and none["mix"]["fit"]["classes"] == 1  # no other frame for the classes


def test_context_cap_depends_on_the_kind_of_data():
    # Movies: up to 99 frames each side, at most T - 1 (the whole movie: windows continue
    # past the ends, tiling.window_index); tilt series: 6 -- their neighbouring "frames"
    # are other projections.
    from emdenoise.config import context_frames
    assert [context_frames("auto", t) for t in (2, 12, 24, 41, 100, 200)] == [1, 11, 23, 40, 99, 99]
    assert [context_frames("auto", t, kind="tilt_series") for t in (4, 9, 24, 41)] == [3, 6, 6, 6]
    assert context_frames("auto", 41, kind="tilt_series") == 6 and context_frames(3, 100) == 3


def test_auto_leaves_out_a_candidate_blind_to_less_than_the_noise():
    """A network with a smaller blind spot than the noise's correlated window (configured,
    or a pretrained model) copies part of the noise: its self-supervised loss is biased
    low, so it does not take part in the comparison (unless nothing else is left)."""
    ds = _ds()
    losses = {"wcvd": 0.90, "shine": 1.00, "classical": 1.05}
    choice = pipeline.choose(losses, ds, {"wcvd": 0, "shine": 1}, noise_radius=1)
    assert choice["chosen"] == "shine" and set(choice["left_out"]) == {"wcvd"}
    assert "biased low" in choice["left_out"]["wcvd"] and "wcvd" not in choice["loss"]
    fair = pipeline.choose(losses, ds, {"wcvd": 1, "shine": 1}, noise_radius=1)
    assert fair["chosen"] == "wcvd" and "left_out" not in fair
    alone = pipeline.choose({"wcvd": 0.9, "shine": 1.0}, ds, {"wcvd": 0, "shine": 0}, noise_radius=2)
    assert alone["chosen"] == "wcvd"  # nothing fair is left: compare them all


# ---- the network's own pixel given back (pipeline.unblind)
def _blind_estimate(noisy):
    """A J-invariant estimate: the Gaussian 3D with the centre frame's taps masked within the
    noise's correlated window (the noise stage's blind spot): it never sees noise of y(t, p)."""
    from emdenoise.noise import estimate_blindspot

    b = estimate_blindspot(noisy)["blindspot"] // 2
    return filters.normalised_gaussian3d(noisy, 1.0, 1.0, blind_radius=b)


@pytest.mark.parametrize("mode", ["counting", "linear"])
def test_unblind_weight_is_near_the_best_and_lowers_the_error(mode, tmp_path):
    mv = simulate_movie(12, (96, 96), mode=mode, dose=2.0, max_drift=0.0, seed=11)
    y = mv.noisy.astype(np.float64)
    f = _blind_estimate(mv.noisy)
    out, rec = pipeline.unblind(f, mv.noisy)
    # the truth in data units: the best affine map of the clean movie onto the noisy one
    c = mv.clean.astype(np.float64)
    a, b = np.polyfit(c.ravel(), y.ravel(), 1)
    s = a * c + b
    err = f - s
    w_best = float(np.mean(err * (err - (y - s))) / np.mean((y - f) ** 2))  # argmin_w E (f + w (y - f) - s)^2
    assert 0 < rec["weight"] < 1 and abs(rec["weight"] - w_best) < 0.25 * w_best + 0.01, (rec, w_best)
    assert np.mean((out - s) ** 2) < np.mean(err ** 2)  # never worse, here better
    assert rec["loss"] == pytest.approx(np.mean((f - y) ** 2), rel=1e-9)
    # lazy (Zarr) in, lazy out, the same values bit for bit
    io.write_zarr(tmp_path / "f.zarr", f)
    io.write_zarr(tmp_path / "y.zarr", mv.noisy)
    lazy, rec2 = pipeline.unblind(io.read_zarr(tmp_path / "f.zarr")[0], io.read_zarr(tmp_path / "y.zarr")[0])
    assert rec2 == rec and not isinstance(lazy, np.ndarray)
    np.testing.assert_array_equal(np.asarray(lazy), out)


def test_unblind_gives_no_weight_when_the_frames_differ_more_than_the_loss():
    """A scene that changes between every frame inflates the adjacent-frame noise estimate
    above the loss: the weight is 0 (the blind output, unchanged), never negative."""
    rng = np.random.default_rng(0)
    y = rng.poisson(5.0, (8, 48, 48)).astype(np.float32)
    y[1::2] += 20.0  # flicker: huge adjacent-frame differences
    f = _blind_estimate(y)
    out, rec = pipeline.unblind(f, y)
    assert rec["weight"] == 0.0 and rec["noise_variance"] > rec["loss"]
    np.testing.assert_array_equal(out, f.astype(np.float32))


@pytest.mark.parametrize("pad", ["symmetric", "periodic"])
def test_lowpass_umse_equals_the_umse_of_the_filtered_stacks(pad, tmp_path, monkeypatch):
    """Scored in the spectrum (Parseval) without filtering: the same figures as filtering
    each option and scoring it with metrics.umse -- hard and soft masks, with and without
    the own pixel, odd and even frame widths, a linear-mode offset (the sums cancel from
    the signal power down to the noise), NumPy or Zarr input."""
    mv = simulate_movie(12, (40, 47), mode="linear", dose=2.0, max_drift=0.0, seed=4)
    f = _blind_estimate(mv.noisy)
    y = mv.noisy.astype(np.float32)
    masks = [None, filters.lowpass_mask(y.shape[1:], 0.5, pad=pad),
             filters.lowpass_mask(y.shape[1:], 1 / 3, pad=pad, edge_width=0.5)]
    for r in (0, 2):
        for w in (0.0, 0.3):
            base = f + np.float32(w) * (y - f)
            want = [metrics.umse(base if m is None else filters.fft_lowpass(
                base, d, pad=pad, edge_width=e), y, temporal_radius=r)
                for m, d, e in zip(masks, (None, 0.5, 1 / 3), (0, 0, 0.5))]
            got = pipeline.lowpass_umse(f, y, masks, [w] * 3, r, pad)
            noise = np.nanmean(metrics.umse_noise_terms(y, r))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * noise)
    io.write_zarr(tmp_path / "f.zarr", f)
    io.write_zarr(tmp_path / "y.zarr", y)
    lazy = pipeline.lowpass_umse(io.read_zarr(tmp_path / "f.zarr")[0], io.read_zarr(tmp_path / "y.zarr")[0],
                                 masks, [0.3] * 3, 2, pad)
    whole = pipeline.lowpass_umse(f, y, masks, [0.3] * 3, 2, pad)
    np.testing.assert_allclose(lazy, whole, rtol=1e-12)
    monkeypatch.setattr(pipeline, "UMSE_SLAB_BINS", 100)  # sums by slabs of 2-3 spectrum rows
    np.testing.assert_allclose(pipeline.lowpass_umse(f, y, masks, [0.3] * 3, 2, pad), whole, rtol=1e-5)
    with pytest.raises(InputError, match="needs at least 14 frames"):
        pipeline.lowpass_umse(f, y, masks, [0.0] * 3, 5, pad)


def test_postprocess_gives_the_own_pixel_back_where_it_helps():
    """SHINE (no low-pass): always.  WCVD: the low-pass removes the band where the own pixel
    helps most, so each low-pass option is scored by uMSE with and without it and the
    lowest kept; on a movie too short to score, 'auto' means no low-pass and the own pixel."""
    mv = simulate_movie(10, (64, 64), mode="counting", dose=2.0, max_drift=0.0, seed=2)
    f = _blind_estimate(mv.noisy)
    ds = _ds(lowpass={"diameter": 0.5})
    unb, rec_u = pipeline.unblind(f, mv.noisy)
    shine, rec_s = pipeline.postprocess(f, ds, "shine", mv.noisy)  # no low-pass in SHINE's method
    assert rec_s == {"applied": False, "unblind": {**rec_u, "applied": True}}
    np.testing.assert_array_equal(shine, unb)
    out, rec = pipeline.postprocess(f, ds, "wcvd", mv.noisy)
    scores = rec["scored"]["umse"]
    assert set(scores) == {"0.5", "0.5 + own pixel"} and rec["applied"]
    with_own = scores["0.5 + own pixel"] < scores["0.5"]
    assert rec["unblind"] == {**rec_u, "applied": with_own}
    ref = filters.fft_lowpass(unb if with_own else f.astype(np.float32), diameter=0.5, pad=ds.lowpass.pad)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    auto = _ds()  # diameter auto: none / 1/2 / 1/3, each with and without
    out, rec = pipeline.postprocess(f, auto, "wcvd", mv.noisy)
    assert len(rec["auto"]["umse"]) == 6 and min(rec["auto"]["umse"].values()) == pytest.approx(metrics.umse(
        out, mv.noisy, temporal_radius=rec["auto"]["radius"]), rel=1e-4)
    out, rec = pipeline.postprocess(f[:6], auto, "wcvd", mv.noisy[:6])  # too short to score
    assert rec["applied"] is False and rec["unblind"]["applied"]
    np.testing.assert_array_equal(out, pipeline.unblind(f[:6], mv.noisy[:6])[0])
    off = _ds(unblind={"enabled": False})
    plain, rec_off = pipeline.postprocess(f, off, "shine", mv.noisy)
    assert "unblind" not in rec_off
    np.testing.assert_array_equal(plain, f.astype(np.float32))


def test_context_auto_trains_at_the_reach_it_chose_and_records_the_choice():
    from emdenoise.synthetic import simulate_scene

    # a new scene every frame: no reach helps, so the one uMSE can check is kept
    y = np.stack([simulate_scene(1, (64, 64), dose=1.0, seed=200 + i).noisy[0] for i in range(40)]).astype(np.float32)
    ds = _ds(model={"name": "wcvd_ctx"}, train={"epochs": 2, "crop": 32, "val_crop": 32})
    ckpt = pipeline.train_candidate(y, ds, "wcvd_ctx", 1)
    rec = ckpt["reach_choice"]
    assert rec["reaches"] == [14, 39] and rec["chosen"] == 14 == ckpt["model_params"]["context"]
    # the metrics table can then score it: reach 14 <= what 40 frames allow
    assert metrics.checkable_reach(40) == 14
    # a configured reach is trained as configured, with no choice
    fixed = pipeline.train_candidate(y, _ds(model={"name": "wcvd_ctx", "context": 39},
                                            train={"epochs": 1, "crop": 32, "val_crop": 32}), "wcvd_ctx", 1)
    assert fixed["model_params"]["context"] == 39 and "reach_choice" not in fixed
