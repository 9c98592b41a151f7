"""A full output disk: every writer (TIFF, MRC, Zarr, NPY) ends with one line naming the
path and "no space left on device", removes its temporary output and never dies by a
signal; `emdenoise denoise` exits 2 with that line and no traceback.

Two ways: a real 100 kB tmpfs (needs root, as in CI; skipped where mounting is not
permitted) and ENOSPC injected at the write calls (always on).
"""
from __future__ import annotations

import errno
import os
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
