"""provenance.json contents and `verify` catching changed inputs and outputs."""
from __future__ import annotations

import json

import numpy as np
import tifffile

from emdenoise import config as emcfg
from emdenoise import io, provenance


def _record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "movie.tif"
    tifffile.imwrite(src, np.arange(4 * 20 * 20, dtype=np.uint16).reshape(4, 20, 20), photometric="minisblack")
    io.ingest(src, "results/m/raw.zarr")
    (tmp_path / "results" / "m" / "metrics.csv").write_text("method,umse\nraw,1.0\n")
    log = tmp_path / "results" / "logs" / "m" / "ingest.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-11-22 01:00:00,000 INFO emdenoise: start ingest\n2026-11-22 01:00:05,000 INFO emdenoise: done\n")
    ds = emcfg.build({"datasets": {"m": {"path": str(src)}}}).datasets["m"]
    _, attrs = io.read_zarr("results/m/raw.zarr")
    rec = provenance.build_record(ds, input_path=str(src), input_sha256=attrs["sha256"],
                                  outputs=["results/m/metrics.csv", "results/m/raw.zarr"], logs=[log],
                                  model_info={"seed": 0})
    provenance.write_record(rec, "results/m/provenance.json")
    return src, rec


def test_record_holds_config_versions_checksums_and_times(tmp_path, monkeypatch):
    src, rec = _record(tmp_path, monkeypatch)
    saved = json.loads((tmp_path / "results/m/provenance.json").read_text())
    assert saved["config"]["drift"]["upsample"] == 20 and saved["config"]["path"] == str(src)
    assert saved["packages"]["torch"].startswith("2.13") and saved["packages"]["numpy"]
    assert saved["code_version"]
    assert saved["input"]["sha256"] == io.sha256_path(src)
    assert saved["stages"]["ingest"] == {"start": "2026-11-22 01:00:00", "end": "2026-11-22 01:00:05"}
    assert set(saved["outputs"]) == {"results/m/metrics.csv", "results/m/raw.zarr"}


def test_verify_passes_then_flags_changed_output_and_input(tmp_path, monkeypatch):
    src, _ = _record(tmp_path, monkeypatch)
    assert provenance.verify(tmp_path / "results") == []
    (tmp_path / "results/m/metrics.csv").write_text("method,umse\nraw,2.0\n")
    problems = provenance.verify(tmp_path / "results")
    assert len(problems) == 1 and "metrics.csv changed" in problems[0]
    tifffile.imwrite(src, np.zeros((4, 20, 20), np.uint16), photometric="minisblack")
    assert any("movie.tif changed" in p for p in provenance.verify(tmp_path / "results"))


def test_verify_without_records_says_so(tmp_path):
    assert "no provenance.json" in provenance.verify(tmp_path)[0]
