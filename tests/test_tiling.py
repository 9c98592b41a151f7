"""Tilt-series tiling: grid, blending window, seamless stitching, patches, MRC + .tlt."""
import mrcfile
import numpy as np
import pytest

from emdenoise import infer, io, tiling
from emdenoise.config import TrainParams
from emdenoise.models import WCVDParams
from emdenoise.synthetic import simulate_movie
from emdenoise.train import model_from_checkpoint, train_model
from helpers import perturbed_model

CKPT = {"normalisation": {"offset": 0.5, "scale": 3.0}}


_random_model = perturbed_model


def _stack(t=5, y=70, x=83, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (t, y, x)).astype(np.float32)


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("shape,tile,overlap", [((256, 256), 96, 32), ((4096, 4096), 1024, 256),
                                                ((70, 83), 30, 10), ((50, 200), 64, 16)])
def test_tile_grid_covers_the_frame_with_full_size_overlapping_tiles(shape, tile, overlap):
    grid = tiling.tile_grid(shape, tile, overlap)
    cover = np.zeros(shape, int)
    for sy, sx in grid:
        assert sy.stop - sy.start == min(tile, shape[0]) and sx.stop - sx.start == min(tile, shape[1])
        cover[sy, sx] += 1
    assert cover.min() >= 1 and cover.max() <= 4
    starts = sorted({sy.start for sy, _ in grid})
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= requested
    if shape == (4096, 4096):
        assert len(grid) == 25 and starts == [0, 768, 1536, 2304, 3072]  # SHINE: 1024 / 256 px


def test_tile_grid_refuses_bad_arguments():
    for tile, overlap in [(0, 0), (64, 64), (64, -1)]:
        with pytest.raises(ValueError):
            tiling.tile_grid((128, 128), tile, overlap)


@pytest.mark.parametrize("guard", [0, 3])
def test_blend_windows_are_a_partition_of_unity_on_a_regular_grid(guard):
    tile, overlap = 40, 16
    shape = (tile + 3 * (tile - overlap), tile + 2 * (tile - overlap))  # no flush last tile
    total = np.zeros(shape)
    for sy, sx in tiling.tile_grid(shape, tile, overlap):
        w = tiling.blend_window((tile, tile), overlap, guard=guard,
                                sides=(sy.start > 0, sy.stop < shape[0], sx.start > 0, sx.stop < shape[1]))
        assert w.min() >= 0 and w.max() <= 1
        if guard:  # the wrapped pixels of tile-local circular padding get no weight
            assert (w[:guard, :] == 0).all() if sy.start > 0 else (w[:guard, guard:-guard] > 0).all()
        total[sy, sx] += w
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    w = tiling.blend_window((tile, tile), overlap)
    assert np.all(np.diff(w[:overlap, tile // 2]) > 0)  # a smooth monotone taper, not a step
    with pytest.raises(ValueError):
        tiling.blend_window((tile, tile), 6, guard=3)


# --------------------------------------------------------------------- stitched result
@pytest.mark.parametrize("params", [WCVDParams(), WCVDParams(kt=5, ks=(3, 9))])
def test_tiled_equals_untiled(params):
    """Receptive field (2*halo_s + 1) smaller than the overlap: tiling changes nothing
    with real-pixel halos, and only the frame border (tile-local wrap) with 'circular'."""
    m, stack = _random_model(params), _stack()
    ref = infer.denoise(m, CKPT, stack, device="cpu")
    valid = infer.denoise_tiled(m, CKPT, stack, tile=30, overlap=10, device="cpu", batch_frames=2)
    np.testing.assert_allclose(valid, ref, rtol=1e-5, atol=1e-5 * ref.max())
    circ = infer.denoise_tiled(m, CKPT, stack, tile=30, overlap=10, device="cpu", padding="circular")
    h = params.halo_s
    np.testing.assert_allclose(circ[:, h:-h, h:-h], ref[:, h:-h, h:-h], rtol=1e-5, atol=1e-5 * ref.max())


def test_tiled_reads_a_zarr_lazily(tmp_path):
    m, stack = _random_model(), _stack()
    io.write_zarr(tmp_path / "s.zarr", stack, chunks=(1, 16, 16))
    arr, _ = io.read_zarr(tmp_path / "s.zarr")
    out = infer.denoise_tiled(m, CKPT, arr, tile=30, overlap=10, device="cpu")
    np.testing.assert_allclose(out, infer.denoise(m, CKPT, stack, device="cpu"), rtol=1e-5, atol=1e-4)


def test_tiled_writes_blocks_of_frames_into_a_store_with_the_same_values(tmp_path, monkeypatch):
    """out= a Zarr writer and a block budget of one frame: the stitched frames leave one
    block at a time (memory does not grow with T) and equal the in-memory result bit for bit."""
    m, stack = _random_model(), _stack(t=7)
    ref = infer.denoise_tiled(m, CKPT, stack, tile=30, overlap=10, device="cpu", batch_frames=4)
    written = []

    class Spy(io.ZarrStackWriter):
        def __setitem__(self, key, value):
            written.append(len(value))
            super().__setitem__(key, value)

    with Spy(tmp_path / "o.zarr", stack.shape) as out:
        assert infer.denoise_tiled(m, CKPT, stack, tile=30, overlap=10, device="cpu", batch_frames=4, out=out) is out
    assert written == [4, 3]
    np.testing.assert_array_equal(io.read_zarr(tmp_path / "o.zarr")[0][:], ref)
    monkeypatch.setattr(tiling, "BLOCK_BYTES", 4 * stack.shape[1] * stack.shape[2])  # one frame per block
    written.clear()
    with Spy(tmp_path / "p.zarr", stack.shape) as out:
        infer.denoise_tiled(m, CKPT, stack, tile=30, overlap=10, device="cpu", batch_frames=4, out=out)
    assert written == [1] * 7
    np.testing.assert_array_equal(io.read_zarr(tmp_path / "p.zarr")[0][:], ref)


def test_circular_padding_needs_an_overlap_wider_than_the_receptive_field():
    with pytest.raises(ValueError, match="overlap"):
        infer.denoise_tiled(_random_model(), CKPT, _stack(), tile=30, overlap=6, device="cpu",
                             padding="circular")


@pytest.fixture(scope="module")
def tilt_series():
    """5 'tilts' of 256^2 px, linear detector, lattice rotated off the pixel axes (as in
    a tilt series, no structure aligned with the tile rows), and a briefly trained WCVD."""
    mv = simulate_movie(5, (256, 256), mode="linear", max_drift=0.0, rotation=0.5, seed=3)
    ckpt = train_model(mv.noisy, WCVDParams(), TrainParams(epochs=4, crop=48, batch_size=8, steps_per_epoch=8,
                                                           val_frames=0, device="cpu", seed=0, linear_start=False))
    return mv.noisy, model_from_checkpoint(ckpt), ckpt


def _seam_ratios(img, grid, shape):
    """Mean |gradient| across tile-border lines / elsewhere: (vs. all other lines, vs.
    lines within 8 px of a border -- the same specimen region)."""
    edges = sorted({e for sy, sx in grid for e in (sy.start, sy.stop) if 0 < e < shape[0]})
    g = 0.5 * (np.abs(np.diff(img, axis=1)).mean(axis=(0, 2)) + np.abs(np.diff(img, axis=2)).mean(axis=(0, 1)))
    border = np.zeros(len(g), bool)
    border[[e - 1 for e in edges]] = True  # diff index e-1 is the step from line e-1 to e
    near = np.zeros(len(g), bool)
    for e in edges:
        near[max(0, e - 9):e + 8] = True
    return g[border].mean() / g[~border].mean(), g[border].mean() / g[near & ~border].mean()


def test_no_visible_seam_in_a_stitched_tilt_series(tilt_series):
    noisy, m, ckpt = tilt_series
    grid = tiling.tile_grid(noisy.shape[1:], 96, 32)
    out = infer.denoise_tiled(m, ckpt, noisy, tile=96, overlap=32, device="cpu", padding="circular")
    assert all(abs(r - 1) < 0.05 for r in _seam_ratios(out, grid, noisy.shape[1:]))
    # the measure does see seams: tiles denoised with tile-local wrapping and pasted
    # without blending put a step at every tile border
    naive = np.zeros_like(out)
    for sy, sx in grid:
        naive[:, sy, sx] = infer.denoise(m, ckpt, noisy[:, sy, sx], device="cpu")
    assert all(r > 1.3 for r in _seam_ratios(naive, grid, noisy.shape[1:]))
    # and the stitched series is the untiled one away from the frame border
    ref = infer.denoise(m, ckpt, noisy, device="cpu")
    np.testing.assert_allclose(out[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], rtol=1e-5, atol=1e-5 * ref.max())


# ---------------------------------------------------------------------------- training
def test_training_patches_pick_a_seeded_fraction_and_read_only_those(tmp_path):
    stack = _stack(4, 96, 96)
    io.write_zarr(tmp_path / "s.zarr", stack, chunks=(1, 32, 32))
    arr, _ = io.read_zarr(tmp_path / "s.zarr")
    got = list(tiling.training_patches(arr, 40, 12, fraction=0.5, seed=1))
    grid = tiling.tile_grid((96, 96), 40, 12)
    assert len(got) == int(np.ceil(0.5 * len(grid)))
    for sy, sx, patch in got:
        assert (sy, sx) in grid and patch.dtype == np.float32
        np.testing.assert_array_equal(patch, stack[:, sy, sx])
    again = [(sy, sx) for sy, sx, _ in tiling.training_patches(arr, 40, 12, fraction=0.5, seed=1)]
    assert again == [(sy, sx) for sy, sx, _ in got]
    assert len(list(tiling.training_patches(arr, 40, 12, fraction=1.0))) == len(grid)


# ------------------------------------------------------------------------- MRC export
def test_denoised_tilt_series_mrc_keeps_voxel_size_and_tilt_angles(tmp_path):
    m, stack = _random_model(), _stack(4, 64, 48)
    angles = [-30.0, -10.5, 10.0, 29.75]
    out = infer.denoise_tiled(m, CKPT, stack, tile=32, overlap=12, device="cpu")
    path = tmp_path / "ts_denoised.mrc"
    io.write_mrc(path, out, pixel_size=3.6, tilt_angles=angles)
    with mrcfile.open(path, permissive=False) as mrc:  # strict parse: a valid header
        h = mrc.header
        assert (int(h.mode), int(h.ispg)) == (2, 0)            # float32 image stack
        assert (int(h.nx), int(h.ny), int(h.nz)) == (48, 64, 4)
        assert float(mrc.voxel_size.x) == pytest.approx(3.6) and float(mrc.voxel_size.y) == pytest.approx(3.6)
        assert float(h.dmean) == pytest.approx(float(out.mean()), rel=1e-4)
        np.testing.assert_array_equal(mrc.data, out)
    tlt = tmp_path / "ts_denoised.tlt"  # IMOD looks for <stem>.tlt beside the stack
    assert [float(v) for v in tlt.read_text().split()] == pytest.approx(angles, abs=0.005)
    arr, meta = io.read_stack(path)
    assert meta["tilt_angles"] == pytest.approx(angles, abs=0.005) and meta["pixel_size"] == pytest.approx(3.6)
