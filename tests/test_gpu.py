"""CUDA paths, run for real where a GPU is present (``pytest -m gpu``; bench/gpu_check.sh).

Without CUDA every test here is skipped with the reason; CI has no GPU, so these run on
the device machine only.  The mocked coverage of the same code paths, which always runs,
is in tests/test_cuda_mocked.py.
"""
import numpy as np
import pytest
import torch

import emdenoise.chunked as chunked
from emdenoise import io
from emdenoise.config import SHINEParams, TrainParams, WCVDParams
from emdenoise.infer import denoise
from emdenoise.train import model_from_checkpoint, train_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run bench/gpu_check.sh on a GPU)")]

SHINE_PAPER = SHINEParams(blindspot=3)


def _movie(t=8, n=128, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (t, n, n)).astype(np.float32)


@pytest.mark.parametrize("params", [WCVDParams(), SHINE_PAPER], ids=["wcvd", "shine-paper"])
def test_amp_training_on_cuda_is_finite_and_blind(params):
    stack = _movie()
    ckpt = train_model(stack, params, TrainParams(epochs=3, crop=32, val_crop=64, device="cuda", amp=True))
    assert ckpt["device"].startswith("cuda") and np.isfinite(ckpt["best_val_loss"])
    model = model_from_checkpoint(ckpt, device="cuda")
    out = denoise(model, ckpt, stack, device="cuda")
    ref = denoise(model_from_checkpoint(ckpt, device="cpu"), ckpt, stack, device="cpu")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))


def test_gpu_tile_sizing_follows_free_memory():
    free = torch.cuda.mem_get_info()[0]
    assert chunked.available_memory("cuda") == pytest.approx(free, rel=0.2)
    nt, ty, tx = chunked.auto_tile((200, 4096, 4096), SHINE_PAPER, device="cuda", workers=1)
    assert nt * ty * tx * chunked.GPU_BYTES_PER_PX <= free / 2 * 1.01


def test_oom_is_retried_with_a_forced_small_memory_limit(tmp_path):
    stack = _movie(t=6, n=512)
    io.write_zarr(tmp_path / "s.zarr", stack)
    model = model_from_checkpoint(train_model(stack[:, :128, :128], SHINE_PAPER, TrainParams(
        epochs=1, crop=32, val_crop=64, device="cuda")), device="cuda")
    ckpt = {"normalisation": {"offset": 0.0, "scale": 4.0}}
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.02)  # a few GB of an H100-class card
    try:
        stats = chunked.infer_zarr(model, ckpt, tmp_path / "s.zarr", tmp_path / "d.zarr", device="cuda",
                                   tile=(6, 512, 512), workers=1, progress=False, batch_frames=6)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    ref = denoise(model, ckpt, stack, device="cuda", batch_frames=1)
    out = io.read_zarr(tmp_path / "d.zarr")[0][:]
    assert stats["oom_retries"] >= 1
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_two_workers_share_the_gpu(tmp_path):
    stack = _movie(t=12, n=256)
    io.write_zarr(tmp_path / "s.zarr", stack)
    ckpt = {"normalisation": {"offset": 0.0, "scale": 4.0}}
    model = model_from_checkpoint(train_model(stack, WCVDParams(), TrainParams(epochs=1, crop=32, device="cuda")),
                                  device="cpu")
    stats = chunked.infer_zarr(model, ckpt, tmp_path / "s.zarr", tmp_path / "d.zarr", device="cuda",
                               tile=(3, 128, 128), workers=2, progress=False)
    assert stats["workers"] == 2 and stats["device"].startswith("cuda")
    ref = denoise(model, ckpt, stack, device="cpu")
    np.testing.assert_allclose(io.read_zarr(tmp_path / "d.zarr")[0][:], ref, rtol=1e-3,
                               atol=1e-3 * float(np.abs(ref).max()))
