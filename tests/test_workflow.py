"""The Snakemake workflow end to end: dry run, lint, a tiny real run, bad configs, real data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml

from emdenoise import io, synthetic

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
AU = REPO.parent / "shared" / "data" / "au_graphene_liquid_cell"


def snakemake(workdir: Path, *args: str, config: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           *args]
    if config is not None:  # last: --configfile takes every following word as a file
        cfg = workdir / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def tiny_config(tmp_path: Path) -> dict:
    """Two demo movies, a user's own TIFF and MRC, and a tilt series (no drift correction)."""
    own = synthetic.simulate_movie(n_frames=6, shape=(48, 40), mode="counting", dose=2.0, max_drift=2.0, seed=5)
    tifffile.imwrite(tmp_path / "own.tif", np.rint(own.noisy).astype(np.uint16))
    with mrcfile.new(tmp_path / "own.mrc") as m:
        m.set_data(own.noisy.astype(np.float32))
        m.voxel_size = 1.25
    tilt = synthetic.simulate_movie(n_frames=5, shape=(40, 40), mode="linear", max_drift=0.0, seed=6)
    with mrcfile.new(tmp_path / "tilts.mrc") as m:
        m.set_data(tilt.noisy.astype(np.float32))
        m.voxel_size = 2.0
    (tmp_path / "tilts.tlt").write_text("\n".join(f"{a:.1f}" for a in (-6, -3, 0, 3, 6)) + "\n")
    return {
        "results": "results",
        "demo": {
            "count": {"mode": "counting", "n_frames": 8, "shape": [64, 64], "format": "tif", "max_drift": 3.0},
            "lin": {"mode": "linear", "n_frames": 8, "shape": [64, 48], "format": "mrc", "max_drift": 3.0},
        },
        "datasets": {
            "count": {"path": "resources/demo/count.tif", "ground_truth": "resources/demo/count_truth.tif"},
            "lin": {"path": "resources/demo/lin.mrc", "ground_truth": "resources/demo/lin_truth.mrc",
                    "model": {"name": "auto"},  # WCVD and SHINE both trained, the lower uMSE wins
                    "shine": {"centre_channels": 8, "neighbour_channels": 4, "channels": 8, "blocks": 2},
                    "shine_train": {"batch_size": 4, "crop": 32}},
            "own_tif": {"path": str(tmp_path / "own.tif"), "pixel_size": 0.5},
            "own_mrc": {"path": str(tmp_path / "own.mrc")},
            "tilts": {"path": str(tmp_path / "tilts.mrc"), "kind": "tilt_series"},
        },
        # tiny training so the whole run takes seconds on a CPU
        "defaults": {"train": {"epochs": 3, "crop": 32, "val_crop": 32}, "prefilter": {"epochs": 3},
                     "model": {"name": "wcvd"},  # one network: a run of seconds
                     "infer": {"tilt_tile": 32, "tilt_overlap": 16}},
    }


def test_dry_run_and_lint_of_the_default_config(tmp_path):
    # in an empty folder: results/ of an earlier `make run` in the checkout must not matter
    dry = subprocess.run([str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n",
                          "--cores", "1", "--configfile", str(REPO / "config" / "config.yaml")],
                         cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "report" in dry.stdout and "demo" in dry.stdout
    lint = subprocess.run([str(SNAKEMAKE), "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr


def test_tiny_run_end_to_end(tmp_path):
    config = tiny_config(tmp_path)
    proc = snakemake(tmp_path, config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pd.read_csv(tmp_path / "results" / "report" / "metrics.csv")
    for ds in config["datasets"]:
        models = {"wcvd", "wcvd_ctx", "shine", "classical", "ensemble"} if ds == "lin" else {"wcvd"}
        assert set(table[table.dataset == ds].method) == {"raw", "gaussian2d", "gaussian3d"} | models, ds
    rows = table.set_index(["dataset", "method"])
    # ground truth was used where given, and only there
    assert np.isfinite(rows.loc[("count", "raw"), "psnr_db"])
    assert np.isnan(rows.loc[("own_tif", "raw"), "psnr_db"])
    assert rows.loc[("count", "gaussian3d"), "psnr_db"] > rows.loc[("count", "raw"), "psnr_db"]
    # the tilt series skipped drift correction: all shifts zero
    tilt_drift = pd.read_csv(tmp_path / "results" / "tilts" / "drift.csv")
    assert (tilt_drift[["dy", "dx"]].to_numpy() == 0).all()
    # outputs complete, nothing half-written left behind, raw inputs untouched
    res = tmp_path / "results"
    assert (res / "report" / "report.html").stat().st_size > 10_000  # embedded images
    assert not [p for p in res.rglob("*") if ".tmp" in p.name]
    for ds in config["datasets"]:
        assert (res / ds / "blindspot.json").exists() and (res / ds / "preview.png").exists()
        assert (res / ds / "wcvd" / "model.pt").exists() and (res / ds / "wcvd" / "train_log.csv").exists()
        choice = json.loads((res / ds / "model_choice.json").read_text())
        if choice["chosen"] == "classical":  # a filter: no checkpoint
            assert choice["checkpoint"] is None and len(choice["sigma"]) == 3
        elif choice["chosen"] == "ensemble":  # several models: each member's checkpoint
            assert choice["checkpoint"] is None and set(choice["checkpoints"]) == {"wcvd", "wcvd_ctx", "shine"}
        else:
            assert (tmp_path / choice["checkpoint"]).resolve() == (res / ds / choice["chosen"] / "model.pt").resolve()
        if ds == "lin":  # auto: the candidate with the lowest self-supervised loss, evidence recorded
            assert set(choice["loss"]) == {"wcvd", "wcvd_ctx", "shine", "classical", "ensemble"}
            assert (res / ds / "classical" / "tuning.csv").exists()
            single = {m: v for m, v in choice["loss"].items() if m != "ensemble"}
            ens = choice["ensemble"]  # the candidates combined: chosen only where significantly lower
            assert ens["members"] == ["wcvd", "wcvd_ctx", "shine", "classical"] and ens["versus"] == min(single,
                                                                                                      key=single.get)
            assert choice["chosen"] == ("ensemble" if ens["chosen"] else ens["versus"])
            e_attrs = io.read_zarr(res / ds / "ensemble" / "denoised.zarr")[1]
            assert e_attrs["n2s_loss"] == choice["loss"]["ensemble"] and e_attrs["ensemble"]["members"] == ens["members"]
            assert e_attrs["temporal_reach"] == max(choice["reaches"][m] for m in ens["members"])
            # each loss is that of the candidate's blind output against the aligned movie
            aligned = io.read_zarr(res / ds / "aligned.zarr")[0][:]
            for m in ("wcvd", "shine"):
                blind = io.read_zarr(res / ds / m / "denoised_raw.zarr")[0][:]
                assert choice["loss"][m] == pytest.approx(float(np.mean((blind.astype(np.float64) - aligned) ** 2)),
                                                          rel=1e-6)
            # each network's own pixel given back with the recorded weight (SHINE: always, no low-pass after)
            assert set(choice["unblind"]) == {"wcvd", "wcvd_ctx", "shine", "ensemble"}
            w = choice["unblind"]["shine"]
            assert 0 <= w < 1 and io.read_zarr(res / ds / "shine" / "denoised.zarr")[1]["lowpass"]["unblind"]["applied"]
            np.testing.assert_allclose(io.read_zarr(res / ds / "shine" / "denoised.zarr")[0][:],
                                       blind + np.float32(w) * (aligned - blind), rtol=1e-6, atol=1e-6)
            # the report's per-frame loss averages to the loss the choice compared, for every candidate
            per = pd.read_csv(res / ds / "diagnostics" / "per_frame_loss.csv").groupby("method").loss.mean()
            assert set(per.index) == set(choice["loss"])
            for m, v in choice["loss"].items():
                assert per[m] == pytest.approx(v, rel=1e-4), m
        else:
            assert choice["chosen"] == "wcvd"
        prov = json.loads((res / ds / "provenance.json").read_text())
        assert prov["input"]["sha256"]
        if choice["chosen"] == "ensemble":
            assert prov["model"]["ensemble"]["models"]["wcvd"]["train_params"]["epochs"] == 3
        elif choice["chosen"] != "classical":
            assert prov["model"]["train_params"]["epochs"] == 3
    # denoised stacks exported in the input's family, same frame count and pixel size as aligned
    with mrcfile.open(res / "own_mrc" / "denoised.mrc", permissive=True) as m:
        assert m.data.shape[0] == 6 and np.isclose(float(m.voxel_size.x), 1.25)
    with tifffile.TiffFile(res / "own_tif" / "denoised.tif") as t:
        assert t.asarray().dtype == np.float32 and t.imagej_metadata["unit"] in ("nm", "Å", "\\u00C5")
    assert (res / "count" / "denoised.tif").exists() and (res / "lin" / "denoised.mrc").exists()
    # the tilt series went through overlapping tiles; its angles are copied beside the MRC
    assert io.read_zarr(res / "tilts" / "wcvd" / "denoised_raw.zarr")[1]["tiling"] == {"tile": 32, "overlap": 16}
    # a tilt series follows IMOD's basename convention: <name>_denoised.mrc + .tlt
    assert np.loadtxt(res / "tilts" / "tilts_denoised.tlt").tolist() == [-6, -3, 0, 3, 6]
    assert (res / "tilts" / "tilts_denoised.mrc").exists() and not (res / "tilts" / "denoised.mrc").exists()
    # Snakemake's own report: metrics table, previews, drift and noise plots with captions
    rep = snakemake(tmp_path, "--report", str(tmp_path / "smk_report.zip"), config=config)
    assert rep.returncode == 0, rep.stderr[-3000:]
    import zipfile
    names = zipfile.ZipFile(tmp_path / "smk_report.zip").namelist()
    assert sum(n.endswith("/metrics.csv") for n in names) == 1
    for f in ("preview.png", "drift.png", "noise_correlation.png"):
        assert sum(n.endswith("/" + f) for n in names) == len(config["datasets"]), f


def test_config_typo_is_an_error_naming_the_key(tmp_path):
    config = tiny_config(tmp_path)
    config["datasets"]["own_tif"]["pixelsize"] = 0.5
    proc = snakemake(tmp_path, "-n", config=config)
    assert proc.returncode != 0
    assert "pixelsize" in proc.stderr + proc.stdout


def test_wrong_type_is_an_error_naming_the_key(tmp_path):
    config = tiny_config(tmp_path)
    config["defaults"] = {"drift": {"upsample": "ten"}}
    proc = snakemake(tmp_path, "-n", config=config)
    assert proc.returncode != 0
    assert "upsample" in proc.stderr + proc.stdout


def test_missing_input_path_is_named(tmp_path):
    config = {"datasets": {"gone": {"path": str(tmp_path / "nowhere.tif")}}}
    proc = snakemake(tmp_path, "-n", config=config)
    assert proc.returncode != 0
    out = proc.stderr + proc.stdout
    assert "nowhere.tif" in out and "does not exist" in out


def test_bad_input_file_fails_cleanly_without_partial_output(tmp_path):
    bad = np.ones((6, 32, 32), np.float32)
    bad[3, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    proc = snakemake(tmp_path, f"results/nan/raw.zarr", config={"datasets": {"nan": {"path": str(tmp_path / "nan.tif")}}})
    assert proc.returncode != 0
    log = (tmp_path / "results" / "logs" / "nan" / "ingest.log").read_text()
    assert "nan.tif" in log and "NaN" in log
    assert "Traceback" not in log
    assert not (tmp_path / "results" / "nan" / "raw.zarr").exists()
    assert not [p for p in (tmp_path / "results").rglob("*") if ".tmp" in p.name]


@pytest.mark.skipif(not AU.is_dir(), reason="shared real data not present")
def test_real_au_movie_subset(tmp_path):
    """Ingest -> metrics on the first 10 frames of the real K2 movie, read in place."""
    config = {"datasets": {"au": {"path": str(AU), "pixel_size": 0.317, "frames": [0, 10]}},
              "defaults": {"train": {"epochs": 20}, "prefilter": {"epochs": 20},
                           "model": {"name": "wcvd"}}}  # short: full runs use config/au_graphene_liquid_cell.yaml
    proc = snakemake(tmp_path, config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = tmp_path / "results"
    table = pd.read_csv(res / "au" / "metrics.csv").set_index("method")
    assert table.loc["gaussian3d", "upsnr_db"] > table.loc["raw", "upsnr_db"]
    drift = pd.read_csv(res / "au" / "drift.csv")
    assert len(drift) == 10 and np.abs(drift[["dy", "dx"]].to_numpy()).max() < 50
    spot = yaml.safe_load((res / "au" / "blindspot.json").read_text())
    assert spot["blindspot"] == 3  # as the SHINE authors chose for this movie
    assert (res / "au" / "denoised.tif").exists() and "wcvd" in set(table.index)


def _intervals(log_dir: Path, pattern: str) -> list[tuple[str, float, float]]:
    """(log name, start, end) in seconds from the 'start' / 'done' lines of stage logs."""
    import datetime as dt
    out = []
    for path in sorted(log_dir.rglob(pattern)):
        stamps = [dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                  for line in path.read_text().splitlines() if " start " in line or " done " in line]
        out.append((f"{path.parent.name}/{path.name}", stamps[0], stamps[-1]))
    return out


def test_gpu_jobs_run_one_at_a_time_under_the_workstation_profile(tmp_path):
    # Three datasets, many cores: the network rules declare `gpu` (device auto) and the
    # workstation profile (profiles/default, found from the repository) caps it at 1, so no
    # two trainings or inferences ever overlap -- on a one-GPU machine they would share it.
    data = {}
    for i in range(3):
        movie = synthetic.simulate_movie(n_frames=6, shape=(40, 40), mode="counting", dose=2.0, max_drift=0.0,
                                         seed=i)
        tifffile.imwrite(tmp_path / f"m{i}.tif", movie.noisy.astype(np.float32))
        data[f"m{i}"] = {"path": str(tmp_path / f"m{i}.tif")}
    config = {"datasets": data, "demo": {}, "keep_intermediates": False,
              "defaults": {"train": {"epochs": 6, "crop": 24, "val_crop": 24}, "model": {"name": "wcvd"},
                           "prefilter": {"method": "gaussian2d"}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "12",
           "--configfile", str(tmp_path / "config.yaml")]
    # EMDENOISE_GPU=1: as on a one-GPU workstation (this machine has none: there the jobs
    # declare gpu=0 and run side by side, checked below)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "EMDENOISE_GPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profiles/default" in proc.stderr  # the workstation profile was in force
    assert "gpu=1" in proc.stderr
    dry = subprocess.run(cmd + ["--forceall", "-n"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EMDENOISE_GPU": "0"})
    assert dry.returncode == 0 and "rule train" in dry.stdout + dry.stderr
    assert "gpu=1" not in dry.stdout + dry.stderr and "gpu=0" in dry.stdout + dry.stderr
    # memory from the size of the job's input, evaluated once the input exists
    from emdenoise.stage import job_memory_mb, job_runtime_min, stack_megabytes
    aligned = stack_megabytes(tmp_path / "results" / "m0" / "aligned.zarr")
    assert aligned > 0 and f"mem_mb={job_memory_mb(aligned, 2, 4000)}," in proc.stderr  # train: 2 copies
    assert f"runtime={job_runtime_min(aligned, 120, 10)}" in proc.stderr  # infer: grows with the input
    # keep_intermediates: false -- what nobody reads after the next stage was deleted (temp())
    for i in range(3):
        res = tmp_path / "results" / f"m{i}"
        assert not (res / "prefiltered.zarr").exists() and not (res / "wcvd" / "denoised_raw.zarr").exists()
        assert (res / "aligned.zarr").exists() and (res / "wcvd" / "denoised.zarr").exists()
    jobs = _intervals(tmp_path / "results" / "logs", "train_*.log") + _intervals(tmp_path / "results" / "logs",
                                                                                   "infer_*.log")
    assert len(jobs) == 6, jobs
    jobs.sort(key=lambda j: j[1])
    for (a, _, end), (b, start, _) in zip(jobs, jobs[1:]):
        assert start >= end - 0.01, f"{b} started before {a} ended: two GPU jobs at once"
