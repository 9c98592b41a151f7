"""Vendor formats: the small real files in ../shared/data/vendor/ (read in place, never
copied) and files built here where no real one can be had (EER, Velox EMD, SerialEM
mdoc). Shape, dtype and pixel size (Å) are asserted for each."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import zarr

from emdenoise import cli, io, vendor
from emdenoise import config as emcfg
from emdenoise.errors import InputError

VENDOR = Path(__file__).resolve().parents[2] / "shared" / "data" / "vendor"
if not VENDOR.is_dir():  # the worktree may sit beside the main checkout
    VENDOR = Path(os.environ.get("EMDENOISE_VENDOR_DATA", "/work/shared/data/vendor"))
needs_vendor = pytest.mark.skipif(not VENDOR.is_dir(), reason=f"no vendor fixtures at {VENDOR}")
rsciio = pytest.importorskip("rsciio", reason="optional package rosettasciio (pip install rosettasciio)")


def validate_ome(path):
    from ome_zarr_models.v05.image import Image

    return Image.from_zarr(zarr.open_group(str(path), mode="r"))


# --------------------------------------------------------------------------- real files
REAL = [  # file, shape, dtype, pixel size in Å (None = uncalibrated)
    ("test_stackbuilder_imagestack.dm3", (3, 2, 16), "uint32", 599.829033),  # 0.05998 µm
    ("test-1.dm4", (2, 2, 2), "int16", None),
    ("64x64x5_TEM_preview.emi", (5, 64, 64), "float32", 62.8183362),  # 6.2818 nm
    ("64x64x5_TEM_preview_1.ser", (5, 64, 64), "float32", 62.8183362),
    ("64x64_TEM_images_acquire.emi", (1, 64, 64), "float32", 62.8183362),
    ("Si100_2x1x1_3D.emd", (1, 22, 44), "float32", 2.5),  # NCEM EMD, 0.25 nm
]


@needs_vendor
@pytest.mark.parametrize("name,shape,dtype,px", REAL)
def test_real_vendor_file(name, shape, dtype, px):
    arr, meta = io.read_stack(VENDOR / name)
    assert arr.shape == shape and arr.dtype == np.dtype(dtype) and meta["shape"] == list(shape)
    assert meta["pixel_size"] == (None if px is None else pytest.approx(px, rel=1e-6))
    assert meta["pixel_size_source"] == ("file" if px else None)
    data = np.asarray(arr[:])
    assert data.shape == shape and np.isfinite(data.astype(np.float64)).all()
    np.testing.assert_array_equal(np.asarray(arr[shape[0] - 1]), data[-1])
    d = io.describe(VENDOR / name)
    assert d["shape"] == list(shape) and d["format"] == meta["format"]


@needs_vendor
def test_tia_series_ingests_with_calibration(tmp_path):
    dst = tmp_path / "raw.zarr"
    attrs = io.ingest(VENDOR / "64x64x5_TEM_preview.emi", dst, extra_attrs={"dataset": "tia"})
    arr, read = io.read_zarr(dst)
    assert arr.shape == (5, 64, 64) and arr.dtype == np.float32
    assert read["pixel_size"] == pytest.approx(62.8183362) and attrs["format"] == "tia"
    ms = validate_ome(dst).attributes.ome.multiscales[0]
    assert ms.datasets[0].coordinateTransformations[0].scale[1] == pytest.approx(62.8183362)
    # the config overrides the file's pixel size, which is kept beside it
    attrs = io.ingest(VENDOR / "64x64x5_TEM_preview_1.ser", tmp_path / "o.zarr", pixel_size=1.5)
    assert attrs["pixel_size"] == 1.5 and attrs["pixel_size_file"] == pytest.approx(62.8183362)


@needs_vendor
@pytest.mark.parametrize("name,min_frames,words", [
    ("test_stackbuilder_imagestack.dm3", 3, ["too small", "2x16"]),
    ("test-1.dm4", 2, ["too small", "2x2"]),
    ("test-1.dm4", 4, ["has 2 frames", "at least 4"]),
    ("64x64_TEM_images_acquire.emi", 4, ["single image"]),
    ("Si100_2x1x1_3D.emd", 4, ["single image"]),
])
def test_real_files_too_small_or_single_image_refused(tmp_path, name, min_frames, words):
    with pytest.raises(InputError) as e:
        io.ingest(VENDOR / name, tmp_path / "raw.zarr", min_frames=min_frames)
    msg = str(e.value)
    assert name in msg and "\n" not in msg
    assert all(w in msg for w in words), msg
    assert not (tmp_path / "raw.zarr").exists()


@needs_vendor
def test_cli_info_and_single_line_errors(tmp_path, capsys):
    assert cli.main(["info", str(VENDOR / "64x64x5_TEM_preview_1.ser")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == [5, 64, 64] and out["pixel_size"] == pytest.approx(62.8183362)
    with pytest.raises(SystemExit) as e:
        cli.main(["denoise", str(VENDOR / "64x64_TEM_images_acquire.emi"), str(tmp_path / "o.tif")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "single image" in err and "Traceback" not in err


@needs_vendor
def test_missing_package_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # import now fails
    with pytest.raises(InputError) as e:
        io.read_stack(VENDOR / "test-1.dm4")
    msg = str(e.value)
    assert "test-1.dm4" in msg and "pip install rosettasciio" in msg and "\n" not in msg
    with pytest.raises(SystemExit) as ex:
        cli.main(["info", str(VENDOR / "test-1.dm4")])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "pip install rosettasciio" in err and "Traceback" not in err


@needs_vendor
def test_folder_of_dm_files(tmp_path, monkeypatch):
    """A folder of per-frame DM4 files (in-situ K2/K3). No single-frame DM4 exists among
    the real fixtures: the real stacks are linked in and refused as folder members, then
    the folder path is exercised with the DM reader returning one real TIA frame each."""
    d = tmp_path / "insitu"
    d.mkdir()
    for i in range(3):
        (d / f"frame_{i}.dm4").symlink_to(VENDOR / "test-1.dm4")
    with pytest.raises(InputError) as e:
        io.read_stack(d)
    assert "folder members must be single frames" in str(e.value)
    single = VENDOR / "64x64_TEM_images_acquire.emi"
    real_open = vendor.open_rsciio
    monkeypatch.setattr(vendor, "open_rsciio", lambda p, fmt: real_open(single, "tia"))
    arr, meta = io.read_stack(d)
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32 and meta["n_files"] == 3
    assert meta["pixel_size"] == pytest.approx(62.8183362) and meta["format"] == "folder"


# --------------------------------------------------------------------------- EER (built here)
def _eer_bits(frame, skipbits=7, horzbits=2, vertbits=2, subpixel=(2, 2)):
    """Encode one binary frame as an EER 7-2-2 bitstream (TIFF compression 65001).

    No library writes EER (imagecodecs only decodes it), so this follows the decoder:
    codes are read LSB first; a code is a ``skipbits`` run of empty pixels, followed,
    unless the run is the maximum (a pure skip), by ``horzbits + vertbits`` sub-pixel
    bits and one event. Sub-pixel codes are stored XOR the bit count (2, 2 -> offset 0).
    """
    acc, nbit, cur, full = 0, 0, 0, (1 << skipbits) - 1

    def emit(value, n):
        nonlocal acc, nbit
        acc, nbit = acc | (value << nbit), nbit + n

    for p in np.flatnonzero(frame.ravel()):
        gap = int(p) - cur
        while gap >= full:
            emit(full, skipbits)
            gap -= full
        emit(gap | subpixel[0] << skipbits | subpixel[1] << (skipbits + horzbits),
             skipbits + horzbits + vertbits)
        cur = int(p) + 1
    rest = frame.size - cur
    while rest >= full:
        emit(full, skipbits)
        rest -= full
    emit(rest, skipbits)
    n = (nbit + 7) // 8 + 4
    return acc.to_bytes(n + n % 2, "little")


def make_eer(path, events, exposure_s=0.45, total_dose=2.25):
    """A BigTIFF EER file as a Falcon writes it: one EER-compressed page per raw frame and
    the acquisition XML in tag 65001, written with tifffile (pages stored as pre-encoded
    strips, then the Compression tag set to EER 65001)."""
    tifffile = pytest.importorskip("tifffile")
    xml = (f'<metadata><item name="exposureTime" unit="s">{exposure_s}</item>'
           f'<item name="numberOfFrames">{len(events)}</item>'
           f'<item name="totalDose" unit="e/pixel">{total_dose}</item>'
           '<item name="sensorPixelSize.width" unit="m">1.4e-05</item></metadata>').encode()
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, frame in enumerate(events):
            tw.write(iter([_eer_bits(frame)]), shape=frame.shape, dtype=np.uint8, compression="zlib",
                     photometric="minisblack", metadata=None, rowsperstrip=frame.shape[0],
                     extratags=[(65001, 7, len(xml), xml, True)] if i == 0 else None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(65001)


def test_eer_fractions_calibration_and_upsampling(tmp_path):
    pytest.importorskip("imagecodecs", reason="EER decoding needs imagecodecs")
    events = np.random.default_rng(0).random((45, 32, 48)) < 0.05
    p = tmp_path / "movie.eer"
    make_eer(p, events)
    arr, meta = io.read_stack(p)  # default: 20 raw frames per fraction
    assert vendor.EER_GROUP == 20 and arr.shape == (2, 32, 48) and arr.dtype == np.uint16
    np.testing.assert_array_equal(arr[:], events[:40].reshape(2, 20, 32, 48).sum(axis=1))
    assert meta["frame_time"] == pytest.approx(0.2) and meta["dose_per_frame"] == pytest.approx(1.0)
    assert meta["dose_unit"] == "e/px" and meta["pixel_size"] is None  # sensor pixel is not the specimen's
    assert any("dropped the last 5" in n for n in meta["notes"])
    arr, meta = io.read_stack(p, eer_group=5, pixel_size=0.8)
    assert arr.shape == (9, 32, 48) and meta["frame_time"] == pytest.approx(0.05)
    np.testing.assert_array_equal(arr[3], events[15:20].sum(axis=0))
    up, _ = io.read_stack(p, eer_group=15, eer_upsampling=2)
    assert up.shape == (3, 64, 96) and int(up[:].sum()) == int(events.sum())
    dst = tmp_path / "raw.zarr"
    attrs = io.ingest(p, dst, eer_group=10, pixel_size=0.8)
    assert attrs["eer_group"] == 10 and attrs["frame_time"] == pytest.approx(0.1)
    ms = validate_ome(dst).attributes.ome.multiscales[0]
    assert ms.axes[0].unit == "second" and ms.datasets[0].coordinateTransformations[0].scale[0] == pytest.approx(0.1)
    from emdenoise import provenance  # the calibration reaches provenance.json

    ds = emcfg.build({"datasets": {"m": {"path": str(p), "eer_group": 10}}}).datasets["m"]
    rec = provenance.build_record(ds, input_path=str(p), input_sha256=attrs["sha256"], outputs=[], logs=[],
                                  acquisition={k: attrs[k] for k in io.CALIBRATION_KEYS if k in attrs})
    assert rec["input"]["acquisition"]["frame_time"] == pytest.approx(0.1)
    assert rec["input"]["acquisition"]["eer_group"] == 10 and rec["config"]["eer_group"] == 10
    with pytest.raises(InputError) as e:
        io.read_stack(p, eer_group=50)
    assert "fewer than eer_group=50" in str(e.value)


def test_eer_settings_in_config(tmp_path):
    ds = emcfg.build({"datasets": {"m": {"path": "x.eer", "eer_group": 40}}}, check_paths=False).datasets["m"]
    assert ds.eer_group == 40 and ds.eer_upsampling == 1
    emcfg.validate({"datasets": {"m": {"path": "x.eer", "eer_group": 40, "eer_upsampling": 2}}})
    with pytest.raises(InputError):
        emcfg.validate({"datasets": {"m": {"path": "x.eer", "eer_upsampling": 3}}})
    for name in ("run3.eer", "stack.dm4", "a.dm3", "s_1.ser", "s.emi", "velox.emd"):
        assert "." not in emcfg._dataset_name(f"/data/{name}")


# --------------------------------------------------------------------------- Velox EMD (built here)
def test_velox_emd_stack(tmp_path):
    """Velox writes EMD (HDF5) with its own layout; no real Velox file is among the
    fixtures, so one is built with h5py in that layout: /Version JSON, the stack
    /Data/Image/<id>/Data as (Y, X, T) and its metadata JSON as a uint8 column."""
    h5py = pytest.importorskip("h5py")
    data = (np.arange(24 * 20 * 6) % 97).astype(np.uint16).reshape(24, 20, 6)

    def as_json(d):
        return np.frombuffer(json.dumps(d).encode(), np.uint8).reshape(-1, 1)

    md = {"BinaryResult": {"PixelSize": {"width": "2.5e-10", "height": "2.5e-10"}, "PixelUnitX": "m",
                           "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"}, "DetectorIndex": "0"},
          "Detectors": {"Detector-0": {"DetectorName": "BM-Ceta", "ExposureTime": "0.05"}},
          "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
          "Scan": {}, "CustomProperties": {}, "Optics": {"AccelerationVoltage": "300000"}}
    p = tmp_path / "velox.emd"
    with h5py.File(p, "w") as f:
        f.create_dataset("Version", data=np.array([json.dumps({"format": "Velox", "version": "11"}).encode()]))
        g = f.create_group("Data/Image/0123abcd")
        g.create_dataset("Data", data=data, chunks=(24, 20, 1))
        g.create_dataset("Metadata", data=as_json(md))
    arr, meta = io.read_stack(p)
    assert arr.shape == (6, 24, 20) and arr.dtype == np.uint16
    assert meta["pixel_size"] == pytest.approx(2.5) and meta["frame_time"] == pytest.approx(0.05)
    np.testing.assert_array_equal(arr[2], data[:, :, 2])


# --------------------------------------------------------------------------- SerialEM mdoc (built here)
def test_mdoc_beside_mrc(tmp_path):
    """SerialEM writes ``<stack>.mrc.mdoc``; none is among the fixtures, so one is written
    with mdocfile (its writer) beside an MRC written with mrcfile (voxel size left 0)."""
    mdocfile = pytest.importorskip("mdocfile")
    pd = pytest.importorskip("pandas")
    p = tmp_path / "ts01.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.zeros((3, 32, 32), np.float32))
    df = pd.DataFrame({"ZValue": [2, 0, 1], "TiltAngle": [3.0, -3.0, 0.0], "PixelSpacing": [1.35] * 3,
                       "ExposureDose": [3.1, 3.0, 3.05], "ExposureTime": [0.5] * 3,
                       "DataMode": [1] * 3, "ImageSize": [(32, 32)] * 3, "titles": [["[T = SerialEM]"]] * 3})
    mdocfile.write(df, tmp_path / "ts01.mrc.mdoc")
    arr, meta = io.read_stack(p)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert meta["pixel_size"] == pytest.approx(1.35) and meta["tilt_angles"] == [-3.0, 0.0, 3.0]
    assert meta["dose_per_frame"] == [3.0, 3.05, 3.1] and meta["dose_unit"] == "e/A^2"
    assert meta["exposure_time"] == [0.5] * 3 and meta["mdoc"].endswith("ts01.mrc.mdoc")
    (tmp_path / "ts01.tlt").write_text("-2\n0\n2\n")  # an IMOD .tlt wins over the mdoc angles
    assert io.read_stack(p)[1]["tilt_angles"] == [-2, 0, 2]


# --------------------------------------------------------------------------- through the workflow
@needs_vendor
def test_workflow_ingests_vendor_files(tmp_path):
    """The ingest rule takes a real TIA series and an EER (grouping from the config), and
    refuses a real 2x2 px DM4 with one line in its log."""
    pytest.importorskip("imagecodecs")
    from test_workflow import snakemake

    events = np.random.default_rng(1).random((40, 32, 32)) < 0.05
    make_eer(tmp_path / "movie.eer", events, exposure_s=0.4)
    config = {"results": "results", "datasets": {
        "tia": {"path": str(VENDOR / "64x64x5_TEM_preview_1.ser")},
        "eer": {"path": str(tmp_path / "movie.eer"), "eer_group": 8, "pixel_size": 0.8},
        "tiny": {"path": str(VENDOR / "test-1.dm4")}}}
    r = snakemake(tmp_path, "--keep-going", *(f"results/{d}/raw.zarr" for d in ("tia", "eer", "tiny")),
                  config=config)
    assert r.returncode != 0  # the DM4 is refused
    arr, attrs = io.read_zarr(tmp_path / "results/tia/raw.zarr")
    assert arr.shape == (5, 64, 64) and attrs["pixel_size"] == pytest.approx(62.8183362)
    arr, attrs = io.read_zarr(tmp_path / "results/eer/raw.zarr")
    assert arr.shape == (5, 32, 32) and attrs["eer_group"] == 8 and attrs["frame_time"] == pytest.approx(0.08)
    assert attrs["pixel_size"] == 0.8 and attrs["pixel_size_source"] == "config"
    for d in ("tia", "eer"):
        validate_ome(tmp_path / f"results/{d}/raw.zarr")
    log = (tmp_path / "results/logs/tiny/ingest.log").read_text()
    assert "test-1.dm4: has 2 frames" in log and "Traceback" not in log
    assert not (tmp_path / "results/tiny/raw.zarr").exists()


def test_missing_eer_and_mdoc_packages(tmp_path, monkeypatch):
    pytest.importorskip("imagecodecs")
    make_eer(tmp_path / "m.eer", np.random.default_rng(2).random((20, 16, 16)) < 0.1)
    p = tmp_path / "ts.mrc"
    with mrcfile.new(p) as mrc:
        mrc.set_data(np.zeros((2, 16, 16), np.float32))
    (tmp_path / "ts.mrc.mdoc").write_text("PixelSpacing = 1.0\n\n[ZValue = 0]\nTiltAngle = 0\n")
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    monkeypatch.setitem(sys.modules, "mdocfile", None)
    with pytest.raises(InputError) as e:
        io.read_stack(tmp_path / "m.eer")
    assert "m.eer" in str(e.value) and "pip install imagecodecs" in str(e.value)
    arr, meta = io.read_stack(p)  # the stack stays readable; the .mdoc is skipped with a note
    assert arr.shape == (2, 16, 16) and any("pip install mdocfile" in n for n in meta["notes"])
