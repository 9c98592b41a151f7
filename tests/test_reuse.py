"""Models that outlive one run: apply a trained checkpoint without training (CLI and
workflow), with a clear warning when it does not fit the data."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emdenoise import cli, io
from emdenoise.metrics import psnr

EXE = Path(sys.executable).with_name("emdenoise")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A WCVD trained through the CLI on one synthetic movie, and a second movie of the
    same kind (same detector, other seed) with its truth."""
    tmp = tmp_path_factory.mktemp("reuse")
    a, b, truth, model = tmp / "a.tif", tmp / "b.tif", tmp / "b_truth.tif", tmp / "m.pt"
    for path, seed in ((a, 1), (b, 2)):
        assert cli.main(["simulate", str(path), "--frames", "10", "--size", "64", "--dose", "2", "--seed", str(seed),
                         "--pixel-size", "0.5"] + (["--truth", str(truth)] if path == b else [])) == 0
    cfg = tmp / "cfg.yaml"
    cfg.write_text("train: {crop: 32, val_crop: 32}\nprefilter: {method: gaussian2d}\n")
    assert cli.main(["denoise", str(a), str(tmp / "a_out.tif"), "--model", "wcvd", "--epochs", "20", "--device",
                     "cpu", "--config", str(cfg), "--save-model", str(model)]) == 0
    return tmp, b, truth, model, cfg


def test_load_model_applies_without_training(trained, capsys, monkeypatch):
    tmp, b, truth, model, cfg = trained
    from emdenoise import train

    def no_training(*a, **kw):
        raise AssertionError("--load-model must not train")

    monkeypatch.setattr(train, "train_model", no_training)  # pipeline imports it when it trains
    capsys.readouterr()
    out = tmp / "b_out.tif"
    assert cli.main(["denoise", str(b), str(out), "--load-model", str(model), "--device", "cpu",
                     "--config", str(cfg)]) == 0
    said = capsys.readouterr()
    assert "no training" in said.out and "may not fit" not in said.err
    den, clean, noisy = (np.asarray(io.read_stack(p)[0][:], dtype=np.float32) for p in (out, truth, b))
    assert den.shape == noisy.shape and psnr(den, clean) > psnr(noisy, clean) + 8


def test_a_misfit_is_named_and_a_non_blind_model_refused(trained, tmp_path):
    tmp, b, truth, model, cfg = trained
    # another pixel size and ten times the dose: both named, the result still written
    other = tmp_path / "other.tif"
    assert cli.main(["simulate", str(other), "--frames", "10", "--size", "64", "--dose", "20", "--pixel-size", "1.0"]) == 0
    proc = subprocess.run([str(EXE), "denoise", str(other), str(tmp_path / "o.tif"), "--load-model", str(model),
                           "--device", "cpu", "--config", str(cfg)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pixel size 1 Å differs" in proc.stderr and "intensities" in proc.stderr
    # a checkpoint whose blind kernel has a non-zero centre is refused before anything runs
    import torch

    ckpt = torch.load(model, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("bck.weight"))
    ckpt["state_dict"][key].view(-1)[ckpt["state_dict"][key][0].numel() // 2] = 0.3
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    proc = subprocess.run([str(EXE), "denoise", str(b), str(tmp_path / "x.tif"), "--load-model", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "centre weight" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.tif").exists()


def test_workflow_applies_a_configured_checkpoint_without_a_train_job(trained, tmp_path):
    from test_workflow import snakemake

    tmp, b, truth, model, _ = trained
    config = {"results": "results", "datasets": {"b": {
        "path": str(b), "ground_truth": str(truth), "model": {"checkpoint": str(model)},
        "prefilter": {"method": "gaussian2d"}}}}
    dry = snakemake(tmp_path, "-n", "--quiet", "rules", config=config)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "train" not in dry.stdout.split() and "infer" in dry.stdout.split() and "classical" not in dry.stdout
    run = snakemake(tmp_path, config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    import pandas as pd

    choice = json.loads((tmp_path / "results" / "b" / "model_choice.json").read_text())
    assert choice["chosen"] == "pretrained" and Path(choice["checkpoint"]).resolve() == model.resolve()
    rows = pd.read_csv(tmp_path / "results" / "b" / "metrics.csv").set_index("method")
    assert rows.loc["pretrained", "psnr_db"] > rows.loc["raw", "psnr_db"] + 8
    assert not (tmp_path / "results" / "b" / "pretrained" / "model.pt").exists()


def test_workflow_trains_one_model_for_several_datasets(trained, tmp_path):
    """`model.train_on`: one WCVD trained once on two movies (one `train_shared` job, no
    per-dataset `train`), applied to both, each with its own normalisation; a third movie
    that is only applied to (train on some, denoise the rest) gets the same model."""
    import json

    import pandas as pd
    import torch
    from test_workflow import snakemake

    tmp, b, truth, _, _ = trained
    a = tmp / "a.tif"
    c, c_truth = tmp_path / "c.tif", tmp_path / "c_truth.tif"
    assert cli.main(["simulate", str(c), "--frames", "8", "--size", "64", "--dose", "2", "--seed", "3",
                     "--truth", str(c_truth)]) == 0
    shared = {"name": "wcvd", "train_on": ["a", "b*"]}
    config = {"results": "results",
              "defaults": {"prefilter": {"method": "gaussian2d"}, "model": shared,
                           "train": {"epochs": 20, "crop": 32, "val_crop": 32, "device": "cpu"}},
              "datasets": {"a": {"path": str(a)}, "b": {"path": str(b), "ground_truth": str(truth)},
                           "c": {"path": str(c), "ground_truth": str(c_truth)}}}
    dry = snakemake(tmp_path, "-n", "--quiet", "rules", config=config)
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = dry.stdout.split()
    assert "train_shared" in jobs and "train" not in jobs
    run = snakemake(tmp_path, config=config)
    assert run.returncode == 0, run.stderr[-3000:]
    res = tmp_path / "results"
    model = res / "_shared" / "a+b" / "wcvd" / "model.pt"
    ckpt = torch.load(model, weights_only=True)
    assert ckpt["train_on"] == ["a", "b"] and ckpt["normalise"] == "per_dataset"
    assert (res / "_shared" / "a+b" / "wcvd" / "train_log.csv").exists()
    assert not any((res / d / "wcvd" / "model.pt").exists() for d in "abc")
    for d in "bc":
        choice = json.loads((res / d / "model_choice.json").read_text())
        assert (tmp_path / choice["checkpoint"]).resolve() == model.resolve()  # relative to the workdir
        rows = pd.read_csv(res / d / "metrics.csv").set_index("method")
        assert rows.loc["wcvd", "psnr_db"] > rows.loc["raw", "psnr_db"] + 8
        assert "normalised with this dataset's statistics" in (res / "logs" / d / "infer_wcvd.log").read_text()
    # the datasets of one shared model must agree on what trains it
    config["datasets"]["c"]["train"] = {"epochs": 5}
    bad = snakemake(tmp_path, "-n", config=config)
    said = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "share one wcvd model (model.train_on) but differ in train.epochs" in said, said[-2000:]
    assert "Traceback" not in said
