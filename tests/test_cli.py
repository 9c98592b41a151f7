"""The `emdenoise` command: info and simulate, and clean errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
