"""Config edits re-run exactly the stages they affect (Snakemake's params trigger).

One real run of two small datasets, then dry runs with one setting edited: the jobs
scheduled must be the edited stage and everything downstream of it, and nothing else.
Rules pass plain per-stage params (``stage(...)`` in workflow/rules/common.smk), the only
kind Snakemake records; a dataclass param would be dropped and every edit would give
"Nothing to be done".
"""
from __future__ import annotations
import dataclasses

import copy
import json
import re
from pathlib import Path

import pytest

import emdenoise.config as emcfg
from emdenoise.provenance import _jsonable
from test_workflow import snakemake, tiny_config

DS, OTHER = "own_tif", "own_mrc"  # OTHER is baselines only (model: none)

#: Stages of one WCVD dataset, each with the stages it feeds (report: all datasets).
DOWNSTREAM = {
    "ingest": {"prefilter", "drift", "provenance"},
    "prefilter": {"drift"},
    "drift": {"noise", "baselines", "train", "infer", "select", "metrics", "provenance", "report"},
    "noise": {"train", "provenance", "report"},
    "baselines": {"metrics"},
    "train": {"infer", "select", "report"},  # report: the training curves
    "infer": {"lowpass"},
    "lowpass": {"select", "metrics"},
    "select": {"export", "provenance", "report"},
    "export": {"provenance"},
    "metrics": {"provenance", "report"},
    "provenance": set(),
    "report": set(),
}
ALL_STAGES = set(DOWNSTREAM)


def downstream(*stages: str) -> set[str]:
    """``stages`` and every stage that reads their outputs, directly or not."""
    out, todo = set(), list(stages)
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo.extend(DOWNSTREAM[s])
    return out


def base_config(tmp_path: Path) -> dict:
    """tiny_config's user TIFF (WCVD) and MRC (baselines only); fast settings."""
    config = tiny_config(tmp_path)
    config.pop("demo")
    config["datasets"] = {
        DS: {**config["datasets"]["own_tif"], "frames": [0, 6]},
        OTHER: {**config["datasets"]["own_mrc"], "model": {"name": "none"}},
    }
    config["defaults"] = {"model": {"name": "wcvd"}, "prefilter": {"method": "gaussian2d"},
                          "train": {"epochs": 2, "crop": 32, "val_crop": 32}}
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict]:
    """A workdir after one complete run of base_config."""
    tmp = tmp_path_factory.mktemp("rerun")
    config = base_config(tmp)
    proc = snakemake(tmp, config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, config


_JOB = re.compile(r"^(?:local)?rule (\w+):$")
_DS = re.compile(r"\bds=([\w.-]+)")


def scheduled(workdir: Path, config: dict) -> dict[str | None, set[str]]:
    """Rules a dry run with ``config`` schedules, by dataset (None: report, all datasets)."""
    proc = snakemake(workdir, "--dry-run", config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs: list[list] = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := _JOB.match(line.strip()):
            jobs.append([m.group(1), None])
        elif jobs and line.strip().startswith("wildcards:") and (m := _DS.search(line)):
            jobs[-1][1] = m.group(1)
    total = re.search(r"^total\s+(\d+)$", proc.stdout, re.M)
    assert len(jobs) == (int(total.group(1)) if total else 0), proc.stdout  # the parser saw every job
    out: dict[str | None, set[str]] = {}
    for rule, ds in jobs:
        if rule != "all":
            out.setdefault(ds, set()).add(rule)
    return out


def edited(config: dict, *path, value, ds: str | None = DS) -> dict:
    """A copy of ``config`` with datasets.<ds>.<path> (or defaults.<path>) set to ``value``."""
    config = copy.deepcopy(config)
    node = config["datasets"][ds] if ds else config["defaults"]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return config


def test_unedited_config_schedules_nothing(workdir):
    tmp, config = workdir
    assert scheduled(tmp, config) == {}


@pytest.mark.parametrize("path, value, stages", [
    (("baselines", "gaussian2d_sigma"), 1.5, downstream("baselines")),
    (("drift", "upsample"), 10, downstream("drift")),
    (("train", "epochs"), 3, downstream("train")),
    (("lowpass", "diameter"), 0.5, downstream("lowpass")),
    (("pixel_size",), 0.75, ALL_STAGES),
    (("frames",), [0, 5], ALL_STAGES),
    (("prefilter", "sigma"), 2.0, downstream("prefilter")),
    (("prefilter", "epochs"), 7, {"provenance"}),  # WCID's epochs: unused by gaussian2d
    (("noise", "threshold"), 0.2, downstream("noise")),
    (("model", "ks"), [3, 5], downstream("train", "lowpass")),
    (("metrics", "peak"), 5.0, downstream("metrics")),
    (("infer", "batch_frames"), 4, downstream("infer")),
    # unrelated to a WCVD dataset: only its provenance.json, which records the whole entry
    (("shine", "blocks"), 3, {"provenance"}),
    (("model", "max_reach"), 5, {"provenance"}),  # read by the classical and wcvd_ctx jobs only
    (("shine_train", "batch_size"), 2, {"provenance"}),
])
def test_an_edit_reruns_its_stage_and_what_follows(workdir, path, value, stages):
    tmp, config = workdir
    jobs = scheduled(tmp, edited(config, *path, value=value))
    assert jobs.get(DS, set()) == stages - {"report"}, jobs
    assert ("report" in stages) == ("report" in jobs.get(None, set())), jobs
    assert OTHER not in jobs, jobs  # the other dataset's settings are as they were


def test_a_default_edit_reruns_every_dataset_it_reaches(workdir):
    """defaults.baselines reaches both datasets; defaults.train only the one with a model
    (the baselines-only dataset re-records its provenance, nothing else)."""
    tmp, config = workdir
    jobs = scheduled(tmp, edited(config, "baselines", "gaussian3d_sigma", value=[1.0, 2.0, 2.0], ds=None))
    assert jobs == {DS: downstream("baselines") - {"report"}, OTHER: {"baselines", "metrics", "provenance"},
                    None: {"report"}}
    jobs = scheduled(tmp, edited(config, "train", "lr", value=0.01, ds=None))
    assert jobs == {DS: downstream("train") - {"report"}, OTHER: {"provenance"}, None: {"report"}}


def test_another_datasets_edit_schedules_nothing_for_this_one(workdir):
    tmp, config = workdir
    jobs = scheduled(tmp, edited(config, "drift", "upsample", value=10, ds=OTHER))
    assert DS not in jobs, jobs
    assert jobs[OTHER] == {"drift", "noise", "baselines", "metrics", "provenance"}


# --------------------------------------------------------------------------------------
# the params a rule passes and the view its script reads (no Snakemake)
# --------------------------------------------------------------------------------------


def _dataset(**entry) -> emcfg.DatasetConfig:
    return emcfg.build({"datasets": {"d": {"path": "d.tif", **entry}}}, check_paths=False).datasets["d"]


def test_stage_params_are_plain_and_read_back_typed():
    ds = _dataset(frames=[0, 9], model={"name": "auto"})
    params = emcfg.stage_params(ds, *emcfg.DATASET_SECTIONS)
    assert json.loads(json.dumps(params)) == params == _jsonable(ds)  # what provenance recorded before
    cfg = emcfg.stage_config(params)
    assert isinstance(cfg.drift, emcfg.DriftConfig) and cfg.drift.upsample == 20
    assert cfg.frames == (0, 9) and cfg.baselines.gaussian3d_sigma == (1.0, 1.0, 1.0)
    assert cfg.candidates == ["wcvd", "wcvd_ctx", "shine"] and cfg.drift_enabled
    assert cfg.train_params("shine") == ds.train_params("shine")
    assert cfg.shine.params(3) == ds.shine.params(3) and cfg.model.wcvd_params() == ds.model.wcvd_params()
    assert cfg.to_dict() == params
    with pytest.raises(AttributeError, match="read-only"):
        cfg.name = "other"


def test_a_script_cannot_read_what_its_rule_did_not_pass():
    ds = _dataset()
    cfg = emcfg.stage_config(emcfg.stage_params(ds, "drift", "name", "model.ks"))
    with pytest.raises(AttributeError, match="'train' was not passed"):
        cfg.train
    with pytest.raises(AttributeError, match="'model.name' was not passed"):
        cfg.model.name
    with pytest.raises(AttributeError, match="drift_enabled.*kind"):
        cfg.drift_enabled
    with pytest.raises(AttributeError, match="model.name"):
        cfg.candidates
    assert cfg.model.ks == (3, 5, 7) and cfg.name == "d"


def test_single_settings_keep_the_helpers_exact():
    ds = _dataset(model={"kt": 5})
    wcid = emcfg.stage_config(emcfg.stage_params(ds, *(f"model.{f}" for f in emcfg.wcvd_arch(2))))
    assert wcid.model.wcvd_params(dims=2).ks == ds.model.wcvd_params(dims=2).ks  # WCID needs no kt
    with pytest.raises(AttributeError, match="'model.kt' was not passed"):
        wcid.model.wcvd_params(dims=3)  # no silent default architecture
    train = [f"train.{f.name}" for f in dataclasses.fields(emcfg.TrainParams) if f.name != "epochs"]
    part = emcfg.stage_config(emcfg.stage_params(ds, *train))
    assert part.train.replace(epochs=7) == emcfg.TrainParams(**{**emcfg.plain(ds.train), "epochs": 7})
    with pytest.raises(AttributeError, match="'train.epochs' was not passed"):
        part.train.replace()
    with pytest.raises(KeyError, match="unknown setting"):
        emcfg.stage_params(ds, "drift.upsampel")
