"""Tests for emdenoise.io: every reader on real files, writers, atomicity, bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from emdenoise import io
from emdenoise.errors import InputError

T, Y, X = 4, 32, 40  # non-square on purpose


def stack(dtype=np.float32, shape=(T, Y, X)):
    """Frame i holds (pixel index % 100) + 1000*i, so frame order is checkable."""
    frame = (np.arange(shape[-2] * shape[-1]) % 100).reshape(shape[-2:])
    if len(shape) == 2:
        return frame.astype(dtype)
    return np.stack([frame + 1000 * i for i in range(shape[0])]).astype(dtype)


def assert_input_error(exc_info, path, *words):
    msg = str(exc_info.value)
    assert os.path.basename(str(path)) in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg


# --------------------------------------------------------------------------- TIFF
def test_tiff_multipage_memmap(tmp_path):
    p = tmp_path / "movie.tif"
    data = stack(np.uint16)
    tifffile.imwrite(p, data, photometric="minisblack")
    arr, meta = io.read_stack(p)
    assert isinstance(arr, np.memmap)
    assert arr.shape == (T, Y, X) and meta["shape"] == [T, Y, X]
    np.testing.assert_array_equal(arr[1:3], data[1:3])
    assert meta["format"] == "tiff" and meta["dtype"] == "uint16"
    assert meta["pixel_size"] is None and meta["pixel_size_source"] is None
    assert meta["sha256"] == io.sha256_path(p) and os.path.isabs(meta["source"])


def test_tiff_compressed_is_read_lazily(tmp_path):
    p = tmp_path / "c.tif"
    data = stack(np.int16)
    tifffile.imwrite(p, data, photometric="minisblack", compression="zlib")
    arr, _ = io.read_stack(p)
    assert isinstance(arr, io.LazyStack)
    np.testing.assert_array_equal(arr[2], data[2])
    np.testing.assert_array_equal(arr[1:4, 3:5, -2:], data[1:4, 3:5, -2:])
    np.testing.assert_array_equal(np.asarray(arr, dtype=np.float32), data)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(arr))[3], data[3])


def test_imagej_hyperstack_pixel_size_nm(tmp_path):
    p = tmp_path / "ij.tif"
    data = stack(np.float32)
    tifffile.imwrite(p, data, imagej=True, resolution=(1 / 0.0317, 1 / 0.0317),
                     metadata={"axes": "TYX", "unit": "nm"})
    arr, meta = io.read_stack(p)
    assert arr.shape == (T, Y, X)
    assert meta["pixel_size"] == pytest.approx(0.317, rel=1e-6)
    assert meta["pixel_size_source"] == "file"


@pytest.mark.parametrize("unit,value,expected", [("micron", 0.5e-4, 0.5), ("\\u00C5", 1.25, 1.25)])
def test_imagej_other_units(tmp_path, unit, value, expected):
    p = tmp_path / "u.tif"
    tifffile.imwrite(p, stack(), imagej=True, resolution=(1 / value, 1 / value),
                     metadata={"axes": "TYX", "unit": unit})
    assert io.read_stack(p)[1]["pixel_size"] == pytest.approx(expected, rel=1e-6)


def test_imagej_frames_and_slices_flattened(tmp_path):
    p = tmp_path / "tz.tif"
    data = np.arange(3 * 2 * 1 * 16 * 16, dtype=np.float32).reshape(3, 2, 1, 16, 16)
    tifffile.imwrite(p, data, imagej=True, metadata={"axes": "TZCYX"})
    arr, meta = io.read_stack(p)
    assert arr.shape == (6, 16, 16)
    np.testing.assert_array_equal(arr[3], data[1, 1, 0])
    assert any("flattened" in n for n in meta["notes"])


def test_ome_tiff_pixel_size(tmp_path):
    p = tmp_path / "o.ome.tif"
    tifffile.imwrite(p, stack(np.uint16), photometric="minisblack",
                     metadata={"axes": "TYX", "PhysicalSizeX": 0.05, "PhysicalSizeXUnit": "nm"})
    arr, meta = io.read_stack(p)
    assert arr.shape == (T, Y, X) and meta["pixel_size"] == pytest.approx(0.5)


def test_tiff_single_page_is_one_frame(tmp_path):
    p = tmp_path / "one.tiff"
    tifffile.imwrite(p, stack(np.uint8, (Y, X)))
    arr, meta = io.read_stack(p)
    assert arr.shape == (1, Y, X) and meta["shape"] == [1, Y, X]


def test_tiff_planar_rgb_read_as_frames_but_interleaved_rgb_rejected(tmp_path):
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, stack(np.uint8, (3, Y, X)), photometric="rgb", planarconfig="separate")
    arr, meta = io.read_stack(p)
    assert arr.shape == (3, Y, X) and meta["notes"]
    tifffile.imwrite(p, stack(np.uint8, (Y, X, 3)), photometric="rgb")
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "unsupported TIFF layout")


def test_tiff_resolution_unit_cm(tmp_path):
    p = tmp_path / "cm.tif"  # 1e7 px/cm = 10 Å per pixel
    tifffile.imwrite(p, stack(), photometric="minisblack", resolution=(1e7, 1e7), resolutionunit="CENTIMETER")
    assert io.read_stack(p)[1]["pixel_size"] == pytest.approx(10.0)


# --------------------------------------------------------------------------- MRC
@pytest.mark.parametrize("dtype,mode", [(np.int8, 0), (np.int16, 1), (np.float32, 2),
                                        (np.uint16, 6), (np.float16, 12)])
def test_mrc_modes(tmp_path, dtype, mode):
    p = tmp_path / "m.mrc"
    data = (stack(np.float32) % 100).astype(dtype)
    with mrcfile.new(p) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 1.35
    arr, meta = io.read_stack(p)
    assert meta["extra"]["mode"] == mode and arr.dtype == dtype
    np.testing.assert_array_equal(arr, data)
    assert meta["pixel_size"] == pytest.approx(1.35) and meta["format"] == "mrc"


def test_mrcs_2d_and_unknown_voxel_size(tmp_path):
    p = tmp_path / "s.mrcs"
    with mrcfile.new(p) as mrc:
        mrc.set_data(stack())
    arr, meta = io.read_stack(p)
    assert arr.shape == (T, Y, X) and meta["pixel_size"] is None
    p2 = tmp_path / "single.mrc"
    with mrcfile.new(p2) as mrc:
        mrc.set_data(stack(shape=(Y, X)))
    assert io.read_stack(p2)[0].shape == (1, Y, X)


def test_mrc_tilt_angles_beside(tmp_path):
    p = tmp_path / "tilt.st"
    with mrcfile.new(p) as mrc:
        mrc.set_data(stack())
    (tmp_path / "tilt.rawtlt").write_text("-30\n-10\n10\n30\n")
    assert io.read_stack(p)[1]["tilt_angles"] == [-30, -10, 10, 30]


# --------------------------------------------------------------------------- NPY, Zarr, folder
def test_npy_mmap_and_2d(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, stack(np.uint32))
    arr, meta = io.read_stack(p)
    assert isinstance(arr, np.memmap) and meta["format"] == "npy" and meta["dtype"] == "uint32"
    np.save(tmp_path / "b.npy", stack(shape=(Y, X)))
    assert io.read_stack(tmp_path / "b.npy")[0].shape == (1, Y, X)


def test_zarr_plain_array(tmp_path):
    p = tmp_path / "arr.zarr"
    z = zarr.create_array(str(p), shape=(T, Y, X), chunks=(1, Y, X), dtype="uint16")
    z[:] = stack(np.uint16)
    arr, meta = io.read_stack(p, frames=(1, 3))
    assert arr.shape == (2, Y, X) and meta["format"] == "zarr"
    np.testing.assert_array_equal(arr[0], stack(np.uint16)[1])


def test_ome_zarr_group_5d(tmp_path):
    p = tmp_path / "ome.zarr"
    g = zarr.open_group(str(p), mode="w", zarr_format=3)
    a = g.create_array("s0", shape=(T, 1, 1, Y, X), chunks=(1, 1, 1, Y, X), dtype="float32")
    a[:] = stack()[:, None, None]
    axes = [{"name": n, "type": t} for n, t in zip("tcz", ("time", "channel", "space"))]
    axes += [{"name": n, "type": "space", "unit": "nanometer"} for n in "yx"]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1, 0.2, 0.2]}]}]}]}
    arr, meta = io.read_stack(p)
    assert arr.shape == (T, Y, X) and meta["pixel_size"] == pytest.approx(2.0)
    np.testing.assert_array_equal(arr[2], stack()[2])


def test_folder_natural_sort(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i in (1, 2, 10):  # lexical order would put frame_10 before frame_2
        tifffile.imwrite(d / f"frame_{i}.tif", np.full((Y, X), i, np.uint16))
    (d / ".hidden.tif").write_bytes(b"junk")
    (d / "notes.txt").write_text("ignored")
    arr, meta = io.read_stack(d)
    assert arr.shape == (3, Y, X) and meta["n_files"] == 3 and meta["format"] == "folder"
    assert [int(arr[i][0, 0]) for i in range(3)] == [1, 2, 10]
    assert np.asarray(arr[::2])[:, 0, 0].tolist() == [1, 10]
    (d / "notes.txt").write_text("changed")  # non-members do not change the checksum
    assert io.read_stack(d)[1]["sha256"] == meta["sha256"]


def test_pixel_size_override_and_frames(tmp_path):
    p = tmp_path / "m.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(stack())
        mrc.voxel_size = 2.0
    arr, meta = io.read_stack(p, pixel_size=0.8, frames=(-2, None))
    assert meta["pixel_size"] == 0.8 and meta["pixel_size_source"] == "config"
    assert meta["pixel_size_file"] == 2.0 and meta["frames"] == [2, 4]
    np.testing.assert_array_equal(arr, stack()[2:])
    with pytest.raises(InputError) as e:
        io.read_stack(p, frames=(3, 3))
    assert_input_error(e, p, "frames")
    with pytest.raises(InputError):
        io.read_stack(p, pixel_size=-1)


def test_reading_does_not_modify_input(tmp_path):
    paths = []
    for name, write in [("a.tif", lambda p: tifffile.imwrite(p, stack(), photometric="minisblack")),
                        ("a.npy", lambda p: np.save(p, stack())),
                        ("a.mrc", lambda p: mrcfile.new(p, data=stack()).close())]:
        write(tmp_path / name)
        paths.append(tmp_path / name)
    before = {p: (p.stat().st_mtime_ns, io.sha256_path(p)) for p in paths}
    for p in paths:
        arr, _ = io.read_stack(p)
        np.asarray(arr[:], dtype=np.float32)
        with pytest.raises((ValueError, TypeError)):  # read-only mapping
            arr[0, 0, 0] = 1
    assert before == {p: (p.stat().st_mtime_ns, io.sha256_path(p)) for p in paths}


# --------------------------------------------------------------------------- writers
def test_write_tiff_imagej(tmp_path):
    p = tmp_path / "out" / "denoised.tif"
    io.write_tiff(p, stack(np.uint16), pixel_size=0.317, metadata={"dataset": "ds1"})
    with tifffile.TiffFile(p) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "nm"
        assert tif.series[0].axes == "TYX" and tif.series[0].dtype == np.float32
        num, den = tif.pages[0].tags["XResolution"].value
        assert den / num == pytest.approx(0.0317)
        assert json.loads(tif.pages[0].tags[65000].value)["dataset"] == "ds1"
    arr, meta = io.read_stack(p)
    np.testing.assert_array_equal(arr, stack())
    assert meta["pixel_size"] == pytest.approx(0.317) and meta["extra"]["dataset"] == "ds1"
    assert [f.name for f in p.parent.iterdir()] == ["denoised.tif"]


def test_write_mrc(tmp_path):
    p = tmp_path / "d.mrc"
    io.write_mrc(p, stack(np.int16), pixel_size=1.5, tilt_angles=[-3, -1, 1, 3])
    with mrcfile.open(p) as mrc:
        assert mrc.header.mode == 2 and mrc.header.ispg == 0 and mrc.is_image_stack()
        assert mrc.voxel_size.x == pytest.approx(1.5)
        np.testing.assert_array_equal(mrc.data, stack())
        assert mrc.header.dmax == stack().max()
        assert mrc.header.dmean == pytest.approx(stack().mean(), rel=1e-5)
        assert any("emdenoise" in s for s in mrc.get_labels())
    with open(os.devnull, "w") as quiet:
        assert mrcfile.validate(str(p), print_file=quiet)
    _, meta = io.read_stack(p)
    assert meta["tilt_angles"] == [-3, -1, 1, 3]


def test_write_zarr_ome(tmp_path):
    p = tmp_path / "raw.zarr"
    io.write_zarr(p, stack(), pixel_size=0.5, attrs={"source": "x.tif", "detector_mode": "counting"})
    g = zarr.open_group(str(p), mode="r")
    ms = g.attrs["ome"]["multiscales"][0]
    assert g.attrs["ome"]["version"] == "0.5" and [a["name"] for a in ms["axes"]] == ["t", "y", "x"]
    assert ms["axes"][2]["unit"] == "angstrom"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    assert g["0"].chunks == (1, Y, X) and g["0"].dtype == np.float32
    arr, attrs = io.read_zarr(p)
    np.testing.assert_array_equal(arr[:], stack())
    assert attrs["pixel_size"] == 0.5 and attrs["source"] == "x.tif"
    _, meta = io.read_stack(p)
    assert meta["pixel_size"] == 0.5 and meta["detector_mode"] == "counting"
    io.write_zarr(p, stack()[:2])  # overwrite an existing group; unknown pixel size
    arr, attrs = io.read_zarr(p)
    assert arr.shape == (2, Y, X) and attrs["pixel_size"] is None
    assert "unit" not in zarr.open_group(str(p), mode="r").attrs["ome"]["multiscales"][0]["axes"][2]


def test_zarr_stack_writer_streams(tmp_path):
    p = tmp_path / "s.zarr"
    with io.ZarrStackWriter(p, (T, Y, X), pixel_size=1.0) as w:
        assert not p.exists()
        for i in range(T):
            w[i] = stack()[i]
    np.testing.assert_array_equal(io.read_zarr(p)[0][:], stack())


@pytest.mark.parametrize("ext", [".tif", ".mrc", ".zarr", ".npy"])
def test_write_stack_dispatch(tmp_path, ext):
    p = tmp_path / f"out{ext}"
    io.write_stack(p, stack(shape=(Y, X)), pixel_size=2.0)
    arr, meta = io.read_stack(p)
    assert arr.shape == (1, Y, X) and arr.dtype == np.float32
    assert meta["pixel_size"] == (None if ext == ".npy" else pytest.approx(2.0))


def test_atomic_path_failure_leaves_nothing(tmp_path):
    final = tmp_path / "sub" / "x.tif"
    with pytest.raises(RuntimeError):
        with io.atomic_path(final) as tmp:
            assert tmp.name.startswith(".x.tmp-") and tmp.suffix == ".tif"
            tifffile.imwrite(tmp, stack(), photometric="minisblack")
            raise RuntimeError("boom")
    assert list(final.parent.iterdir()) == []
    with pytest.raises(RuntimeError):
        with io.ZarrStackWriter(tmp_path / "z.zarr", (T, Y, X)) as w:
            w[0] = stack()[0]
            raise RuntimeError("boom")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["sub"]


def test_atomic_path_replaces_existing_dir(tmp_path):
    final = tmp_path / "d.zarr"
    io.write_zarr(final, stack())
    with pytest.raises(RuntimeError):  # a failed rewrite keeps the old output
        with io.ZarrStackWriter(final, (1, Y, X)):
            raise RuntimeError("boom")
    assert io.read_zarr(final)[0].shape == (T, Y, X)
    io.write_zarr(final, stack()[:1])
    assert io.read_zarr(final)[0].shape == (1, Y, X)
    assert [f.name for f in tmp_path.iterdir()] == ["d.zarr"]


def test_describe_and_sha(tmp_path):
    p = tmp_path / "a.npy"
    data = stack()
    data[1, 0, 0] = np.nan
    np.save(p, data)
    d = io.describe(p)
    assert d["shape"] == [T, Y, X] and d["n_nan"] == 1 and d["max"] == np.nanmax(data)
    assert d["sampled_frames"] == [0, 1, 2, 3]
    assert d["sha256"] == io.sha256_path(p) != io.sha256_path(tmp_path)


def test_ingest_to_zarr(tmp_path):
    src, dst = tmp_path / "movie.tif", tmp_path / "ds" / "raw.zarr"
    tifffile.imwrite(src, stack(np.uint16), imagej=True, resolution=(10, 10),
                     metadata={"axes": "TYX", "unit": "nm"})
    attrs = io.ingest(src, dst, frames=(1, None), extra_attrs={"dataset": "ds"}, min_frames=2)
    arr, read_attrs = io.read_zarr(dst)
    assert arr.dtype == np.float32 and arr.shape == (T - 1, Y, X)
    np.testing.assert_array_equal(arr[:], stack()[1:])
    assert read_attrs["pixel_size"] == pytest.approx(1.0) and read_attrs["dataset"] == "ds"
    assert read_attrs["sha256"] == io.sha256_path(src) == attrs["sha256"]
    bad = stack()
    bad[2, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError) as e:
        io.ingest(tmp_path / "nan.npy", tmp_path / "nan.zarr")
    assert_input_error(e, "nan.npy", "NaN", "frame 2")
    assert not (tmp_path / "nan.zarr").exists()
    assert io.describe(src, pixel_size=3.0)["pixel_size"] == 3.0


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(InputError) as e:
        io.read_stack(tmp_path / "nope.tif")
    assert_input_error(e, "nope.tif", "does not exist")


def test_empty_tiff(tmp_path):
    p = tmp_path / "empty.tif"
    p.write_bytes(b"")
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "empty")


def test_garbage_tiff(tmp_path):
    p = tmp_path / "junk.tif"
    p.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "tiff")


@pytest.mark.parametrize("kwargs", [{"photometric": "minisblack"}, {"imagej": True},
                                    {"photometric": "minisblack", "compression": "zlib"}])
def test_truncated_tiff(tmp_path, kwargs):
    p = tmp_path / "cut.tif"
    tifffile.imwrite(p, stack(np.uint16), **kwargs)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "truncated")


@pytest.mark.parametrize("offset,value,word", [(208, b"XXXX", "MAP id"),
                                               (12, np.int32(5).tobytes(), "mode 5")])
def test_bad_mrc_header(tmp_path, offset, value, word):
    p = tmp_path / "bad.mrc"
    mrcfile.new(p, data=stack()).close()
    raw = bytearray(p.read_bytes())
    raw[offset:offset + 4] = value
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "MRC header", word)


def test_truncated_mrc(tmp_path):
    p = tmp_path / "cut.mrc"
    mrcfile.new(p, data=stack()).close()
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "truncated")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_validate_non_finite(tmp_path, bad):
    data = stack()
    data[2, 5, 5] = data[3, 0, 0] = bad
    with pytest.raises(InputError) as e:
        io.validate_stack(data, "x.npy", chunk_frames=1)
    assert_input_error(e, "x.npy", "NaN" if bad != bad else "Inf", "2 ", "frame 2")
    io.validate_stack(data, "x.npy", check_finite=False)


def test_validate_frames_and_size(tmp_path):
    with pytest.raises(InputError) as e:
        io.validate_stack(stack(shape=(1, Y, X)), "one.tif", min_frames=3)
    assert_input_error(e, "one.tif", "has 1 frame", "at least 3")
    with pytest.raises(InputError) as e:
        io.validate_stack(stack(shape=(T, 8, 8)), "tiny.tif")
    assert_input_error(e, "tiny.tif", "too small", "8x8")
    io.validate_stack(stack(shape=(3, 16, 64)), "ok.tif", min_frames=3)  # non-square is fine
    with pytest.raises(InputError) as e:
        io.validate_stack(stack(np.complex64), "c.npy")
    assert_input_error(e, "c.npy", "dtype")


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_unsupported_dtype_npy(tmp_path, dtype):
    p = tmp_path / "bad.npy"
    np.save(p, np.zeros((T, Y, X), dtype))
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "unsupported dtype", np.dtype(dtype).name)


def test_4d_npy(tmp_path):
    p = tmp_path / "four.npy"
    np.save(p, np.zeros((2, 2, Y, X), np.float32))
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "4 dimensions")


def test_folder_mismatched_shape(tmp_path):
    for i, shape in enumerate([(Y, X), (Y, X), (Y, X + 1)]):
        np.save(tmp_path / f"f{i}.npy", np.zeros(shape, np.float32))
    with pytest.raises(InputError) as e:
        io.read_stack(tmp_path)
    assert_input_error(e, "f2.npy", "differs")


def test_empty_folder_and_unknown_extension(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("no frames here")
    with pytest.raises(InputError) as e:
        io.read_stack(d)
    assert_input_error(e, "empty", "empty folder")
    p = tmp_path / "movie.avi"
    p.write_bytes(b"data")
    with pytest.raises(InputError) as e:
        io.read_stack(p)
    assert_input_error(e, p, "unknown file extension", ".avi")


def test_not_zarr_and_group_without_array(tmp_path):
    d = tmp_path / "x.zarr"
    d.mkdir()
    with pytest.raises(InputError) as e:
        io.read_stack(d)
    assert_input_error(e, d, "zarr")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    with pytest.raises(InputError) as e:
        io.read_zarr(tmp_path / "g.zarr")
    assert_input_error(e, "g.zarr", "no array")


# --------------------------------------------------------------------------- OME-Zarr conformance, calibration
def validate_ome(path):
    """Validate with ome-zarr-models (OME-Zarr 0.5 image); return the model."""
    from ome_zarr_models.v05.image import Image

    return Image.from_zarr(zarr.open_group(str(path), mode="r"))


def test_every_written_ome_zarr_validates(tmp_path):
    pytest.importorskip("ome_zarr_models", reason="pip install ome-zarr-models")
    outs = []
    io.write_zarr(tmp_path / "plain.zarr", stack())  # no calibration
    io.write_zarr(tmp_path / "cal.zarr", stack(), pixel_size=0.5, attrs={"frame_time": 0.04})
    with io.ZarrStackWriter(tmp_path / "w.zarr", (T, Y, X), pixel_size=1.0, chunks=(1, 16, 16)) as w:
        w.array[:] = stack()  # as chunked inference writes: straight into the array
    src = tmp_path / "m.tif"
    tifffile.imwrite(src, stack(np.uint16), photometric="minisblack")
    io.ingest(src, tmp_path / "raw.zarr")
    outs = ["plain.zarr", "cal.zarr", "w.zarr", "raw.zarr"]
    for name in outs:
        model = validate_ome(tmp_path / name)
        arr = zarr.open_group(str(tmp_path / name), mode="r")["0"]
        assert arr.metadata.dimension_names == ("t", "y", "x")
        assert len(model.attributes.ome.multiscales[0].datasets) == 1  # small frames: no pyramid
    ms = validate_ome(tmp_path / "cal.zarr").attributes.ome.multiscales[0]
    assert ms.axes[0].unit == "second" and ms.axes[1].unit == "angstrom"
    assert ms.datasets[0].coordinateTransformations[0].scale == [0.04, 0.5, 0.5]
    assert validate_ome(tmp_path / "plain.zarr").attributes.ome.multiscales[0].axes[0].unit is None


def test_zarr_arrays_are_sharded_few_files_per_movie(tmp_path):
    """Chunks stay one frame (what readers slice), but a shard file holds up to 64 frames:
    a 150-frame movie is 3 files, not 150 (inode quotas on archives); the data round-trip
    exactly and the group still validates as OME-Zarr 0.5."""
    data = np.random.default_rng(1).random((150, 40, 56)).astype(np.float32)
    p = tmp_path / "movie.zarr"
    io.write_zarr(p, data, pixel_size=1.0)
    arr = zarr.open_group(str(p), mode="r")["0"]
    assert arr.chunks == (1, 40, 56) and arr.shards == (64, 40, 56)
    chunk_files = [f for f in (p / "0").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(chunk_files) == 3, chunk_files
    np.testing.assert_array_equal(io.read_zarr(p)[0][:], data)
    np.testing.assert_array_equal(io.read_zarr(p)[0][70], data[70])
    # frames of 256 MiB or more: one frame per shard; explicit chunks keep whole chunks per shard
    assert io.shard_shape((10, 8192, 8192), (1, 8192, 8192)) == (1, 8192, 8192)
    assert io.shard_shape((100, 512, 512), (2, 16, 16)) == (64, 16, 16)
    assert io.shard_shape((5, 512, 512), (1, 512, 512)) == (5, 512, 512)
    if importlib.util.find_spec("ome_zarr_models"):
        validate_ome(p)


def test_ome_zarr_pyramid_and_level0(tmp_path):
    pytest.importorskip("ome_zarr_models", reason="pip install ome-zarr-models")
    data = np.random.default_rng(0).random((3, 1100, 600)).astype(np.float32)
    p = tmp_path / "big.zarr"
    io.write_zarr(p, data, pixel_size=2.0)
    assert io.pyramid_levels((1100, 600)) == 1 and io.pyramid_levels((4096, 4096)) == 4
    ms = validate_ome(p).attributes.ome.multiscales[0]
    assert [d.path for d in ms.datasets] == ["0", "1"]
    assert ms.datasets[1].coordinateTransformations[0].scale == [1.0, 4.0, 4.0]
    g = zarr.open_group(str(p), mode="r")
    np.testing.assert_allclose(g["1"][1], data[1].reshape(550, 2, 300, 2).mean(axis=(1, 3)), rtol=1e-6)
    arr, attrs = io.read_zarr(p)  # readers keep getting level 0
    assert arr.shape == (3, 1100, 600) and attrs["pixel_size"] == 2.0
    np.testing.assert_array_equal(arr[2], data[2])
    assert io.read_stack(p)[0].shape == (3, 1100, 600)


def test_tiff_finterval(tmp_path):
    p = tmp_path / "t.tif"
    io.write_stack(p, stack(), pixel_size=1.0, metadata={"frame_time": 0.025})
    with tifffile.TiffFile(p) as tif:
        assert tif.imagej_metadata["finterval"] == pytest.approx(0.025)
    io.write_tiff(p, stack())
    with tifffile.TiffFile(p) as tif:
        assert "finterval" not in tif.imagej_metadata
