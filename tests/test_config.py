"""Typed configuration: defaults in one place, overrides, globbing, clear errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from emdenoise import config as emcfg
from emdenoise.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_config_yaml_defaults_match_the_typed_defaults():
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    emcfg.validate(shipped)
    for stage, cls in emcfg.STAGES.items():
        if cls is dict:
            assert shipped["defaults"][stage] == {}, stage
            continue
        typed = dataclasses.asdict(cls())
        listed = {k: tuple(v) if isinstance(v, list) else v for k, v in shipped["defaults"][stage].items()}
        assert listed == typed, stage


def test_dataset_overrides_defaults_and_defaults_override_builtin(tmp_path):
    (tmp_path / "a.tif").touch()
    cfg = {
        "datasets": {"a": {"path": str(tmp_path / "a.tif"), "drift": {"upsample": 50}}},
        "defaults": {"drift": {"apply": "fourier"}, "noise": {"threshold": 0.2}},
    }
    emcfg.validate(cfg)
    a = emcfg.build(cfg).datasets["a"]
    assert a.drift.upsample == 50 and a.drift.apply == "fourier"
    assert a.noise.threshold == 0.2 and a.noise.max_lag == 4
    assert a.drift_enabled  # movie by default


def test_tilt_series_skip_drift_unless_asked(tmp_path):
    (tmp_path / "t.mrc").touch()
    base = {"path": str(tmp_path / "t.mrc"), "kind": "tilt_series"}
    assert not emcfg.build({"datasets": {"t": base}}).datasets["t"].drift_enabled
    forced = {**base, "drift": {"enabled": True}}
    assert emcfg.build({"datasets": {"t": forced}}).datasets["t"].drift_enabled


@pytest.mark.parametrize("bad, key", [
    ({"datasets": {"a": {"path": "x", "pixelsize": 1}}}, "pixelsize"),
    ({"datasets": {"a": {"path": "x", "kind": "video"}}}, "kind"),
    ({"datasets": {"a": {"path": "x"}}, "defaults": {"noise": {"threshold": "high"}}}, "threshold"),
    ({"datasets": {"a": {"path": "x"}}, "defualts": {}}, "defualts"),
])
def test_schema_errors_name_the_key(bad, key):
    with pytest.raises(InputError, match=key):
        emcfg.validate(bad)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(InputError, match="nowhere.tif.*does not exist"):
        emcfg.build({"datasets": {"a": {"path": str(tmp_path / "nowhere.tif")}}})


def test_glob_makes_datasets_named_after_files(tmp_path):
    for name in ("run 1.tif", "run2.mrc"):
        (tmp_path / name).touch()
    cfg = emcfg.build({"datasets_glob": [{"pattern": str(tmp_path / "*"), "kind": "movie", "pixel_size": 0.5}]})
    assert sorted(cfg.datasets) == ["run2", "run_1"]
    assert cfg.datasets["run2"].pixel_size == 0.5


def test_glob_name_collision_is_an_error(tmp_path):
    (tmp_path / "a.tif").touch()
    (tmp_path / "a.mrc").touch()
    with pytest.raises(InputError, match="collides"):
        emcfg.build({"datasets_glob": [{"pattern": str(tmp_path / "a.*")}]})


def test_empty_glob_and_no_datasets_are_errors(tmp_path):
    with pytest.raises(InputError, match="matches no file"):
        emcfg.build({"datasets_glob": [{"pattern": str(tmp_path / "*.tif")}]})
    with pytest.raises(InputError, match="no datasets"):
        emcfg.build({})


def test_demo_paths_need_not_exist_yet():
    cfg = {"demo": {"d": {"format": "mrc"}},
           "datasets": {"d": {"path": "resources/demo/d.mrc", "ground_truth": "resources/demo/d_truth.mrc"}}}
    built = emcfg.build(cfg)
    assert built.demo["d"].format == "mrc" and np.isclose(built.demo["d"].dose, 1.0)


def test_run_tag_puts_results_in_their_own_folder(tmp_path):
    (tmp_path / "a.tif").touch()
    base = {"results": "out", "datasets": {"a": {"path": str(tmp_path / "a.tif")}}}
    assert emcfg.build(base).results == "out"
    tagged = {**base, "run": "v0.2-reprocess"}
    emcfg.validate(tagged)
    assert emcfg.build(tagged).results == "out/v0.2-reprocess"
    with pytest.raises(InputError, match="run"):
        emcfg.validate({**base, "run": "../escape"})


def test_the_schema_file_is_generated_from_the_typed_settings():
    """One source of truth: every setting's type, constraints and default are written in
    emdenoise.config; the schema the workflow validates with is generated from them
    (`python -m emdenoise.config`) and must be up to date."""
    import yaml

    assert yaml.safe_load(emcfg.SCHEMA.read_text()) == emcfg.json_schema(), \
        "run `python -m emdenoise.config` to regenerate the schema"
    # every typed default validates against the generated schema, for every stage
    defaults = {stage: emcfg.plain(cls()) for stage, cls in emcfg.STAGES.items() if cls is not dict}
    emcfg.validate({"defaults": defaults, "datasets": {"x": {"path": "p", **defaults}}})
    # and a constraint written next to a default is enforced
    with pytest.raises(InputError, match="drift.upsample"):
        emcfg.validate({"defaults": {"drift": {"upsample": 5}}})


def test_gpu_jobs_follow_the_device_and_the_prefilter_method(tmp_path):
    (tmp_path / "a.tif").touch()
    def ds(**entry):
        return emcfg.build({"datasets": {"a": {"path": str(tmp_path / "a.tif"), **entry}}}).datasets["a"]
    auto = ds()
    assert [auto.gpu_jobs(s) for s in ("train", "infer", "prefilter")] == [1, 1, 1]  # WCID prefilter trains
    cpu = ds(train={"device": "cpu"}, infer={"device": "cuda:1"}, prefilter={"method": "gaussian2d"})
    assert [cpu.gpu_jobs(s) for s in ("train", "infer", "prefilter")] == [0, 1, 0]


def test_train_on_groups_datasets_and_refuses_what_cannot_be_shared():
    """`model.train_on`: patterns resolve to the sorted datasets one model trains on; a
    pattern that names nothing, train_on with a given checkpoint, and datasets that share a
    model but differ in a setting its training reads are one clear error each."""
    from emdenoise.config import build, group_key

    def cfg(**extra):
        base = {"datasets": {n: {"path": n} for n in ("run_1", "run_2", "other")},
                "defaults": {"model": {"train_on": ["run_*"]}}}
        for k, v in extra.items():
            base["datasets"][k].update(v)
        return base

    groups = build(cfg(), check_paths=False).train_groups
    assert groups == {d: ("run_1", "run_2") for d in ("run_1", "run_2", "other")}  # 'other' is only applied to
    assert group_key(("run_2", "run_1")) == "run_1+run_2"
    long = group_key([f"dataset_number_{i:03d}" for i in range(20)])
    assert long.startswith("dataset_number_000+19more-") and len(long) < 64
    with pytest.raises(InputError, match="'nothing_\\*' names no dataset"):
        build(cfg(other={"model": {"train_on": ["nothing_*"]}}), check_paths=False)
    with pytest.raises(InputError, match="train_on and checkpoint exclude each other"):
        build(cfg(other={"model": {"train_on": ["run_*"], "checkpoint": "m.pt"}}), check_paths=False)
    with pytest.raises(InputError, match="share one wcvd model .* differ in train.lr"):
        build(cfg(run_2={"train": {"lr": 0.01}}), check_paths=False)
    # a setting only one candidate reads: SHINE's size does not concern the shared WCVD ...
    cfg_shine = cfg(run_2={"shine": {"channels": 8}})
    for ds in cfg_shine["datasets"].values():
        ds.setdefault("model", {})["name"] = "wcvd"
    assert build(cfg_shine, check_paths=False).train_groups["run_2"] == ("run_1", "run_2")
