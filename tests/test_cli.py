"""The `emdenoise` command: info and simulate, and clean errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from emdenoise import cli, io

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
    src, out, model = tmp_path / "in.mrc", tmp_path / "out.tif", tmp_path / "m.pt"
    assert cli.main(["simulate", str(src), "--frames", "6", "--size", "48", "40", "--mode", "linear",
                     "--pixel-size", "0.8"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {crop: 32, val_crop: 32}\nlowpass: {diameter: 0.5}\n")
    assert cli.main(["denoise", str(src), str(out), "--model", "wcvd", "--epochs", "2", "--device", "cpu", "--config", str(cfg),
                     "--save-model", str(model)]) == 0
    den, meta = io.read_stack(out)
    noisy = np.asarray(io.read_stack(src)[0][:])
    assert den.shape == noisy.shape and meta["pixel_size"] == pytest.approx(0.8, rel=1e-5)
    # same intensity scale and offset as the input (normalisation undone), less noise
    assert abs(np.asarray(den[:]).mean() - noisy.mean()) < 0.05 * noisy.mean()
    assert np.asarray(den[:]).std() < noisy.std()
    assert model.exists()


def test_denoise_config_typo_is_named(tmp_path):
    src = tmp_path / "in.npy"
    np.save(src, np.ones((4, 32, 32), np.float32))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {epoch: 3}\n")
    proc = subprocess.run([str(EXE), "denoise", str(src), str(tmp_path / "o.tif"), "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "epoch" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.tif").exists()


def test_denoise_auto_trains_both_and_reports_the_choice(tmp_path, capsys):
    src, out = tmp_path / "in.tif", tmp_path / "out.npy"
    assert cli.main(["simulate", str(src), "--frames", "8", "--size", "40", "--mode", "counting"]) == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("train: {crop: 32, val_crop: 32}\nshine: {centre_channels: 4, neighbour_channels: 4, "
                   "channels: 4, blocks: 1}\nshine_train: {batch_size: 2, crop: 32}\n")
    capsys.readouterr()
    assert cli.main(["denoise", str(src), str(out), "--model", "auto", "--epochs", "1", "--device", "cpu",
                     "--config", str(cfg)]) == 0
    said = capsys.readouterr().out
    assert "auto: chose" in said and "'wcvd'" in said and "'shine'" in said
    assert np.load(out).shape == (8, 40, 40)
