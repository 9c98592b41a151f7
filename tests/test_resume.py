"""Reproducibility and resumption of the whole workflow on the CPU.

Run A goes through uninterrupted. Run B is killed (SIGKILL, whole process group) in the
middle of training, then the same command is run again. B must end bit-identical to A
(same data + config + seed -> same denoised stack and metrics), with no partial files.

The kill is deterministic: run B's Python processes load a ``sitecustomize`` (through
PYTHONPATH) that holds the training job inside its ``HOLD_EPOCH``-th epoch log call --
after the epoch's row is in ``train_log.csv.part`` -- and writes a flag file.  The test
waits for the flag (no race with a fast training finishing between two polls, however
loaded the machine), then kills the whole process group.
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
    "defaults": {"train": {"epochs": 60, "crop": 32, "val_crop": 32}, "prefilter": {"method": "gaussian2d"},
                 "model": {"name": "wcvd"}},  # 8 frames: too few for auto
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HOLD_EPOCH = 3
#: Loaded by every Python process of run B (snakemake and its script jobs): a handler on
#: the 'emdenoise' logger (``stage.setup_logging`` only replaces the root's handlers)
#: that blocks the training job at its HOLD_EPOCH-th "epoch ..." record, so training
#: cannot complete before the test kills it.  Gives up after 15 min (no orphan).
HOOK = """
import logging, os, time

class _Hold(logging.Handler):
    seen = 0

    def emit(self, record):
        if not record.getMessage().startswith("epoch "):
            return
        _Hold.seen += 1
        if _Hold.seen >= int(os.environ["EMDENOISE_TEST_HOLD_EPOCH"]):
            with open(os.environ["EMDENOISE_TEST_HOLD_FLAG"], "w") as fh:
                fh.write(str(os.getpid()))
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                time.sleep(0.5)
            os._exit(3)

logging.getLogger("emdenoise").addHandler(_Hold())
"""


def _cmd(workdir: Path) -> list[str]:
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    return [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "1",
            "--configfile", str(cfg)]


def _run(workdir: Path) -> None:
    proc = subprocess.run(_cmd(workdir), capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _kill_during_training(workdir: Path) -> None:
    hook = workdir / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    flag = workdir / "held"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [ENV.get("PYTHONPATH")])]),
           "EMDENOISE_TEST_HOLD_EPOCH": str(HOLD_EPOCH), "EMDENOISE_TEST_HOLD_FLAG": str(flag)}
    proc = subprocess.Popen(_cmd(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # generous: only a broken run takes this long
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert flag.exists(), f"training never reached epoch {HOLD_EPOCH} (exit code {proc.poll()})"
        assert proc.poll() is None, "the workflow ended while its training was held"
        part = workdir / "results" / "c" / "wcvd" / "train_log.csv.part"
        assert len(part.read_text().splitlines()) == 1 + HOLD_EPOCH  # header + rows: killed mid-training
    finally:
        if proc.poll() is None:
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
    pd.testing.assert_frame_equal(ma, mb, check_exact=True)  # bit-identical, not within a tolerance
    assert not [p for p in (b / "results").rglob("*") if ".tmp" in p.name]
