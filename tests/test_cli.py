"""The `emdenoise` command: info, simulate, denoise (against ground truth), and clean errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import emdenoise.train
from emdenoise import cli, filters, io, pipeline
from emdenoise import config as emcfg
from emdenoise.metrics import psnr
from emdenoise.synthetic import simulate_movie

EXE = Path(sys.executable).with_name("emdenoise")


def test_simulate_then_info_round_trip(tmp_path, capsys):
    out, truth, shifts = tmp_path / "m.tif", tmp_path / "t.mrc", tmp_path / "s.csv"
    assert cli.main(["simulate", str(out), "--truth", str(truth), "--shifts", str(shifts), "--frames", "5",
                     "--size", "40", "32", "--mode", "counting", "--pixel-size", "0.5", "--seed", "3"]) == 0
    noisy, meta = io.read_stack(out)
    clean, _ = io.read_stack(truth)
    assert noisy.shape == clean.shape == (5, 40, 32)
    assert meta["pixel_size"] == 0.5
    # counting mode: integer counts whose mean follows the clean expectation
    data = np.asarray(noisy[:])
    assert np.all(data == np.rint(data))
    assert abs(data.mean() - np.asarray(clean[:]).mean()) < 0.1
    assert np.loadtxt(shifts, delimiter=",", skiprows=1).shape == (5, 2)
    capsys.readouterr()
    cli.main(["info", str(out)])
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [5, 40, 32] and info["format"] == "tiff"


def test_bad_file_gives_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "empty.tif"
    bad.write_bytes(b"")
    proc = subprocess.run([str(EXE), "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "empty.tif" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_info_reads_a_real_tiff_written_elsewhere(tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", np.arange(4 * 20 * 20, dtype=np.uint16).reshape(4, 20, 20),
                     photometric="minisblack")
    proc = subprocess.run([str(EXE), "info", str(tmp_path / "x.tif")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dtype"] == "uint16"


def test_denoise_trains_on_the_input_and_writes_the_same_shape(tmp_path):
    src, truth, out, model = tmp_path / "in.mrc", tmp_path / "truth.mrc", tmp_path / "out.tif", tmp_path / "m.pt"
    assert cli.main(["simulate", str(src), "--truth", str(truth), "--frames", "6", "--size", "48", "40",
                     "--mode", "linear", "--pixel-size", "0.8"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {crop: 32, val_crop: 32}\nlowpass: {diameter: 0.5}\n")
    assert cli.main(["denoise", str(src), str(out), "--model", "wcvd", "--epochs", "2", "--device", "cpu", "--config", str(cfg),
                     "--save-model", str(model)]) == 0
    den, meta = io.read_stack(out)
    noisy = np.asarray(io.read_stack(src)[0][:])
    assert den.shape == noisy.shape and meta["pixel_size"] == pytest.approx(0.8, rel=1e-5)
    # same intensity scale and offset as the input (normalisation undone), less noise
    den = np.asarray(den[:])
    assert abs(den.mean() - noisy.mean()) < 0.05 * noisy.mean()
    # it denoises, against the ground truth: clearly better than the raw movie and than a
    # per-frame Gaussian (sigma = 1 px) of the same movie.  Measured (seeds 0, 1; 2 epochs):
    # raw 11.0 / 10.2 dB, Gaussian 13.9 / 13.3 dB, denoised 18.7 / 18.3 dB.
    clean = np.asarray(io.read_stack(truth)[0][:])
    p_raw, p_gauss, p_den = psnr(noisy, clean), psnr(filters.gaussian2d(noisy, 1.0), clean), psnr(den, clean)
    assert p_den > p_raw + 5.0 and p_den > p_gauss + 2.0, (p_raw, p_gauss, p_den)
    assert model.exists()


def test_denoise_shows_training_and_inference_progress_bars(tmp_path, capsys, monkeypatch):
    """On a terminal (forced here: capsys is not one) each candidate gets a training bar
    over its epochs and an inference bar over the frames, both run to 100 %; -v adds one
    readable line per epoch on stdout."""
    import functools

    src, out = tmp_path / "in.npy", tmp_path / "out.npy"
    np.save(src, np.random.default_rng(0).poisson(2.0, (6, 40, 40)).astype(np.float32))
    monkeypatch.setattr(cli, "Progress", functools.partial(cli.Progress, disable=False))
    capsys.readouterr()
    assert cli.main(["denoise", str(src), str(out), "--model", "wcvd", "--epochs", "3", "--device", "cpu",
                     "-v"]) == 0
    cap = capsys.readouterr()
    bars = cap.err.replace("\r", "\n").splitlines()
    assert any(line.startswith("wcvd training: 100%") and "3/3" in line for line in bars), cap.err[-600:]
    assert any(line.startswith("wcvd denoising: 100%") and "6/6" in line for line in bars), cap.err[-600:]
    assert "epoch 3: train" in cap.out and "Traceback" not in cap.err
    assert np.load(out).shape == (6, 40, 40)


def test_progress_bars_hide_off_a_terminal():
    import io as _io

    buf = _io.StringIO()  # not a terminal: tqdm shows nothing (logs stay clean)
    prog = cli.Progress(file=buf)
    for e in range(1, 4):
        prog("wcvd", {"stage": "train", "epoch": e, "of": 3, "train_loss": 1.0, "val_loss": 0.5, "lr": 1e-3,
                      "seconds": 0.1})
    prog("wcvd", {"stage": "infer", "done": 5, "of": 5})
    prog.close()
    assert buf.getvalue() == ""


def test_denoise_config_typo_is_named(tmp_path):
    src = tmp_path / "in.npy"
    np.save(src, np.ones((4, 32, 32), np.float32))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {epoch: 3}\n")
    proc = subprocess.run([str(EXE), "denoise", str(src), str(tmp_path / "o.tif"), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "epoch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.tif").exists()


def _denoise_auto_tiny(src, out, tmp_path, capsys) -> str:
    """`emdenoise denoise --model auto` with 1 epoch and tiny networks; what it printed."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {crop: 32, val_crop: 32}\nshine: {centre_channels: 4, neighbour_channels: 4, "
                   "channels: 4, blocks: 1}\nshine_train: {batch_size: 2, crop: 32}\n")
    capsys.readouterr()
    assert cli.main(["denoise", str(src), str(out), "--model", "auto", "--epochs", "1", "--device", "cpu",
                     "--config", str(cfg)]) == 0
    return capsys.readouterr().out


def test_denoise_auto_trains_both_and_reports_the_choice(tmp_path, capsys):
    src, out = tmp_path / "in.tif", tmp_path / "out.npy"
    assert cli.main(["simulate", str(src), "--frames", "8", "--size", "40", "--mode", "counting"]) == 0
    said = _denoise_auto_tiny(src, out, tmp_path, capsys)
    assert "auto: chose" in said and " wcvd " in said and " shine " in said and " classical " in said
    assert np.load(out).shape == (8, 40, 40)


# ---- bad input: one line `emdenoise: error: <file>: <problem>`, exit 2, before any training
def _movie(t=6, n=32):
    return np.random.default_rng(0).poisson(2.0, (t, n, n)).astype(np.float32)


def _truncated(path, write):
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def no_training(monkeypatch):
    """Training replaced by a recorder that fails: bad input must be refused before it."""
    calls = []

    def train_model(*args, **kwargs):
        calls.append(args)
        raise AssertionError("train_model was called")
    monkeypatch.setattr(emdenoise.train, "train_model", train_model)  # pipeline imports it when it trains
    return calls


def _bad_input_case(case, tmp_path, monkeypatch):
    """(argv after 'denoise', the file the error must name, a word of the problem)."""
    src, out = tmp_path / "in.npy", tmp_path / "out.tif"
    np.save(src, _movie())
    if case == "nan":
        bad = _movie()
        bad[3, 5, 7] = np.nan
        np.save(src, bad)
        return [str(src), str(out)], src, "NaN"
    if case == "truncated_tif":
        src = tmp_path / "in.tif"
        _truncated(src, lambda p: io.write_stack(p, _movie()))
        return [str(src), str(out)], src, "truncated"
    if case == "truncated_mrc":
        src = tmp_path / "in.mrc"
        _truncated(src, lambda p: io.write_stack(p, _movie()))
        return [str(src), str(out)], src, "truncated"
    if case == "too_few_frames":
        np.save(src, _movie(t=2))
        return [str(src), str(out)], src, "2 frames"
    if case == "bad_output_extension":
        out = tmp_path / "out.png"
        return [str(src), str(out)], out, "unknown output extension"
    if case == "cuda_without_cuda":
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        return [str(src), str(out), "--device", "cuda"], src, "CUDA is not available"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["nan", "truncated_tif", "truncated_mrc", "too_few_frames",
                                  "bad_output_extension", "cuda_without_cuda"])
def test_denoise_bad_input_one_line_before_training(case, tmp_path, monkeypatch, capsys, no_training):
    argv, named, problem = _bad_input_case(case, tmp_path, monkeypatch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["denoise", *argv, "--epochs", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"emdenoise: error: {named}: ") and problem in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert no_training == []  # refused before any training
    assert not list(tmp_path.glob("out*"))  # and nothing written


def test_denoise_good_input_reaches_training(tmp_path, no_training):
    """The control for the test above: the same set-up with good input does call training."""
    src = tmp_path / "in.npy"
    np.save(src, _movie())
    with pytest.raises(AssertionError, match="train_model was called"):
        cli.main(["denoise", str(src), str(tmp_path / "out.tif"), "--model", "wcvd", "--epochs", "1",
                  "--device", "cpu", "--no-drift"])
    assert len(no_training) == 1


def test_denoise_cuda_without_cuda_is_one_line_exit_2(tmp_path):
    """A real process (no monkeypatch): CUDA hidden, `--device cuda` ends with one line."""
    src = tmp_path / "in.npy"
    np.save(src, _movie())
    proc = subprocess.run([str(EXE), "denoise", str(src), str(tmp_path / "o.tif"), "--device", "cuda"],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"emdenoise: error: {src}: device='cuda' requested but CUDA is not available\n"
    assert proc.stdout == "" and not (tmp_path / "o.tif").exists()


# ---- --model auto: the candidate it keeps is the one closer to the ground truth
# the choice between two trained networks: no context candidate, no least-squares start
# (its validated "epoch 0" would undo the deliberately wrecked training below)
AUTO_TINY = {"model": {"name": "auto", "long_kt": None, "context": 0},
             "train": {"crop": 32, "val_crop": 32, "linear_start": False},
             "shine": {"centre_channels": 4, "neighbour_channels": 4, "channels": 4, "blocks": 1},
             "shine_train": {"batch_size": 4, "crop": 32, "lr": 1e-3}}


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a loaded 2-core machine ran tiny-crop
    training ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("wcvd_lr,winner", [(1e-3, "wcvd"), (0.5, "shine")], ids=["wcvd_wins", "shine_wins"])
def test_auto_keeps_the_candidate_with_the_lower_true_mse(tmp_path, one_thread, wcvd_lr, winner):
    """Linear-mode movie (PSF-correlated noise, 12 frames of 48 x 48 px), CPU-tiny SHINE,
    5 epochs: the two candidates' true MSEs differ clearly, and auto (Noise2Self loss, no
    ground truth) must keep the one with the lower true MSE.  The second case wrecks WCVD's
    training (lr 0.5) so that SHINE is the better one: together the two cases fail a
    choice that ignores the scores (always the first, always WCVD, the higher loss).
    Measured true MSE wcvd / shine: 132 / 277 and 468 / 277 (raw 860); < 1 s each.
    (With smaller MSE gaps uMSE, the rule before, picked the worse candidate in 3 of 8
    movies tried: the gap must be clear for the test to be fair.)"""
    movie = simulate_movie(12, (48, 48), mode="linear", psf_sigma=1.0, max_drift=0.0, seed=0)
    src = tmp_path / "in.npy"
    np.save(src, movie.noisy)
    settings = {**AUTO_TINY, "train": {**AUTO_TINY["train"], "lr": wcvd_lr}}
    ds = emcfg.build({"datasets": {"m": {"path": str(src)}}, "defaults": settings}).datasets["m"]
    result = pipeline.denoise_stack(movie.noisy, ds, device="cpu", train_overrides={"device": "cpu", "epochs": 5})
    every = {name: float(np.mean((out - movie.clean) ** 2)) for name, out in result["outputs"].items()}
    assert set(every) == {"wcvd", "shine", "classical", "ensemble"}
    # the rule between the two networks (the tuned Gaussian may beat both at 5 epochs)
    nets = {m: result["outputs"][m] for m in ("wcvd", "shine")}
    choice = pipeline.choose({m: result["choice"]["loss"][m] for m in nets}, ds)
    true_mse = {m: every[m] for m in nets}
    lo, hi = sorted(true_mse.values())
    assert hi > 1.5 * lo, true_mse  # a clear difference, or the test proves nothing
    assert choice["chosen"] == min(true_mse, key=true_mse.get) == winner, (true_mse, choice)
    # and auto's own choice among all three is never far from the best of them
    assert every[result["chosen"]] <= 1.3 * min(every.values()), (every, result["choice"])
    assert result["output"] is result["outputs"][result["chosen"]]


# ---- movies larger than memory: intermediates in Zarr stores, same result
@pytest.mark.parametrize("drift_px,prefilter", [(0.0, "{epochs: 1}"), (8.0, "{method: gaussian2d}")])
def test_denoise_through_a_work_folder_equals_the_in_memory_run(tmp_path, capsys, monkeypatch, drift_px, prefilter):
    """--work-dir (what a movie above pipeline.IN_MEMORY_BYTES takes): the pre-filter, the drift
    canvas, each candidate's blind output and the tuned Gaussian go through Zarr stores and the
    output is written from lazy arrays -- values equal to the in-memory chain, the same choice,
    and the work folder is gone afterwards.  Training reads crops from the store too."""
    torch.set_num_threads(1)
    src = tmp_path / "in.tif"
    mv = simulate_movie(10, (96, 88), mode="counting", dose=2.0, max_drift=drift_px, seed=4)
    tifffile.imwrite(src, mv.noisy)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train: {{crop: 32, val_crop: 32}}\nprefilter: {prefilter}\n"
                   "shine: {centre_channels: 4, neighbour_channels: 4, channels: 4, blocks: 1}\n"
                   "shine_train: {batch_size: 2, crop: 32}\n")
    common = ["--model", "auto", "--epochs", "1", "--device", "cpu", "--config", str(cfg)]
    capsys.readouterr()
    assert cli.main(["denoise", str(src), str(tmp_path / "mem.tif"), *common]) == 0
    said_mem = capsys.readouterr().out
    monkeypatch.setattr(emdenoise.train, "IN_MEMORY_BYTES", 0)  # training reads crops from the store
    work = tmp_path / "work"
    assert cli.main(["denoise", str(src), str(tmp_path / "zarr.tif"), *common, "--work-dir", str(work)]) == 0
    cap = capsys.readouterr()
    assert "intermediates go to" in cap.err
    def same(text, out):  # the training's wall-clock seconds are not a result
        return re.sub(r"\d+ s training", "N s training", text.replace(str(tmp_path / out), "OUT"))

    assert same(said_mem, "mem.tif") == same(cap.out, "zarr.tif")
    if drift_px:
        assert "shifted back" in said_mem
    # equal up to float32 rounding (oneDNN's summation order may follow the thread state; 1 ulp)
    np.testing.assert_allclose(tifffile.imread(tmp_path / "zarr.tif"), tifffile.imread(tmp_path / "mem.tif"),
                               rtol=1e-5, atol=1e-5)
    assert work.is_dir() and not any(work.iterdir())  # our folder inside it removed, the user's kept


def test_a_movie_above_the_memory_bound_goes_through_a_work_folder_beside_the_output(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in.npy", tmp_path / "out" / "o.zarr"
    out.parent.mkdir()
    np.save(src, simulate_movie(6, (40, 40), mode="counting", max_drift=0.0, seed=1).noisy)
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 1000)
    seen = []
    real = pipeline.denoise_stack

    def spy(stack, ds, **kw):
        seen.append((type(stack).__name__, kw["workdir"], sorted(p.name for p in Path(kw["workdir"]).iterdir())))
        return real(stack, ds, **kw)
    monkeypatch.setattr(pipeline, "denoise_stack", spy)
    assert cli.main(["denoise", str(src), str(out), "--model", "wcvd", "--epochs", "1", "--device", "cpu",
                     "--no-drift"]) == 0
    (kind, work, files), = seen
    assert kind == "Array" and Path(work).parent == out.parent and files == ["input.zarr"]
    assert not Path(work).exists() and sorted(p.name for p in out.parent.iterdir()) == ["o.zarr"]
    arr, _ = io.read_zarr(out)
    assert arr.shape == (6, 40, 40) and np.isfinite(arr[:]).all()


def test_denoise_says_when_nl_means_won(tmp_path, capsys):
    """A tilt series: the classical candidate is NL-means, and 1-epoch networks do not beat it."""
    import tifffile

    from emdenoise.synthetic import simulate_tilt_series

    src, out = tmp_path / "tilt.tif", tmp_path / "out.npy"
    tifffile.imwrite(src, simulate_tilt_series(21, (64, 64), dose=4.0, psf_sigma=1.0, seed=3).noisy)
    said = _denoise_auto_tiny(src, out, tmp_path, capsys)
    assert "auto: chose classical" in said and "(classical: NL-means of the temporal average" in said
    assert "chosen over the Gaussian" in said and np.load(out).shape == (21, 64, 64)
