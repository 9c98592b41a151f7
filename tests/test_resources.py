"""Workflow job resources from the size of the data (issue: bounded memory and disk)."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emdenoise import io
from emdenoise.stage import job_memory_mb, job_runtime_min, stack_megabytes


def test_stack_megabytes_reads_zarr_shapes_and_file_sizes(tmp_path):
    stack = np.zeros((10, 64, 48), dtype=np.float32)
    io.write_zarr(tmp_path / "s.zarr", stack)                        # OME-Zarr group, array "0"
    assert stack_megabytes(tmp_path / "s.zarr") == stack.nbytes / 1e6  # exact, whatever the compression
    tifffile.imwrite(tmp_path / "s.tif", stack.astype(np.uint16))
    size = (tmp_path / "s.tif").stat().st_size
    assert stack_megabytes(tmp_path / "s.tif") == 2 * size / 1e6     # 16-bit on disk -> float32
    (tmp_path / "frames").mkdir()
    for i in range(3):
        tifffile.imwrite(tmp_path / "frames" / f"f{i}.tif", stack[i].astype(np.uint16))
    assert np.isclose(stack_megabytes(tmp_path / "frames"),
                      2 * sum(p.stat().st_size for p in (tmp_path / "frames").iterdir()) / 1e6)
    assert stack_megabytes(tmp_path / "missing.mrc") == 0.0


def test_job_memory_grows_with_the_data_and_doubles_on_retry():
    assert job_memory_mb(0, 3, 1000) == 1000
    assert job_memory_mb(1000, 3, 1000) == 4000          # three float32 copies of a 1 GB stack
    assert job_memory_mb(1000, 3, 1000, attempt=2) == 8000
    assert job_memory_mb(1000, 3, 1000, attempt=3) == 16000


def test_job_runtime_grows_with_the_data_and_doubles_on_retry():
    assert job_runtime_min(0, 30, 10) == 30
    assert job_runtime_min(3360, 30, 10) == 64             # 200 x 2048² float32: 3.36 GB at 10 min / GB
    assert job_runtime_min(3360, 30, 10, attempt=2) == 128
    assert job_runtime_min(3360, 240) == 240               # training: a fixed budget, not the movie's length


def test_disk_footprint_of_a_results_folder(tmp_path):
    from emdenoise import io, report
    from emdenoise.stage import disk_usage

    src = tmp_path / "in.npy"
    np.save(src, np.zeros((4, 64, 64), np.float32))
    res = tmp_path / "results" / "ds"
    io.write_zarr(res / "a.zarr", np.ones((4, 64, 64), np.float32))
    (res / "note.txt").write_text("x" * 5000)
    used, files = disk_usage(res)
    zarr_files = sum(1 for p in (res / "a.zarr").rglob("*") if p.is_file())
    assert files == zarr_files + 1 and used >= 5000
    assert disk_usage(tmp_path / "missing") == (0, 0) and disk_usage(src)[1] == 1
    fp = report.footprint(res, src)
    assert fp["bytes"] == used and fp["files"] == files and fp["x_input"] == pytest.approx(used / disk_usage(src)[0])


def test_gpus_visible_follows_the_override_and_cuda_visible_devices(monkeypatch):
    from emdenoise.stage import gpus_visible

    monkeypatch.setenv("EMDENOISE_GPU", "1")
    assert gpus_visible()
    monkeypatch.setenv("EMDENOISE_GPU", "0")
    assert not gpus_visible()
    monkeypatch.delenv("EMDENOISE_GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpus_visible()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import glob
    assert gpus_visible() == bool(glob.glob("/dev/nvidia[0-9]*"))
