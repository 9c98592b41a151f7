"""A full output disk: every writer (TIFF, MRC, Zarr, NPY) ends with one line naming the
path and "no space left on device", removes its temporary output and never dies by a
signal; `emdenoise denoise` exits 2 with that line and no traceback.

Two ways: a real 100 kB tmpfs (needs root, as in CI; skipped where mounting is not
permitted) and ENOSPC injected at the write calls (always on).
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from emdenoise import cli, io, pipeline
from emdenoise.errors import DiskFullError

EXTS = [".tif", ".mrc", ".zarr", ".npy"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
BIG = (8, 128, 128)  # 512 kB float32: does not fit in 100 kB


def noise(shape=BIG):
    """Incompressible float32 (Zarr compresses its chunks: constant frames would fit)."""
    return np.random.default_rng(1).random(shape).astype(np.float32)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 kB tmpfs mounted at a fresh folder; unmounted afterwards."""
    d = tmp_path / "full"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture
def enospc(monkeypatch):
    """Every way the writers put bytes on disk fails with ENOSPC."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def full_async(*args, **kwargs):
        full()

    monkeypatch.setattr(os, "posix_fallocate", full)  # MRC and NPY reserve before mapping
    monkeypatch.setattr(tifffile.FileHandle, "write", full)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_async)


def _assert_one_line(exc_info, path):
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, DiskFullError)
    assert str(path) in msg and "no space left on device" in msg and "\n" not in msg


@pytest.mark.parametrize("ext", EXTS)
def test_injected_enospc(tmp_path, enospc, ext):
    out = tmp_path / f"out{ext}"
    with pytest.raises(DiskFullError) as e:
        io.write_stack(out, np.ones(BIG, np.float32), pixel_size=1.0, metadata={"tilt_angles": list(range(8))})
    _assert_one_line(e, out)
    assert list(tmp_path.iterdir()) == []


def test_injected_enospc_in_chunked_style_writer(tmp_path, enospc):
    """Workers that write w.array directly (chunked inference) hit the full disk too."""
    out = tmp_path / "denoised_raw.zarr"
    with pytest.raises(DiskFullError) as e:
        with io.ZarrStackWriter(out, BIG) as w:
            w.array[0] = np.ones(BIG[1:], np.float32)
    _assert_one_line(e, out)
    assert list(tmp_path.iterdir()) == []


def _fake_denoise(stack, ds, **kwargs):
    """Stands in for training: the disk-full path is about writing the result."""
    return {"chosen": "classical", "choice": {"sigma": (1.0, 1.0, 1.0)}, "outputs": {"classical": None},
            "drift": None, "checkpoints": {}, "warnings": [], "output": np.ones(stack.shape, np.float32)}


@pytest.mark.parametrize("ext", EXTS)
def test_cli_denoise_enospc_exits_2(tmp_path, enospc, monkeypatch, capsys, ext):
    src = tmp_path / "in" / "movie.npy"
    src.parent.mkdir()
    np.save(src, np.random.default_rng(0).random(BIG).astype(np.float32))
    monkeypatch.setattr(pipeline, "denoise_stack", _fake_denoise)
    out = tmp_path / "out" / f"denoised{ext}"
    out.parent.mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["denoise", str(src), str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(out) in err and "no space left on device" in err
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("ext", EXTS)
def test_tmpfs_writers(tiny_disk, ext):
    out = tiny_disk / f"out{ext}"
    with pytest.raises(DiskFullError) as e:
        io.write_stack(out, noise(), pixel_size=1.0)
    _assert_one_line(e, out)
    assert list(tiny_disk.iterdir()) == []
    io.write_stack(out, np.ones((2, 32, 32), np.float32), pixel_size=1.0)  # after "freeing space"
    assert io.read_stack(out)[0].shape == (2, 32, 32)


@pytest.mark.parametrize("ext", EXTS)
def test_tmpfs_cli_denoise_no_signal_no_traceback(tmp_path, tiny_disk, ext):
    """In a child process, so a SIGBUS (the old memory-mapped MRC write) would show as a
    negative exit code instead of killing the test run."""
    src = tmp_path / f"movie-{uuid.uuid4().hex[:6]}.npy"
    np.save(src, np.random.default_rng(0).random(BIG).astype(np.float32))
    out = tiny_disk / f"denoised{ext}"
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from emdenoise import cli, pipeline
        def fake(stack, ds, **kwargs):
            return {{"chosen": "classical", "choice": {{"sigma": (1.0, 1.0, 1.0)}},
                    "outputs": {{"classical": None}}, "drift": None, "checkpoints": {{}}, "warnings": [],
                    "output": np.random.default_rng(1).random(stack.shape).astype(np.float32)}}
        pipeline.denoise_stack = fake
        sys.exit(cli.main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code, "denoise", str(src), str(out), "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(out) in r.stderr and "no space left on device" in r.stderr
    assert list(tiny_disk.iterdir()) == []


def test_any_atomic_write_reports_a_full_disk(tmp_path):
    """CSV / JSON / PNG outputs of the stages go through atomic_path too."""
    out = tmp_path / "metrics.csv"
    with pytest.raises(DiskFullError) as e:
        with io.atomic_path(out) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _assert_one_line(e, out)
    assert list(tmp_path.iterdir()) == []


# ---- inside the workflow ----------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")

#: Test-only ENOSPC for the stage scripts that Snakemake starts (a sitecustomize on
#: PYTHONPATH, nothing in the package): every Zarr write under a store whose path holds
#: $EMDENOISE_TEST_ENOSPC fails as on a full disk.
_SITECUSTOMIZE = '''
import os
import shutil
if os.environ.get("EMDENOISE_TEST_ENOSPC"):
    import errno
    import zarr.storage
    _set = zarr.storage.LocalStore.set
    async def _full(self, key, value, *args, **kwargs):
        if os.environ["EMDENOISE_TEST_ENOSPC"] in str(self.root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await _set(self, key, value, *args, **kwargs)
    zarr.storage.LocalStore.set = _full
'''


def _workflow(workdir: Path, *targets: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(SNAKEMAKE), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           *targets, "--configfile", str(workdir / "config.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _tiny_workflow(workdir: Path) -> None:
    """One 8-frame movie; Gaussian pre-filter and no network: the whole run takes seconds."""
    from emdenoise import synthetic
    import yaml

    m = synthetic.simulate_movie(n_frames=8, shape=(96, 96), mode="counting", dose=2.0, max_drift=2.0, seed=5)
    np.save(workdir / "movie.npy", m.noisy.astype(np.float32))
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "results": "results", "datasets": {"tiny": {"path": str(workdir / "movie.npy")}},
        "defaults": {"prefilter": {"method": "gaussian2d"}, "model": {"name": "none"}}}))


def _assert_failed_cleanly(proc, workdir: Path, rule: str, output: str) -> None:
    """The job failed with one line naming its output and the full disk; nothing partial."""
    res = workdir / "results"
    out = res / "tiny" / output
    assert proc.returncode != 0, proc.stderr[-3000:]
    log = (res / "logs" / "tiny" / f"{rule}.log").read_text()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in log, log
    said = f"results/tiny/{output}: no space left on device"  # the job's own (relative) output path
    assert said in errors[0], errors
    assert said in proc.stderr
    assert not out.exists()
    assert not [p for p in res.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.fixture
def mount_tmpfs():
    """mount(path, size) a tmpfs (root, as in CI; skip otherwise); all unmounted afterwards."""
    mounted = []

    def mount(path: Path, size: str):
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_workflow_on_a_full_disk_fails_cleanly_and_a_rerun_completes(tmp_path, mount_tmpfs):
    """The dataset's results folder on a small tmpfs that fills up in the stage after
    ingest: that job fails with one line naming its output, nothing partial stays, and
    the same command completes once space is freed (the ingested stack is kept)."""
    _tiny_workflow(tmp_path)
    data = tmp_path / "results" / "tiny"  # the logs stay outside, on the normal disk
    mount_tmpfs(data, "16m")
    first = _workflow(tmp_path, "results/tiny/raw.zarr")
    assert first.returncode == 0, first.stderr[-3000:]
    # leave half of what the ingested stack takes: the pre-filtered stack cannot fit
    raw_bytes = sum(p.stat().st_size for p in (data / "raw.zarr").rglob("*") if p.is_file())
    ballast = data / "ballast.bin"
    with open(ballast, "wb") as fh:
        fh.write(b"\1" * (shutil.disk_usage(data).free - raw_bytes // 2))
    full = _workflow(tmp_path)
    _assert_failed_cleanly(full, tmp_path, "prefilter", "prefiltered.zarr")
    assert (data / "raw.zarr").is_dir()
    ballast.unlink()  # space freed: the same command completes
    again = _workflow(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rule ingest" not in again.stdout + again.stderr  # the ingested stack was kept
    assert (tmp_path / "results" / "report" / "report.html").exists()
    assert (data / "blindspot.json").exists() and (data / "metrics.csv").exists()
    assert not [p for p in (tmp_path / "results").rglob("*") if ".tmp" in p.name]


def test_workflow_injected_enospc_in_one_stage(tmp_path):
    """Always runs (no root needed): ENOSPC injected into the Zarr writes of the `drift`
    job's aligned.zarr; the jobs before it finish, it fails cleanly, a rerun without the
    injection completes from there."""
    _tiny_workflow(tmp_path)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (str(tmp_path / "hook"), os.environ.get("PYTHONPATH")) if p)
    target = "results/tiny/blindspot.json"
    failed = _workflow(tmp_path, target, env={"PYTHONPATH": pythonpath, "EMDENOISE_TEST_ENOSPC": "aligned"})
    _assert_failed_cleanly(failed, tmp_path, "drift", "aligned.zarr")
    assert (tmp_path / "results" / "tiny" / "raw.zarr").is_dir()
    again = _workflow(tmp_path, target)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "results" / "tiny" / "blindspot.json").exists()
    assert not [p for p in (tmp_path / "results").rglob("*") if ".tmp" in p.name]
