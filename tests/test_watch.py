"""Live denoising (emdenoise watch): a writer thread fills a folder frame by frame at a
fixed rate; every input frame gets exactly one output, equal to batch inference."""
import threading
import time

import numpy as np
import pytest
import tifffile
import torch

from emdenoise import cli, io, watch
from emdenoise.config import TrainParams, WCVDParams
from emdenoise.infer import denoise
from emdenoise.synthetic import simulate_movie
from emdenoise.train import model_from_checkpoint, save_checkpoint, train_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    movie = simulate_movie(10, (48, 48), mode="counting", dose=2.0, max_drift=0.0, seed=3)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    save_checkpoint(train_model(movie.noisy, WCVDParams(kt=5, ks=(3, 5)),
                                TrainParams(epochs=3, crop=32, val_crop=32, device="cpu")), path)
    return path


def _writer(folder, frames, rate, done):
    """Write each frame at `rate` frames/s, the bytes in two halves (a file being written)."""
    for i, frame in enumerate(frames):
        path = folder / f"frame_{i}.tif"
        tifffile.imwrite(path, frame)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # half-written for a moment
        time.sleep(0.02)
        path.write_bytes(data)
        time.sleep(1.0 / rate)
    done.set()


def test_every_frame_gets_one_output_equal_to_batch_inference(tmp_path, model_file):
    frames = simulate_movie(11, (48, 48), mode="counting", dose=2.0, max_drift=0.0, seed=9).noisy.astype(np.float32)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    done = threading.Event()
    writer = threading.Thread(target=_writer, args=(src, frames, 10.0, done))
    writer.start()
    stats = watch.watch(src, out, model_file, poll=0.05, idle=1.0)
    writer.join()
    assert stats["frames"] == 11 and len(stats["outputs"]) == 11
    written = sorted(out.glob("frame_*.tif"), key=io._natural_key)
    assert [p.stem for p in written] == [f"frame_{i}" for i in range(11)]
    live = np.stack([tifffile.imread(p) for p in written])
    ckpt = torch.load(model_file, weights_only=True)
    model = model_from_checkpoint(ckpt)
    batch = denoise(model, ckpt, frames, device="cpu")
    np.testing.assert_allclose(live, batch, rtol=1e-5, atol=1e-5 * float(np.abs(batch).max()))
    assert (out / "preview.png").exists() and stats["lag_max_s"] < 30
    assert not list(out.glob("*.tmp*"))


def test_cli_watch_stops_when_idle_and_refuses_a_missing_folder(tmp_path, model_file, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i, f in enumerate(simulate_movie(6, (48, 48), mode="counting", seed=1).noisy.astype(np.float32)):
        tifffile.imwrite(src / f"f{i}.tif", f)
    assert cli.main(["watch", str(src), str(tmp_path / "out"), "--load-model", str(model_file), "--idle", "0.5",
                     "--poll", "0.05", "--device", "cpu"]) == 0
    assert "watch: 6 frames" in capsys.readouterr().out and len(list((tmp_path / "out").glob("f*.tif"))) == 6
    with pytest.raises(SystemExit):
        cli.main(["watch", str(tmp_path / "nope"), str(tmp_path / "o"), "--load-model", str(model_file)])
