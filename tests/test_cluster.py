"""The cluster path: jobs submitted through Snakemake's cluster-generic executor to a
stand-in scheduler (each job its own background process, polled by a status script),
and a dry run of the SLURM profile."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
CONFIG = {
    "demo": {"c": {"mode": "counting", "n_frames": 8, "shape": [48, 48], "max_drift": 2.0}},
    "datasets": {"c": {"path": "resources/demo/c.tif", "ground_truth": "resources/demo/c_truth.tif"}},
    "defaults": {"train": {"epochs": 2, "crop": 32, "val_crop": 32}, "prefilter": {"epochs": 2},
                 "model": {"name": "wcvd"}},  # 8 frames: too few for auto
}


def _run(tmp_path, *args, env=None):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), *args,
           "--configfile", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


def test_workflow_runs_through_a_batch_scheduler(tmp_path):
    queue = tmp_path / "queue"
    queue.mkdir()
    proc = _run(tmp_path, "--executor", "cluster-generic", "--jobs", "2",
                "--cluster-generic-submit-cmd", str(REPO / "tests" / "cluster" / "submit.sh"),
                "--cluster-generic-status-cmd", str(REPO / "tests" / "cluster" / "status.sh"),
                "--latency-wait", "10", "--max-status-checks-per-second", "5",
                env={"EMDENOISE_FAKE_QUEUE": str(queue), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(queue.glob("job.*"))
    # every rule ran as its own submitted job (demo, ingest x2, prefilter, drift, ...), all succeeded
    assert len(jobs) >= 12
    assert all((j / "rc").read_text().strip() == "0" for j in jobs)
    table = pd.read_csv(tmp_path / "results" / "report" / "metrics.csv")
    assert set(table.method) == {"raw", "gaussian2d", "gaussian3d", "wcvd"}


def test_slurm_profile_dry_run(tmp_path):
    proc = _run(tmp_path, "--profile", str(REPO / "profiles" / "slurm"), "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = {b.split(":", 1)[0]: b for b in proc.stdout.split("rule ")[1:]}
    for rule in ("train", "infer"):  # GPU jobs
        assert "gpu=1" in blocks[rule] and "cpus_per_gpu=8" in blocks[rule], blocks[rule]
    assert "gpu=" not in blocks["drift"]  # CPU-only rules ask for no GPU
