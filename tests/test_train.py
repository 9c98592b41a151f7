"""Training: blind-spot proof on a trained model, determinism, normalisation, logs, checkpoints."""
import csv
import dataclasses
import os

import numpy as np
import pytest
import torch

from emdenoise import __version__
from emdenoise.errors import InputError
from emdenoise.infer import denoise
from emdenoise.metrics import psnr
from emdenoise.models import WCVD, WCVDParams, build_model
from emdenoise.synthetic import simulate_movie
from emdenoise.train import (Normalisation, TrainParams, _select_epoch, epoch_line, load_checkpoint,
                             model_from_checkpoint, save_checkpoint, train_model)

FAST = TrainParams(epochs=3, crop=24, batch_size=4, val_crop=24, device="cpu", seed=0)
#: A learning rate at which training changes nothing: the neighbour-average initialisation
#: (which already denoises) is what such a run returns -- the baseline a trained model must beat.
NO_LR = 1e-12


def lattice(t=8, shape=(48, 48), spacing=8.0, sigma=1.5, seed=0):
    """Clean (T, Y, X) movie of Gaussian 'atomic columns' drifting 0.3 px per frame, in [0, 1]."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    frames = []
    for k in range(t):
        dy = (yy - 0.3 * k + spacing / 2) % spacing - spacing / 2  # distance to nearest column
        dx = (xx - 0.2 * k + spacing / 2) % spacing - spacing / 2
        frames.append(np.exp(-(dy ** 2 + dx ** 2) / (2 * sigma ** 2)))
    return np.stack(frames).astype(np.float32)


def regime(name, t=8, seed=0):
    """(noisy, clean) in the three intensity regimes of the paper (SM Fig. S5)."""
    rng = np.random.default_rng(seed)
    clean = lattice(t)
    if name == "counting":      # 0-5 counts, ~1 count/px
        lam = 0.2 + 2.0 * clean
        return rng.poisson(lam).astype(np.float32), lam
    if name == "8bit":          # 0-255 grey levels, quantised counts x 40
        lam = 0.3 + 2.5 * clean
        return np.clip(40.0 * rng.poisson(lam), 0, 255).astype(np.float32), 40.0 * lam
    if name == "linear":        # 100-1000 with an offset of 100 and read noise
        sig = 100.0 + 600.0 * clean
        return (sig + rng.normal(0, 60.0, sig.shape)).astype(np.float32), sig
    raise ValueError(name)


@pytest.fixture
def one_thread():
    """One torch thread for a few dozen epochs of tiny crops: with two OpenMP threads on a
    loaded 2-core machine (load ~8) the 40-epoch test below took 50 s instead of 5 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def counting_movie():
    return regime("counting")[0]


@pytest.fixture(scope="module")
def trained_wcvd(counting_movie):
    return train_model(counting_movie, WCVDParams(), FAST)


def _model(ckpt, tmp_path, name="m.pt"):
    save_checkpoint(ckpt, tmp_path / name)
    return load_checkpoint(tmp_path / name)[0]


def _denoised(noisy, tp, params=WCVDParams()):
    """(output of the model trained with ``tp`` on ``noisy``, its checkpoint)."""
    ckpt = train_model(noisy, params, tp)
    return denoise(model_from_checkpoint(ckpt), ckpt, noisy, device="cpu"), ckpt


def _trained(ckpt):
    """The trained network itself (no load-time checks: the proof must stand alone)."""
    model = WCVD(WCVDParams.from_dict(ckpt["model_params"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _input_gradient(model, x, t, y, xpix):
    """d output[t, y, x] / d input, input (1, T, Y, X)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out[0, t, y, xpix].backward()
    return x.grad[0]


@pytest.mark.parametrize("y,x", [(20, 17), (0, 0), (47, 23)], ids=["interior", "corner", "edge"])
def test_blind_spot_proof_wcvd(trained_wcvd, counting_movie, y, x):
    model = _trained(trained_wcvd)
    assert trained_wcvd["epochs_run"] == 3
    z = torch.from_numpy(Normalisation.from_dict(trained_wcvd["normalisation"]).apply(counting_movie))[None]
    with torch.no_grad():
        assert model(z)[0, 3, y, x] > 0  # not a dead ReLU: gradients can flow
    g = _input_gradient(model, z, 3, y, x)  # output frame 3 is centred on input frame 4
    assert g[4, y, x] == 0.0  # exactly: the blind spot
    ny, nx = z.shape[-2:]
    for dy, dx in [(1, 0), (-1, 0), (0, 1), (0, -1), (3, 3)]:
        assert g[4, (y + dy) % ny, (x + dx) % nx] != 0.0  # spatial neighbours are used
    assert g[3, y, x] != 0.0 and g[5, y, x] != 0.0  # same pixel, adjacent frames
    assert torch.count_nonzero(g[[0, 1, 2, 6, 7]]) == 0  # nothing outside the Kt = 3 window


def test_blind_spot_proof_wcid(counting_movie):
    ckpt = train_model(counting_movie, WCVDParams(dims=2), FAST)
    model = _trained(ckpt)
    z = torch.from_numpy(Normalisation.from_dict(ckpt["normalisation"]).apply(counting_movie))[None]
    y, x = 10, 30
    g = _input_gradient(model, z, 2, y, x)
    assert g[2, y, x] == 0.0
    assert g[2, y + 1, x] != 0.0 and g[2, y, x - 1] != 0.0
    assert torch.count_nonzero(g[[0, 1, 3, 4, 5, 6, 7]]) == 0  # frames are denoised on their own


def test_training_is_bit_identical_on_cpu(counting_movie):
    modes = []  # deterministic algorithms (warn mode) while it trains
    a = train_model(counting_movie, WCVDParams(), FAST, progress=lambda row: modes.append(
        torch.get_deterministic_debug_mode()))
    assert modes and set(modes) == {1}
    b = train_model(counting_movie, WCVDParams(), FAST)
    c = train_model(counting_movie, WCVDParams(), TrainParams(**{**FAST.__dict__, "seed": 1}))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["best_val_loss"] == b["best_val_loss"]
    assert not torch.equal(a["state_dict"]["branches.0.bck.weight"], c["state_dict"]["branches.0.bck.weight"])
    # same weights -> the same denoised movie, bit for bit (CPU)
    out_a = denoise(model_from_checkpoint(a), a, counting_movie, device="cpu")
    out_b = denoise(model_from_checkpoint(b), b, counting_movie, device="cpu")
    assert np.array_equal(out_a, out_b)
    assert not torch.are_deterministic_algorithms_enabled()  # global setting restored


@pytest.mark.parametrize("name", ["counting", "8bit", "linear"])
def test_normalisation_in_three_intensity_regimes(name, tmp_path, one_thread):
    noisy, clean = regime(name)
    tp = TrainParams(**{**FAST.__dict__, "epochs": 30})
    ckpt = train_model(noisy, WCVDParams(), tp)
    norm = ckpt["normalisation"]
    assert norm["scale"] > 0
    if name == "linear":
        assert clean.min() - 4 * 60.0 < norm["offset"] < clean.min()  # offset ~100 minus read noise tail
    else:
        assert norm["offset"] == 0.0
    out = denoise(_model(ckpt, tmp_path), ckpt, noisy, device="cpu")
    assert out.shape == noisy.shape and out.dtype == np.float32
    # level restored: mean within 5 % of the input mean, range inside the input range
    assert abs(out.mean() - noisy.mean()) < 0.05 * noisy.mean()
    assert out.min() >= noisy.min() - 0.05 * np.ptp(noisy)
    assert out.max() <= noisy.max()
    assert np.ptp(out) > 0.2 * np.ptp(clean)  # not flattened to a constant
    # and it denoises ...
    assert np.mean((out - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)
    # ... better than the untrained network (same seed, lr ~ 0), whose neighbour-average
    # initialisation alone passes the line above in the counting and 8-bit regimes.
    # Measured MSE trained / untrained: 0.42 counting, 0.37 8-bit, 0.11 linear.
    untrained, _ = _denoised(noisy, dataclasses.replace(tp, epochs=1, lr=NO_LR, linear_start=False))
    assert np.mean((out - clean) ** 2) < 0.6 * np.mean((untrained - clean) ** 2)


def test_training_beats_the_untrained_model_on_a_synthetic_movie(one_thread):
    """Training must be what denoises: against ground truth, the trained WCVD beats the
    same network untrained (same seed, lr = 1e-12, same epochs) by a clear PSNR margin.

    A static, high-dose movie (100 counts/px, 8 frames of 48 x 48 px): there the
    neighbour-average initialisation blurs the atomic columns, and training learns to
    lean on the same pixel in the adjacent frames.  Measured on the CPU (seeds 0, 1, 2):
    untrained 26.7 dB, trained 30.2-30.3 dB, raw 22.0 dB; the test takes ~2-5 s.
    """
    movie = simulate_movie(8, (48, 48), mode="counting", dose=100.0, max_drift=0.0, seed=0)
    noisy, clean = movie.noisy.astype(np.float32), movie.clean
    tp = TrainParams(epochs=40, lr=1e-3, crop=32, val_crop=32, batch_size=4, device="cpu", seed=0)
    trained, ckpt = _denoised(noisy, tp)
    untrained, init = _denoised(noisy, dataclasses.replace(tp, lr=NO_LR, linear_start=False))
    # the baseline really is the initialisation, and the trained weights moved away from it
    start = build_model(WCVDParams(), seed=0).state_dict()
    assert all(torch.allclose(init["state_dict"][k], v, atol=1e-9) for k, v in start.items())
    assert not torch.allclose(ckpt["state_dict"]["branches.0.bck.weight"], start["branches.0.bck.weight"],
                              atol=1e-3)
    p_raw, p_untrained, p_trained = psnr(noisy, clean), psnr(untrained, clean), psnr(trained, clean)
    assert p_untrained > p_raw + 2.0  # the initialisation alone already denoises ...
    assert p_trained > p_untrained + 2.0, (p_raw, p_untrained, p_trained)  # ... training adds > 2 dB


def test_normalisation_fit_is_robust():
    rng = np.random.default_rng(0)
    x = 100 + rng.random((4, 32, 32)).astype(np.float32) * 900
    x[0, 0, :5] = 1e7  # hot pixels must not set the scale
    n = Normalisation.fit(x)
    assert 100 <= n.offset < 110 and 850 < n.scale < 900
    np.testing.assert_allclose(n.invert(n.apply(x[1:])), x[1:], rtol=1e-6)
    sparse = np.zeros((2, 32, 32), np.float32)
    sparse[0, 3, 4] = 1  # 99.5th percentile is still 0: falls back to a positive scale
    assert Normalisation.fit(sparse).scale > 0
    assert Normalisation.fit(np.zeros((2, 8, 8))).scale == 1.0
    assert Normalisation.from_dict(n.to_dict()) == n


def test_log_csv_written(counting_movie, tmp_path):
    log = tmp_path / "logs" / "train_log.csv"
    rows = []
    train_model(counting_movie, WCVDParams(), FAST, log_csv=log, progress=rows.append)
    with open(log) as fh:
        lines = list(csv.DictReader(fh))
    assert list(lines[0]) == ["epoch", "train_loss", "val_loss", "lr", "seconds"]
    assert [int(r["epoch"]) for r in lines] == [1, 2, 3]
    assert all(float(r["train_loss"]) > 0 and float(r["val_loss"]) > 0 for r in lines)
    assert float(lines[0]["lr"]) == 1e-3
    assert [float(r["seconds"]) for r in lines] == sorted(float(r["seconds"]) for r in lines)
    assert len(rows) == 3 and not os.path.exists(str(log) + ".part")


def test_validation_and_best_checkpoint(tmp_path):
    noisy = regime("counting", t=10)[0]
    log = tmp_path / "log.csv"
    # without the least-squares start, which is a candidate too (epoch 0, not in the log)
    tp = TrainParams(**{**FAST.__dict__, "epochs": 5, "linear_start": False})
    ckpt = train_model(noisy, WCVDParams(), tp, log_csv=log)
    with open(log) as fh:
        val = [float(r["val_loss"]) for r in csv.DictReader(fh)]
    assert ckpt["validation"]["mode"] == "temporal"
    frames = ckpt["validation"]["frames"]
    assert len(frames) == 2 and all(1 <= f <= 8 for f in frames)
    assert ckpt["min_val_loss"] == min(val)  # the CSV holds repr(float): exact
    assert ckpt["min_val_epoch"] == int(np.argmin(val)) + 1
    # the checkpoint is the latest epoch within one standard error of the minimum
    best = ckpt["best_epoch"]
    assert ckpt["best_val_loss"] == val[best - 1]
    assert ckpt["best_val_loss"] <= min(val) + ckpt["val_loss_se"] * 1.0001
    assert all(v > min(val) + ckpt["val_loss_se"] for v in val[best:])
    assert 0 < ckpt["val_loss_se"] < 0.1 * min(val)
    for key in ("state_dict", "model_params", "train_params", "normalisation", "code_version"):
        assert key in ckpt
    assert ckpt["code_version"] == __version__
    assert ckpt["train_params"]["epochs"] == 5 and ckpt["model_params"]["ks"] == [3, 5, 7]


def test_select_epoch_prefers_latest_within_standard_error():
    hist = [(1, 1.0, 0.1), (2, 0.5, 0.01), (3, 0.505, 0.01), (4, 0.6, 0.01), (5, 0.52, 0.01)]
    assert _select_epoch(hist, 1.0) == 3
    assert _select_epoch(hist, 0.0) == 2
    assert _select_epoch(hist, 3.0) == 5


def test_best_checkpoint_holds_the_selected_epoch_weights(counting_movie):
    # constant lr: the first k epochs of any run are identical, so a k-epoch run that
    # keeps its last epoch reproduces the weights of epoch k of the longer run.
    base = {**FAST.__dict__, "lr_schedule": "constant", "lr": 0.05, "epochs": 6, "linear_start": False}
    ckpt = train_model(counting_movie, WCVDParams(), TrainParams(**{**base, "val_tolerance": 0.0}))
    k = ckpt["best_epoch"]
    assert k < 6  # this setting's minimum is not at the end, so the test can tell
    short = train_model(counting_movie, WCVDParams(), TrainParams(**{**base, "epochs": k, "val_tolerance": 1e9}))
    assert short["best_epoch"] == k
    assert all(torch.equal(ckpt["state_dict"][n], short["state_dict"][n]) for n in ckpt["state_dict"])
    last = train_model(counting_movie, WCVDParams(), TrainParams(**{**base, "val_tolerance": 1e9}))
    assert not torch.equal(ckpt["state_dict"]["branches.2.bck.weight"], last["state_dict"]["branches.2.bck.weight"])


def test_checkpoint_roundtrip_is_atomic_and_exact(trained_wcvd, counting_movie, tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(trained_wcvd, path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temp file left behind
    model, ck = load_checkpoint(path)
    assert not model.training
    assert ck["best_epoch"] == trained_wcvd["best_epoch"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained_wcvd["state_dict"].items())


# every frame is a target (edge frames with mirrored windows): 4 frames hold out 2
@pytest.mark.parametrize("t,mode", [(3, "spatial"), (4, "temporal"), (6, "temporal")])
def test_small_T_trains_with_a_fallback_validation(t, mode):
    noisy = regime("counting", t=t)[0]
    ckpt = train_model(noisy, WCVDParams(), FAST)
    assert ckpt["validation"]["mode"] == mode
    assert np.isfinite(ckpt["best_val_loss"])


def test_wcid_trains_on_a_single_frame():
    ckpt = train_model(regime("counting", t=1)[0], WCVDParams(dims=2), FAST)
    assert ckpt["validation"]["mode"] == "spatial" and ckpt["input_shape"] == [1, 48, 48]


def test_no_validation_keeps_last_epoch(counting_movie):
    ckpt = train_model(counting_movie, WCVDParams(), TrainParams(**{**FAST.__dict__, "val_frames": 0}))
    assert ckpt["validation"]["mode"] == "none" and ckpt["best_epoch"] == 3
    assert np.isnan(ckpt["best_val_loss"])


def test_full_frame_training_with_periodic_padding(counting_movie):
    ckpt = train_model(counting_movie[:, :24, :24], WCVDParams(),
                       TrainParams(**{**FAST.__dict__, "crop": None, "val_crop": None, "epochs": 2}))
    assert np.isfinite(ckpt["final_train_loss"])


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((1, 32, 32), np.float32), "at least 2 frames"),  # as inference: window (1, 0, 1) from 2
    (np.zeros((32, 32), np.float32), r"\(T, Y, X\)"),
    (np.full((4, 32, 32), np.nan, np.float32), "NaN"),
    (np.zeros((4, 5, 32), np.float32), "too small for wcvd"),
])
def test_bad_input_is_refused(bad, msg):
    with pytest.raises(InputError, match=msg):
        train_model(bad, WCVDParams(), FAST)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable"):
        load_checkpoint(junk)
    torch.save({"foo": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not an emdenoise checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


# ------------------------------------------------------------------ resumable training
class _Killed(Exception):
    pass


@pytest.mark.parametrize("params", [WCVDParams(ks=(3, 5)), "shine"])
def test_a_killed_training_resumes_bit_identical(tmp_path, params):
    """A run killed after epoch 3 (state saved every epoch) and started again ends with
    the weights, history and log of an uninterrupted run; the state file is then gone."""
    from emdenoise.config import SHINEParams

    if params == "shine":
        params = SHINEParams(blindspot=3, channels=6, centre_channels=4, neighbour_channels=3, blocks=2)
    stack = np.random.default_rng(0).poisson(3.0, (8, 48, 48)).astype(np.float32)
    tp = TrainParams(epochs=6, crop=16, val_crop=16, batch_size=2, device="cpu")
    ref = train_model(stack, params, tp, log_csv=tmp_path / "ref.csv")
    state = tmp_path / "state.pt"

    def kill(row):
        if row["epoch"] == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train_model(stack, params, tp, resume=state, checkpoint_every=0, progress=kill, log_csv=tmp_path / "log.csv")
    assert state.exists() and not (tmp_path / "log.csv").exists()
    epochs = []
    out = train_model(stack, params, tp, resume=state, checkpoint_every=0, log_csv=tmp_path / "log.csv",
                      progress=lambda row: epochs.append(row["epoch"]))
    assert epochs == [4, 5, 6] and not state.exists()  # continued, not restarted
    assert out["best_epoch"] == ref["best_epoch"] and out["best_val_loss"] == ref["best_val_loss"]
    assert all(torch.equal(out["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    a = [r.split(",")[:3] for r in (tmp_path / "ref.csv").read_text().splitlines()]
    b = [r.split(",")[:3] for r in (tmp_path / "log.csv").read_text().splitlines()]
    assert a == b  # the same epochs and losses logged
    # a state from other settings or other data is not resumed from
    with pytest.raises(_Killed):
        train_model(stack, params, tp, resume=state, checkpoint_every=0, progress=kill)
    epochs.clear()
    train_model(stack + 1, params, tp, resume=state, checkpoint_every=0, progress=lambda r: epochs.append(r["epoch"]))
    assert epochs[0] == 1


def test_least_squares_start_is_blind_and_beats_the_neighbour_average():
    # The data-driven start (WCVD.initialise) fits the best linear blind-spot predictor:
    # on a movie with ground truth it must already denoise better than the neighbour
    # average, keep every blind tap at zero, and be the same for the same seed.
    noisy, clean = regime("counting", t=12)
    norm = Normalisation.fit(noisy)
    z = torch.from_numpy(norm.apply(noisy))
    params = WCVDParams(context=3, blindspot=3)
    plain = build_model(params, seed=0)
    fitted = build_model(params, seed=0)
    rec = fitted.initialise([(z, list(range(3, 9)))], torch.Generator().manual_seed(0))
    assert rec["linear_start"]["ks7"]["unknowns"] < rec["linear_start"]["ks7"]["taps"]
    WCVD.check_state(fitted.state_dict(), "fitted", params)     # blind taps still exactly 0
    again = build_model(params, seed=0)
    again.initialise([(z, list(range(3, 9)))], torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), again.state_dict().values()))
    ckpt = {"normalisation": norm.to_dict()}
    err = {name: float(np.mean((denoise(m, ckpt, noisy, device="cpu") - clean) ** 2))
           for name, m in (("plain", plain), ("fitted", fitted))}
    assert err["fitted"] < 0.8 * err["plain"], err


def test_epoch_log_line_is_readable():
    row = {"epoch": 12, "train_loss": 0.0279312, "val_loss": 0.0279889, "lr": 1e-3, "seconds": 41.23}
    assert epoch_line(row) == "epoch 12: train 0.027931, val 0.027989, lr 1.0e-03, 41.2 s"
    assert "val n/a" in epoch_line({**row, "val_loss": float("nan")})


# --------------------------------------------------------------------------------------
# training from Zarr (bounded memory) and one model for several datasets
# --------------------------------------------------------------------------------------
def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_strided_sample_of_a_lazy_stack_holds_one_frame_at_a_time(counting_movie):
    """Sampling a stack that is not in memory must not keep the frames it read (a strided
    view of each frame did: T whole frames alive at once, 3.4 GB for 200 x 2048²)."""
    import gc
    import weakref

    from emdenoise.io import strided_sample

    alive = []

    class Lazy:
        shape = counting_movie.shape

        def __getitem__(self, t):
            gc.collect()
            assert sum(r() is not None for r in alive) == 0, "an earlier frame is still held"
            frame = counting_movie[t].copy()
            alive.append(weakref.ref(frame))
            return frame

    np.testing.assert_array_equal(strided_sample(Lazy(), 7), counting_movie.ravel()[::7])
    assert len(alive) == counting_movie.shape[0]


def test_training_from_a_zarr_store_equals_training_in_memory(counting_movie, tmp_path):
    """A stack too large for memory trains from crops read out of its Zarr store: the same
    model bit for bit (normalisation, resume fingerprint and crops are read frame by frame)."""
    import zarr

    from emdenoise.io import strided_sample

    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=counting_movie.shape, chunks=(1, 48, 48),
                            dtype="float32")
    arr[:] = counting_movie
    lazy = zarr.open_array(str(tmp_path / "s.zarr"), mode="r")
    for step in (1, 7, 1000, 5000):  # offsets that cross frame boundaries
        np.testing.assert_array_equal(strided_sample(lazy, step), counting_movie.ravel()[::step])
    assert Normalisation.fit(lazy, max_samples=999) == Normalisation.fit(counting_movie, max_samples=999)
    tp = TrainParams(**{**FAST.__dict__, "epochs": 2})
    for params in (WCVDParams(), WCVDParams(context=2, blindspot=3)):
        mem = train_model(counting_movie, params, tp)
        disk = train_model(lazy, params, tp)
        assert _states_equal(mem["state_dict"], disk["state_dict"]) and mem["normalisation"] == disk["normalisation"]


def test_one_model_for_two_datasets_keeps_each_datasets_normalisation():
    """`train_on`: one WCVD trained on crops of a counting-mode movie and of a linear-mode
    movie of another size, whose intensities differ by two orders of magnitude.  Applied to
    each with its own normalisation (checkpoint.for_stack) it denoises both."""
    from emdenoise.checkpoint import for_stack
    from emdenoise.train import _Frames, _Sampler, _split

    a, a_clean = regime("counting", t=10, seed=1)
    b, b_clean = regime("linear", t=8, seed=2)
    b, b_clean = b[:, :40], b_clean[:, :40]  # another frame size
    tp = TrainParams(**{**FAST.__dict__, "epochs": 15})
    ckpt = train_model([a, b], WCVDParams(), tp, names=["count", "lin"])
    assert ckpt["normalise"] == "per_dataset" and ckpt["train_on"] == ["count", "lin"]
    na, nb = (Normalisation.from_dict(d) for d in ckpt["normalisations"])
    assert na == Normalisation.fit(a) and nb == Normalisation.fit(b) and nb.scale > 50 * na.scale
    assert [v["mode"] for v in ckpt["validation"]] == ["temporal", "temporal"]
    model = model_from_checkpoint(ckpt)
    for noisy, clean in ((a, a_clean), (b, b_clean)):
        own = denoise(model, for_stack(ckpt, noisy), noisy, device="cpu")
        assert psnr(own, clean) > psnr(noisy, clean) + 4
    assert for_stack(ckpt, b)["normalisation"] == nb.to_dict() and for_stack(ckpt, a)["normalisation"] == na.to_dict()
    # every training pixel is equally likely: windows come from both stacks, in proportion
    src = [_Frames(x, Normalisation.fit(x)) for x in (a, b)]
    sampler = _Sampler(src, [_split(s.shape, WCVDParams(), tp) for s in src], WCVDParams(), tp)
    assert sampler.padding == "valid" and sampler.cy == sampler.cx == 24
    ratio = (8 * 48 * 48) / (6 * 40 * 48)  # training windows x area: 10 - 2 validation targets (a), 8 - 2 (b)
    assert sampler.p[0] / sampler.p[1] == pytest.approx(ratio)


def test_one_model_for_several_datasets_refuses_a_bad_stack():
    a = regime("counting", t=8)[0]
    bad = a.copy()
    bad[3, 5, 5] = np.nan
    with pytest.raises(InputError, match="lin.*NaN"):
        train_model([a, bad], WCVDParams(), FAST, names=["count", "lin"])


def test_edge_frames_train_on_the_mirrored_windows_inference_gives_them():
    """Every frame is a training target: near the ends of the movie with the window
    inference builds (frames mirrored about the centre, tiling.window_index), never with
    the centre frame twice -- so a long temporal context (halo 4 on 12 frames: 4 full
    windows) trains on all 12 frames, not on 4, and the least-squares start too."""
    from emdenoise.tiling import window_index
    from emdenoise.train import _Frames, _Sampler, _split

    noisy = regime("counting", t=12)[0]
    params = WCVDParams(context=4)
    tp = TrainParams(**{**FAST.__dict__, "val_frames": 2})
    sp = _split(noisy.shape, params, tp)
    assert sorted(sp.train_centres + sp.val_centres) == list(range(12))
    src = _Frames(noisy, Normalisation.fit(noisy))
    sampler = _Sampler([src], [sp], params, TrainParams(**{**tp.__dict__, "augment": False}))
    x, tgt = sampler.batch(64)
    z = src[:]
    seen_edge = False
    for w, target in zip(x, tgt):  # find where each crop came from and check its window
        h = params.halo_t
        centre = w[h]
        hits = [(t, y0, x0) for t in range(12) for y0 in range(z.shape[1] - w.shape[1] + 1)
                for x0 in range(z.shape[2] - w.shape[2] + 1)
                if np.array_equal(z[t, y0:y0 + w.shape[1], x0:x0 + w.shape[2]], centre)][:1]
        assert hits
        t, y0, x0 = hits[0]
        idx = window_index(t, t + 1, 12, h)[0]
        np.testing.assert_array_equal(w, z[idx, y0:y0 + w.shape[1], x0:x0 + w.shape[2]])
        assert list(idx).count(t) == 1  # blind: the centre frame only in the centre slot
        seen_edge |= t < h or t >= 12 - h
    assert seen_edge
    rec = build_model(params, seed=0).initialise([(torch.from_numpy(z), sp.train_centres)],
                                                 torch.Generator().manual_seed(0))
    assert rec["pixels"] == len(sp.train_centres) * z.shape[1] * z.shape[2]  # every pixel of every target


# --------------------------------------------------------------------------------------
# the context reach of model.context: auto (train.compare_reach, pipeline.choose_reach)
# --------------------------------------------------------------------------------------
def _reach_movie(unrelated: bool) -> np.ndarray:
    """40 frames of 96² px at 1 e-/px: one still scene, or a new scene every frame (the
    frames around t then hold nothing about frame t, at any reach)."""
    from emdenoise.synthetic import simulate_scene

    if not unrelated:
        return simulate_scene(40, (96, 96), dose=1.0, seed=3).noisy.astype(np.float32)
    return np.stack([simulate_scene(1, (96, 96), dose=1.0, seed=100 + i).noisy[0] for i in range(40)]).astype(
        np.float32)


def test_the_long_reach_is_kept_where_averaging_more_frames_is_better(one_thread):
    from emdenoise.pipeline import choose_reach

    mp, rec = choose_reach(_reach_movie(False), WCVDParams(context=39), TrainParams(), 40)
    # checkable: (40 - 3 - 8) // 2 = 14 frames each side; the still scene gains from 39
    assert rec["reaches"] == [14, 39] and rec["chosen"] == 39 and mp.context == 39
    assert rec["z"][1] < -2.0 and rec["val_loss"][1] < rec["val_loss"][0] and rec["blocks"] >= 50


def test_the_checkable_reach_is_kept_where_the_longer_one_is_not_better(one_thread):
    from emdenoise.pipeline import choose_reach

    mp, rec = choose_reach(_reach_movie(True), WCVDParams(context=39), TrainParams(), 40)
    assert rec["chosen"] == 14 and mp.context == 14 and rec["z"][1] > -2.0
    # no choice where the checkable reach is not shorter, or nothing could be checked at all
    assert choose_reach(_reach_movie(True)[:30], WCVDParams(context=9), TrainParams(), 30) == (WCVDParams(context=9),
                                                                                               None)
    assert choose_reach(_reach_movie(True)[:12], WCVDParams(context=11), TrainParams(), 12)[1] is None


def test_compare_reach_without_validation_frames_keeps_the_longest(one_thread):
    from emdenoise.train import compare_reach

    y = _reach_movie(False)
    for tp in (TrainParams(val_frames=0), TrainParams(linear_start=False)):
        rec = compare_reach(y, [WCVDParams(context=14), WCVDParams(context=39)], tp)
        assert rec["chosen"] == 39 and rec["val_loss"] == [] and "no validation" in rec["note"]
