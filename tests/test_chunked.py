"""Chunked Zarr inference (chunked.infer_zarr): equals whole-array denoise, OOM retry,
progress log, tile auto-sizing, model cache, halo boundary semantics."""
import logging

import dask.array as da
import numpy as np
import pytest

import emdenoise.chunked as chunked
import emdenoise.infer as infer
from emdenoise import io
from emdenoise.errors import InputError
from emdenoise.models import WCVDParams
from emdenoise.tiling import read_with_halo, window_index, wrap_index
from helpers import perturbed_model

CKPT = {"normalisation": {"offset": 0.5, "scale": 3.0}}


_model = perturbed_model


def _src(tmp_path, t=7, y=40, x=45, seed=0, chunks=None):
    stack = np.random.default_rng(seed).poisson(2.0, (t, y, x)).astype(np.float32)
    path = tmp_path / "src.zarr"
    io.write_zarr(path, stack, pixel_size=1.7, attrs={"dataset": "demo"}, chunks=chunks)
    return path, stack


def _close(a, b):
    """Within 1e-5 relative to the data range (the issue's tolerance)."""
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("params,tile,chunks", [
    (WCVDParams(), (3, 16, 20), None),             # tiles cut t, y, x; uneven last tiles
    (WCVDParams(kt=5, ks=(3, 9)), (2, 13, 45), (2, 8, 8)),  # halo_t=2, halo_s=4, tiled source
])
def test_infer_zarr_equals_whole_array_denoise(tmp_path, params, tile, chunks):
    src, stack = _src(tmp_path, chunks=chunks)
    m = _model(params)
    ref = infer.denoise(m, CKPT, stack, device="cpu")
    stats = chunked.infer_zarr(m, CKPT, src, tmp_path / "dst.zarr", device="cpu", tile=tile,
                             workers=2, progress=False)
    out, attrs = io.read_zarr(tmp_path / "dst.zarr")
    _close(out[:], ref)
    assert stats["blocks"] > 4 and stats["tile"] == list(tile) and stats["oom_retries"] == 0
    assert out.chunks == (1,) + tile[1:] and out.shards == tile  # one shard per task: no shared file
    assert attrs["pixel_size"] == 1.7 and attrs["dataset"] == "demo"
    assert attrs["infer"]["halo_t"] == params.halo_t and attrs["infer"]["halo_s"] == params.halo_s


def test_halo_boundaries_match_denoise_and_dask_semantics():
    # time: windows mirrored about their centre frame -- what denoise uses; neither
    # NumPy 'reflect' (frame 1 would get (1, 0, 1, 2, 3)) nor Dask's 'reflect' (repeats
    # the edge: frame 0 would get (1, 0, 0, 1, 2)) keeps the centre frame out of its window
    w = window_index(0, 7, 7, 2)
    assert w[0].tolist() == [2, 1, 0, 1, 2] and w[1].tolist() == [3, 0, 1, 2, 3]
    assert w[5].tolist() == [3, 4, 5, 6, 3] and w[6].tolist() == [4, 5, 6, 5, 4]
    assert all(list(row).count(t) == 1 for t, row in enumerate(w))
    dask_reflect = da.overlap.overlap(da.arange(5, chunks=5), depth=2, boundary="reflect").compute()
    assert dask_reflect.tolist()[:2] == [1, 0]  # symmetric: frame -1 := frame 0
    # space: periodic == Dask 'periodic' == whole-frame circular padding
    dask_periodic = da.overlap.overlap(da.arange(6, chunks=6), depth=3, boundary="periodic").compute()
    np.testing.assert_array_equal(wrap_index(-3, 9, 6), dask_periodic)
    # the reader assembles wrapped runs correctly from a chunked store
    a = np.arange(4 * 9 * 10, dtype=np.float32).reshape(4, 9, 10)
    ti, yi, xi = np.array([1, 0, 1, 2, 3, 2]), wrap_index(-3, 12, 9), wrap_index(7, 14, 10)
    np.testing.assert_array_equal(read_with_halo(a, ti, yi, xi), a[ti][:, yi][:, :, xi])


@pytest.mark.parametrize("exc", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 MemoryError("Unable to allocate 1 GiB")])
def test_out_of_memory_is_retried_with_smaller_tiles(tmp_path, monkeypatch, caplog, exc):
    src, stack = _src(tmp_path)
    m = _model()
    ref = infer.denoise(m, CKPT, stack, device="cpu")
    real, sizes = infer.predict_windows, []

    def fake(model, block, windows, **kw):  # "runs out of memory" above 2 output frames of 20 x 20 px
        sizes.append(block.shape)
        if len(windows) * (block.shape[1] - 6) * (block.shape[2] - 6) > 2 * 20 * 20:
            raise exc
        return real(model, block, windows, **kw)

    monkeypatch.setattr(infer, "predict_windows", fake)
    with caplog.at_level(logging.WARNING, logger="emdenoise"):
        stats = chunked.infer_zarr(m, CKPT, src, tmp_path / "dst.zarr", device="cpu", tile=(7, 40, 45),
                                 workers=1, progress=False)
    _close(io.read_zarr(tmp_path / "dst.zarr")[0][:], ref)
    assert stats["oom_retries"] >= 1
    assert any("out of memory" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
    # after the first failures later pieces start at the reduced size (no repeated OOM per piece)
    assert stats["oom_retries"] < len(sizes) // 2


def test_other_errors_propagate_and_leave_no_output(tmp_path, monkeypatch):
    src, _ = _src(tmp_path)

    def broken(*a, **kw):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(infer, "predict_windows", broken)
    with pytest.raises(RuntimeError, match="CUDNN"):
        chunked.infer_zarr(_model(), CKPT, src, tmp_path / "dst.zarr", device="cpu", tile=(4, 20, 20),
                         workers=1, progress=False)
    assert not (tmp_path / "dst.zarr").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.zarr"]  # no temporary left over


def test_progress_is_logged(tmp_path, caplog):
    src, _ = _src(tmp_path)
    with caplog.at_level(logging.INFO, logger="emdenoise"):
        chunked.infer_zarr(_model(), CKPT, src, tmp_path / "dst.zarr", device="cpu", tile=(4, 20, 23),
                         workers=2, progress=0.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "emdenoise"]
    progress = [s for s in msgs if s.startswith("infer: blocks")]
    assert len(progress) == 8 and "blocks 8/8 (100 %)" in progress[-1]
    assert all("Mpix/s" in s for s in progress)


def test_auto_tile_follows_the_memory_budget():
    p, bpp = WCVDParams(), chunked.CPU_BYTES_PER_PX
    # plenty of memory: whole frames, capped per worker and cut for load balance
    nt, ty, tx = chunked.auto_tile((50, 512, 512), p, device="cpu", workers=2, memory=64 * 2**30)
    assert (ty, tx) == (512, 512) and 4 <= nt and -(-50 // nt) >= 4 * 2
    assert nt * 512 * 512 * bpp <= chunked.MAX_TILE_BYTES
    # two 2048^2 frames fit in the cap: whole frames, not spatial tiles
    assert chunked.auto_tile((200, 2048, 2048), p, device="cpu", workers=2, memory=64 * 2**30)[1:] == (2048, 2048)
    # little memory: TILE_FRAMES frames cut into squares that fit the budget
    mem = 4 * 2 * 40 * 2**20   # 40 MiB per worker after the 1/4 rule, 2 workers
    nt, ty, tx = chunked.auto_tile((200, 2048, 2048), p, device="cpu", workers=2, memory=mem)
    assert nt == chunked.TILE_FRAMES and ty < 2048 and tx < 2048 and ty % 16 == 0
    assert nt * ty * tx * bpp <= 40 * 2**20
    # the probe reports something sensible on this machine, capped by a cgroup limit
    assert chunked.available_memory("cpu") > 2**26


def test_auto_tile_budgets_the_temporal_halo_of_a_long_reach():
    """A context network reaching the whole movie reads 2 R frames around each tile and
    gathers 2 R + 1 frames for a wrapped window: the tile shrinks so that they fit the
    per-worker budget, instead of memory growing with R."""
    budget, bpp = 64 * 2**20, chunked.CPU_BYTES_PER_PX
    mem = 4 * budget  # one worker after the 1/4 rule
    short = chunked.auto_tile((100, 512, 512), WCVDParams(), device="cpu", workers=1, memory=mem)
    assert short[1:] == (512, 512)  # plain WCVD: whole frames, as before
    for reach in (24, 99):
        p = WCVDParams(context=reach)
        nt, ty, tx = chunked.auto_tile((100, 512, 512), p, device="cpu", workers=1, memory=mem)
        area = ty * tx
        assert area * (nt * bpp + chunked.REACH_BYTES_PER_PX * (p.halo_t - 1)) <= budget
        assert nt >= 1 and ty % 16 == 0 and tx % 16 == 0
    assert ty * tx < 512 * 512  # R 99: cut spatially to fit


def test_a_cgroup_limit_caps_the_memory_probe(monkeypatch):
    monkeypatch.setattr(chunked, "_cgroup_memory_left", lambda: 300 * 2**20)
    assert chunked.available_memory("cpu") == 300 * 2**20
    nt, ty, tx = chunked.auto_tile((200, 2048, 2048), WCVDParams(), device="cpu", workers=2)
    assert nt * ty * tx * chunked.CPU_BYTES_PER_PX <= 300 * 2**20 / 4 / 2


def test_checkpoint_path_is_loaded_once_per_process(tmp_path, monkeypatch):
    src, stack = _src(tmp_path)
    ckpt_file = tmp_path / "model.pt"
    ckpt_file.write_bytes(b"stand-in")
    m, calls = _model(), []

    def fake_load(path, device="cpu"):
        calls.append((str(path), device))
        return m, CKPT

    monkeypatch.setattr(chunked, "load_checkpoint", fake_load)
    stats = chunked.infer_zarr(str(ckpt_file), None, src, tmp_path / "dst.zarr", device="cpu",
                             tile=(2, 20, 20), workers=2, progress=False)
    assert stats["blocks"] == 4 * 2 * 3 and len(calls) == 1
    _close(io.read_zarr(tmp_path / "dst.zarr")[0][:], infer.denoise(m, CKPT, stack, device="cpu"))


def test_scheduler_address_runs_on_a_real_distributed_cluster(tmp_path):
    """A dask.distributed LocalCluster with two worker *processes*: the model scattered to
    them, or a checkpoint path each loads itself; the output equals the threaded run
    bit for bit (the same tiles, the same CPU code) and whole-array inference."""
    distributed = pytest.importorskip("distributed")
    from emdenoise.checkpoint import save_checkpoint
    from emdenoise.train import TrainParams, train_model

    src, stack = _src(tmp_path)
    m = _model()
    tile = (3, 16, 20)
    threaded = chunked.infer_zarr(m, CKPT, src, tmp_path / "threads.zarr", device="cpu", tile=tile, workers=2,
                                  progress=False)
    ckpt = train_model(stack, WCVDParams(), TrainParams(epochs=1, crop=24, val_crop=24, device="cpu"))
    save_checkpoint(ckpt, tmp_path / "model.pt")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
        addr = cluster.scheduler_address
        stats = chunked.infer_zarr(m, CKPT, src, tmp_path / "dist.zarr", device="cpu", tile=tile,
                                   scheduler_address=addr, progress=False)
        stats_ckpt = chunked.infer_zarr(str(tmp_path / "model.pt"), None, src, tmp_path / "dist_ckpt.zarr",
                                        device="cpu", tile=tile, scheduler_address=addr, progress=False)
    assert stats["scheduler"] == addr and stats["blocks"] == threaded["blocks"] > 4
    out = io.read_zarr(tmp_path / "dist.zarr")[0][:]
    # the same tiles in worker processes and in threads: equal up to float32 rounding (oneDNN's
    # convolution may sum in another order with another OpenMP thread state; seen on AMD EPYC)
    np.testing.assert_allclose(out, io.read_zarr(tmp_path / "threads.zarr")[0][:], rtol=1e-6, atol=1e-6)
    _close(out, infer.denoise(m, CKPT, stack, device="cpu"))
    from emdenoise.checkpoint import model_from_checkpoint
    trained = model_from_checkpoint(ckpt, device="cpu")
    _close(io.read_zarr(tmp_path / "dist_ckpt.zarr")[0][:], infer.denoise(trained, ckpt, stack, device="cpu"))
    assert stats_ckpt["blocks"] == stats["blocks"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_scheduler_address_without_distributed_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("dask")
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)  # as if not installed
    src, _ = _src(tmp_path)
    with pytest.raises(InputError, match="distributed"):
        chunked.infer_zarr(_model(), CKPT, src, tmp_path / "dst.zarr", device="cpu",
                         scheduler_address="tcp://127.0.0.1:8786", progress=False)
    assert not (tmp_path / "dst.zarr").exists()
