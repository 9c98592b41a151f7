"""Reproducibility and resumption of the whole workflow on the CPU.

Run A goes through uninterrupted. Run B is killed (SIGKILL, whole process group) in the
middle of training, then the same command is run again. B must end bit-identical to A
(same data + config + seed -> same denoised stack and metrics), with no partial files.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from emdenoise import io

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CONFIG = {
    "demo": {"c": {"mode": "counting", "n_frames": 8, "shape": [48, 48], "max_drift": 2.0, "seed": 4}},
    "datasets": {"c": {"path": "resources/demo/c.tif", "ground_truth": "resources/demo/c_truth.tif"}},
    "defaults": {"train": {"epochs": 60, "crop": 32, "val_crop": 32}, "prefilter": {"method": "gaussian2d"}},
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cmd(workdir: Path) -> list[str]:
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1",
            "--configfile", str(cfg)]


def _run(workdir: Path) -> None:
    proc = subprocess.run(_cmd(workdir), capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _kill_during_training(workdir: Path) -> None:
    proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    log = workdir / "results" / "logs" / "c" / "train_wcvd.log"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("INFO emdenoise: epoch") >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the workflow ended before training could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (workdir / "results" / "c" / "wcvd" / "model.pt").exists()


def test_killed_run_resumes_to_bit_identical_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _run(a)
    _kill_during_training(b)
    # the lock of the killed run is left behind, as after a crash: unlock, then the same command
    subprocess.run(_cmd(b) + ["--unlock"], capture_output=True, env=ENV, check=True)
    _run(b)
    for name in ("denoised.zarr", "wcvd/denoised_raw.zarr", "aligned.zarr"):
        da, _ = io.read_zarr(a / "results" / "c" / name)
        db, _ = io.read_zarr(b / "results" / "c" / name)
        np.testing.assert_array_equal(da[:], db[:], err_msg=name)
    ma = pd.read_csv(a / "results" / "report" / "metrics.csv")
    mb = pd.read_csv(b / "results" / "report" / "metrics.csv")
    pd.testing.assert_frame_equal(ma, mb)
    assert not [p for p in (b / "results").rglob("*") if ".tmp" in p.name]
