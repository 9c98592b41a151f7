"""Bounded memory in the NumPy / SciPy stages (issue 12): every streamed path -- frame
blocks, spatial tiles, lazy Zarr reads -- gives the whole-array result, here with blocks
and tiles made small so that chunking really happens."""
from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import tifffile

from emdenoise import config as emcfg
from emdenoise import chunked, drift, filters, io, metrics, noise, pipeline, report, train
from emdenoise.synthetic import simulate_movie

SHAPE = (14, 41, 46)  # odd sizes: the last tiles and blocks are partial


@pytest.fixture(scope="module")
def movie():
    m = simulate_movie(SHAPE[0], SHAPE[1:], mode="counting", dose=2.0, max_drift=0.0, seed=11)
    return np.asarray(m.noisy, np.float32), np.asarray(m.clean, np.float32)


def _zarr(tmp_path, name, stack):
    io.write_zarr(tmp_path / f"{name}.zarr", stack, pixel_size=1.0)
    return io.read_zarr(tmp_path / f"{name}.zarr")[0]


@pytest.mark.parametrize("frames", [1, 2, 5, 100])
def test_baseline_blocks_equal_the_whole_stack_filters(tmp_path, movie, frames):
    raw = _zarr(tmp_path, "raw", movie[0])
    for sigma in [(1.0, 1.0, 1.0), (2.5, 0.7, 1.3), (0.0, 1.0, 1.0)]:  # reach 2, 5 (halo beyond a block), 0
        blocks = list(filters.gaussian3d_blocks(raw, sigma, frames=frames))
        assert [a for a, _ in blocks] == list(range(0, SHAPE[0], frames))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), filters.gaussian3d(movie[0], sigma))
    out = np.concatenate([b for _, b in filters.gaussian2d_blocks(raw, 1.5, frames=frames)])
    np.testing.assert_array_equal(out, filters.gaussian2d(movie[0], 1.5))


def test_baselines_script_writer_fills_whole_shards(tmp_path, movie):
    """As scripts/baselines.py writes: one block of frames per shard of the output Zarr."""
    k = 3
    with io.ZarrStackWriter(tmp_path / "g3.zarr", SHAPE, shards=(k,) + SHAPE[1:]) as w:
        for a, block in filters.gaussian3d_blocks(movie[0], 1.0, frames=k):
            w[a:a + len(block)] = block
    arr, _ = io.read_zarr(tmp_path / "g3.zarr")
    assert arr.shards == (k,) + SHAPE[1:]
    np.testing.assert_array_equal(arr[:], filters.gaussian3d(movie[0], 1.0))


@pytest.mark.parametrize("b", [0, 2])
def test_blind_gaussian_tiles_equal_one_whole_frame_tile(tmp_path, movie, b):
    raw = movie[0]
    whole = filters.blind_gaussian3d(raw, b, tile=10**6)  # one tile: the whole-frame computation
    tiled = filters.blind_gaussian3d(raw, b, tile=9)
    assert tiled.sigma == whole.sigma and tiled.reach == whole.reach
    np.testing.assert_array_equal(tiled.denoised, whole.denoised)  # halo = kernel radius: exact
    np.testing.assert_allclose(tiled.loss_frames, whole.loss_frames, rtol=1e-12)  # summation order only
    np.testing.assert_allclose(tiled.scores["loss"], whole.scores["loss"], rtol=1e-12)
    # lazy Zarr in, Zarr out sharded by the tiles: the script's path
    lazy = _zarr(tmp_path, "raw", raw)
    with io.ZarrStackWriter(tmp_path / "out.zarr", SHAPE, chunks=(1, 9, 9), shards=(SHAPE[0], 9, 9)) as w:
        res = filters.blind_gaussian3d(lazy, b, tile=9, out=w.array)
        assert res.denoised is w.array
    np.testing.assert_array_equal(io.read_zarr(tmp_path / "out.zarr")[0][:], whole.denoised)
    np.testing.assert_allclose(res.loss_frames, whole.loss_frames, rtol=1e-12)


@pytest.mark.parametrize("blind", [None, 1])
def test_normalised_gaussian3d_tiles(movie, blind):
    ref = filters.normalised_gaussian3d(movie[0], 3.0, 2.0, blind_radius=blind, tile=10**6)
    for tile in (1, 7, 40):
        np.testing.assert_array_equal(filters.normalised_gaussian3d(movie[0], 3.0, 2.0, blind_radius=blind,
                                                                    tile=tile), ref)


def test_classical_candidate_streams_zarr_to_zarr(tmp_path, movie):
    lazy = _zarr(tmp_path, "raw", movie[0])
    ref, ref_attrs = pipeline.classical_candidate(movie[0], 1)
    tile = 16
    with io.ZarrStackWriter(tmp_path / "c.zarr", SHAPE, chunks=(1, tile, tile), shards=(SHAPE[0], tile, tile)) as w:
        _, attrs = pipeline.classical_candidate(lazy, 1, tile=tile, out=w.array)
        w.update_attrs({"method": "classical", **attrs})
    arr, stored = io.read_zarr(tmp_path / "c.zarr")
    np.testing.assert_array_equal(arr[:], ref)
    assert stored["sigma"] == ref_attrs["sigma"] and stored["temporal_reach"] == ref_attrs["temporal_reach"]
    assert stored["n2s_loss"] == pytest.approx(ref_attrs["n2s_loss"], rel=1e-12)


def test_auto_tile_is_bounded_by_the_budget():
    edge = filters.auto_tile(200, 12, copies=4, budget=384 * 2**20)
    assert 4 * 4 * 200 * (edge + 24) ** 2 <= 384 * 2**20 and edge > 200
    assert filters.auto_tile(10**6, 12) == filters.MIN_TILE


def _ds(**defaults):
    return emcfg.build({"datasets": {"x": {"path": "x"}}, "defaults": defaults}, check_paths=False).datasets["x"]


@pytest.mark.parametrize("lowpass", [{}, {"diameter": 0.5}, {"enabled": False}])
def test_postprocess_of_a_zarr_stack_equals_the_in_memory_one(tmp_path, lowpass):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :40]
    truth = 10 + 5 * np.cos(2 * np.pi * (yy + 0.5 * xx) / 12.0)
    noisy = (truth + rng.normal(0, 3, (14, 48, 40))).astype(np.float32)
    fake = (truth + rng.normal(0, 1.5, (14, 48, 40))).astype(np.float32)
    ds = _ds(model={"name": "wcvd"}, lowpass=lowpass)
    ref, ref_rec = pipeline.postprocess(fake, ds, "wcvd", noisy, reach=1)
    lazy, lazy_noisy = _zarr(tmp_path, "fake", fake), _zarr(tmp_path, "noisy", noisy)
    out, rec = pipeline.postprocess(lazy, ds, "wcvd", lazy_noisy, reach=1)
    assert not isinstance(out, np.ndarray)  # lazy: computed when read
    assert rec.keys() == ref_rec.keys() and rec.get("diameter") == ref_rec.get("diameter")
    if "auto" in rec:
        np.testing.assert_allclose(list(rec["auto"]["umse"].values()), list(ref_rec["auto"]["umse"].values()),
                                   rtol=1e-6)
    io.write_zarr(tmp_path / "out.zarr", out)  # streamed by blocks of frames
    np.testing.assert_allclose(io.read_zarr(tmp_path / "out.zarr")[0][:], ref, rtol=1e-6, atol=1e-5)
    # the n2s loss the lowpass script records, read frame by frame
    np.testing.assert_array_equal(metrics.self_supervised_loss_per_frame(lazy, lazy_noisy),
                                  metrics.self_supervised_loss_per_frame(fake, noisy))


def test_frame_map_reads_only_the_frames_asked_for(movie):
    seen = []

    def fn(block):
        seen.append(len(block))
        return block * 2

    m = filters.FrameMap(movie[0], fn)
    np.testing.assert_array_equal(m[3], 2 * movie[0][3])
    np.testing.assert_array_equal(m[-1, 2:5], 2 * movie[0][-1, 2:5])
    np.testing.assert_array_equal(m[2:6], 2 * movie[0][2:6])
    assert seen == [1, 1, 4] and m.shape == SHAPE and np.asarray(m).dtype == np.float32
    with pytest.raises(TypeError):
        m[::2]


@pytest.mark.parametrize("ext", [".mrc", ".tif"])
def test_export_from_zarr_equals_export_from_memory(tmp_path, movie, monkeypatch, ext):
    monkeypatch.setattr(io, "_MAX_BLOCK_BYTES", 3 * SHAPE[1] * SHAPE[2] * 4)  # blocks of 3 frames
    lazy = _zarr(tmp_path, "d", movie[0])
    io.write_stack(tmp_path / f"mem{ext}", movie[0], pixel_size=1.5, metadata={"tilt_angles": list(range(14))})
    io.write_stack(tmp_path / f"lazy{ext}", lazy, pixel_size=1.5, metadata={"tilt_angles": list(range(14))})
    if ext == ".mrc":
        with mrcfile.open(tmp_path / "mem.mrc") as a, mrcfile.open(tmp_path / "lazy.mrc") as b:
            np.testing.assert_array_equal(a.data, movie[0])
            np.testing.assert_array_equal(b.data, movie[0])
            assert a.header.tobytes() == b.header.tobytes()
            assert float(b.header.dmax) == movie[0].max()
            assert float(b.header.dmean) == pytest.approx(movie[0].mean(dtype=np.float64), rel=1e-6)
        assert (tmp_path / "lazy.tlt").read_text() == (tmp_path / "mem.tlt").read_text()
    else:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "lazy.tif"), movie[0])
    assert (tmp_path / f"lazy{ext}").read_bytes() == (tmp_path / f"mem{ext}").read_bytes()


def test_metrics_and_diagnostics_of_zarr_stacks_equal_the_in_memory_ones(tmp_path, movie, monkeypatch):
    raw, truth = movie
    stacks = {"raw": raw, "gaussian2d": filters.gaussian2d(raw), "gaussian3d": filters.gaussian3d(raw, 1.0),
              "classical": filters.normalised_gaussian3d(raw, 4.0, 1.0)}
    reaches = {"raw": 0, "gaussian2d": 0, "gaussian3d": 2, "classical": 8}
    lazy = {k: _zarr(tmp_path, k, v) for k, v in stacks.items()}
    ltruth = _zarr(tmp_path, "truth", truth)
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 2 * SHAPE[1] * SHAPE[2] * 8)  # max/min in blocks of 2 frames
    ref = metrics.compute_metrics(stacks, raw, truth=truth, reaches=reaches, temporal_radius=1)
    got = metrics.compute_metrics(lazy, lazy["raw"], truth=ltruth, reaches=reaches, temporal_radius=1)
    exact = [c for c in ref.columns if c != "psnr_db"]
    assert got[exact].equals(ref[exact])
    np.testing.assert_allclose(got.psnr_db, ref.psnr_db, rtol=1e-12)
    a = report.write_diagnostics(tmp_path / "mem", stacks, table=ref, truth=truth)
    b = report.write_diagnostics(tmp_path / "lazy", lazy, table=ref, truth=ltruth)
    assert json.dumps(a, default=float) == json.dumps(b, default=float)
    for f in sorted(p.name for p in (tmp_path / "mem").iterdir()):
        assert (tmp_path / "lazy" / f).read_bytes() == (tmp_path / "mem" / f).read_bytes(), f
    report.plot_preview(lazy, tmp_path / "p.png", truth=ltruth, title="x")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_lazy_inputs_are_not_loaded_whole(movie, monkeypatch):
    """The metrics read a lazy stack a few frames at a time, never all of it at once."""
    monkeypatch.setattr(metrics, "BLOCK_BYTES", 4 * SHAPE[1] * SHAPE[2] * 8)  # max: 4 frames at a time
    widest = []

    def read(a, b):
        widest.append(b - a)
        return movie[0][a:b]

    lazy = io.LazyStack(read, SHAPE, np.float32)
    metrics.compute_metrics({"raw": lazy}, lazy, reaches={"raw": 0})
    metrics.self_supervised_loss_per_frame(lazy, lazy)
    assert max(widest) <= 4


# ---- drift, noise, prefilter, ingest (the rest of issue 12) ---------------------------
def _recording(stack, widest):
    """A lazy (T, Y, X) view of ``stack`` that records how many frames each read asked for."""
    def read(a, b):
        widest.append(b - a)
        return stack[a:b]
    return io.LazyStack(read, stack.shape, stack.dtype)


@pytest.fixture(scope="module")
def drifting():
    m = simulate_movie(9, (72, 64), mode="counting", dose=1.0, max_drift=4.0, seed=3)
    raw = np.asarray(m.noisy, np.float32)
    return raw, filters.gaussian2d(raw, 1.5)


@pytest.mark.parametrize("reference,max_shift", [("auto", None), ("first", None), ("pairwise", 5)])
def test_drift_measured_on_a_zarr_stack_equals_the_in_memory_one(tmp_path, drifting, reference, max_shift):
    _, pre = drifting
    ref = drift.measure_drift(pre, reference=reference, max_shift=max_shift, return_info=True)
    lazy = _zarr(tmp_path, "pre", pre)
    got = drift.measure_drift(lazy, reference=reference, max_shift=max_shift, return_info=True)
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[1] == ref[1] and np.abs(ref[0]).max() > 1  # a real drift was measured
    widest = []
    drift.measure_drift(_recording(pre, widest), reference=reference, max_shift=max_shift)
    assert max(widest) == 1  # frame by frame, never the whole stack


@pytest.mark.parametrize("mode", ["integer", "fourier", "spline"])
@pytest.mark.parametrize("crop", [True, False])
def test_aligned_blocks_equal_apply_shifts(tmp_path, drifting, mode, crop):
    raw, pre = drifting
    shifts = drift.measure_drift(pre)
    ref, ref_info = drift.apply_shifts(raw, shifts, mode=mode, crop=crop)
    info = drift.plan_shifts(shifts, raw.shape, mode=mode)
    def as_lists(d):
        return {k: np.asarray(v).tolist() for k, v in d.items()}
    assert as_lists(info) == as_lists(ref_info)
    shape = drift.aligned_shape(info, raw.shape, crop)
    assert shape == ref.shape
    lazy = _zarr(tmp_path, "raw", raw)
    for frames in (1, 4, 100):
        blocks = list(drift.aligned_blocks(lazy, info, crop=crop, frames=frames))
        assert [a for a, _ in blocks] == list(range(0, raw.shape[0], frames))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), ref)
    widest = []
    list(drift.aligned_blocks(_recording(raw, widest), info, crop=crop, frames=4))
    assert max(widest) == 1


def test_noise_estimated_on_a_zarr_stack_equals_the_in_memory_one(tmp_path, movie):
    raw = movie[0]
    lazy = _zarr(tmp_path, "raw", raw)
    for estimate in ("auto", "frame"):
        ref = noise.estimate_blindspot(raw, estimate=estimate)
        assert noise.estimate_blindspot(lazy, estimate=estimate) == ref
    widest = []
    result = noise.estimate_blindspot(_recording(raw, widest))
    assert max(widest) == 1 and len(widest) <= 3 * noise.MAX_PAIRS  # only the frames of the pairs
    assert len(result["frames"]) <= 2 * noise.MAX_PAIRS


@pytest.mark.parametrize("method", ["gaussian2d", "none"])
def test_prefilter_zarr_filters_equal_the_whole_array(tmp_path, movie, method):
    src = tmp_path / "raw.zarr"
    io.write_zarr(src, movie[0], pixel_size=1.5, attrs={"dataset": "x"})
    pipeline.prefilter_zarr(src, tmp_path / "pre.zarr", method=method, sigma=1.2, frames=3,
                            attrs={"prefilter": {"method": method}})
    arr, attrs = io.read_zarr(tmp_path / "pre.zarr")
    np.testing.assert_array_equal(arr[:], pipeline.prefilter(movie[0], method=method, sigma=1.2))
    assert arr.shards[0] == 3 and attrs["pixel_size"] == 1.5 and attrs["dataset"] == "x"
    assert attrs["prefilter"] == {"method": method}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


@pytest.mark.parametrize("in_memory", [True, False])
def test_prefilter_zarr_wcid_equals_the_whole_array(tmp_path, movie, monkeypatch, in_memory):
    """WCID trained on the stack (in memory or by crops from the store), then chunked
    inference by tiles: the same model and the same frames as pipeline.prefilter."""
    tp = emcfg.TrainParams(epochs=2, crop=16, val_crop=16, batch_size=4, device="cpu")
    params = emcfg.ModelConfig().wcvd_params(dims=2)
    src = tmp_path / "raw.zarr"
    io.write_zarr(src, movie[0], pixel_size=1.0)
    if not in_memory:
        monkeypatch.setattr(train, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(chunked, "MAX_TILE_BYTES", 4 * SHAPE[1] * SHAPE[2] * chunked.CPU_BYTES_PER_PX)
    ckpt = pipeline.prefilter_zarr(src, tmp_path / "pre.zarr", method="wcid", wcid_params=params, train_params=tp)
    arr, attrs = io.read_zarr(tmp_path / "pre.zarr")
    assert ckpt["model"] == "wcid" and attrs["infer"]["tile"][0] < SHAPE[0]  # really by tiles
    # equal up to float32 rounding: oneDNN's convolution may sum in another order under another
    # OpenMP thread state (tiles run in worker threads; seen on AMD EPYC, 1 ulp)
    np.testing.assert_allclose(arr[:], pipeline.prefilter(movie[0], method="wcid", wcid_params=params,
                                                          train_params=tp), rtol=1e-6, atol=1e-6)


def test_ingest_streams_frame_blocks(tmp_path, movie, monkeypatch):
    """io.ingest copies a lazy source block by block (io._MAX_BLOCK_BYTES), never whole."""
    monkeypatch.setattr(io, "_MAX_BLOCK_BYTES", 3 * SHAPE[1] * SHAPE[2] * 4)
    widest = []
    lazy = _recording(movie[0], widest)
    monkeypatch.setattr(io, "read_stack", lambda *a, **k: (lazy, {"pixel_size": 1.0, "notes": []}))
    io.ingest("movie.tif", tmp_path / "raw.zarr")
    np.testing.assert_array_equal(io.read_zarr(tmp_path / "raw.zarr")[0][:], movie[0])
    assert max(widest) == 3
