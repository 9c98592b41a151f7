"""The CUDA-only code paths, on a CPU-only machine (no GPU here or in CI), with torch.cuda mocked.

- AMP: ``train._amp_context`` (fp16 + GradScaler, bf16 without) and the training loop's
  GradScaler branch (scale -> backward -> step -> update);
- GPU memory probing: ``chunked.available_memory`` / ``auto_tile`` on CUDA
  (``torch.cuda.mem_get_info``, half of the free memory at 256 B/px);
- multi-GPU: ``_Shared.device`` hands threads GPUs round-robin, ``cached_model`` keeps
  one deep copy of a model object per CUDA device;
- ``torch.cuda.empty_cache`` after an out-of-memory error on a CUDA device in
  ``chunked._run_tile``.

Each test fails if the code path it covers is removed (none is skipped).
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import pytest
import torch

import emdenoise.train as train
from emdenoise import chunked
from emdenoise.config import TrainParams, WCVDParams


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda says it is there (``resolve_device('cuda')`` then accepts it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(chunked, "_model_cache", {})
    return monkeypatch


def _quiet(fn, *args, **kwargs):
    """torch warns that CUDA autocast / GradScaler are disabled without a GPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------------------
# AMP
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16,dtype,scaled", [(False, torch.float16, True), (True, torch.bfloat16, False)],
                         ids=["fp16", "bf16"])
def test_amp_context_on_cuda(monkeypatch, bf16, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    ctx, scaler = _quiet(train._amp_context, torch.device("cuda"), True)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    if scaled:  # fp16 needs loss scaling against gradient underflow
        assert isinstance(scaler, torch.amp.GradScaler)
    else:       # bf16 has fp32's exponent range: no scaler
        assert scaler is None


@pytest.mark.parametrize("device,enabled", [("cuda", False), ("cpu", True)])
def test_amp_context_off_without_cuda_or_amp(monkeypatch, device, enabled):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    ctx, scaler = train._amp_context(torch.device(device), enabled)
    assert isinstance(ctx, contextlib.nullcontext) and scaler is None


class _RecordingScaler(torch.amp.GradScaler):
    """A real GradScaler (disabled without CUDA: scale is the identity, step calls
    optimizer.step) that records the calls the training loop makes."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        _RecordingScaler.instances.append(self)

    def scale(self, outputs):
        self.calls.append("scale")
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        self.calls.append("step")
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.calls.append("update")
        return super().update(new_scale)


def test_training_loop_goes_through_the_grad_scaler(monkeypatch):
    """The loop on CPU tensors with the AMP context of an fp16 CUDA device (the device
    itself stays the CPU: tensors cannot move to a GPU that is not there)."""
    stack = np.random.default_rng(0).poisson(2.0, (8, 32, 32)).astype(np.float32)
    tp = TrainParams(epochs=2, crop=16, val_crop=16, batch_size=4, device="cpu", seed=0, amp=True)
    plain = train.train_model(stack, WCVDParams(), tp)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.amp, "GradScaler", _RecordingScaler)
    monkeypatch.setattr(_RecordingScaler, "instances", [])
    real_amp_context = train._amp_context
    devices = []

    def amp_context_as_on_cuda(device, enabled):
        devices.append(device)
        return _quiet(real_amp_context, torch.device("cuda"), enabled)
    monkeypatch.setattr(train, "_amp_context", amp_context_as_on_cuda)
    contexts = []
    real_loss = train._loss
    monkeypatch.setattr(train, "_loss", lambda m, x, t, p, ctx: (contexts.append(ctx), real_loss(m, x, t, p, ctx))[1])
    scaled = _quiet(train.train_model, stack, WCVDParams(), tp)

    assert devices == [torch.device("cpu")]
    (scaler,) = _RecordingScaler.instances
    steps = scaled["steps_per_epoch"] * tp.epochs
    assert steps > 0 and scaler.calls == ["scale", "step", "update"] * steps
    assert len(contexts) == steps and all(isinstance(c, torch.autocast) for c in contexts)
    # a disabled scaler is the identity: the scaled path trains exactly what the plain one does
    assert all(torch.equal(plain["state_dict"][k], scaled["state_dict"][k]) for k in plain["state_dict"])


# --------------------------------------------------------------------------------------
# GPU memory probing
# --------------------------------------------------------------------------------------
def test_available_memory_probes_the_gpu(fake_cuda):
    asked = []
    fake_cuda.setattr(torch.cuda, "mem_get_info",
                      lambda device=None: (asked.append(device), (3 * 2**30, 80 * 2**30))[1])
    assert chunked.available_memory("cuda") == 3 * 2**30
    assert asked == [torch.device("cuda")]
    assert chunked.available_memory("cpu") != 3 * 2**30 and len(asked) == 1  # the CPU asks the host


def test_auto_tile_on_cuda_uses_half_the_free_gpu_memory(fake_cuda):
    y = x = 512
    free = 2 * chunked.GPU_BYTES_PER_PX * 3 * y * x  # half of it holds exactly 3 frames
    fake_cuda.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    assert chunked.auto_tile((20, y, x), WCVDParams(), device="cuda") == (3, y, x)
    # the same bytes on the CPU (a quarter, 24 B/px) give a different tile: the GPU branch decided
    assert chunked.auto_tile((20, y, x), WCVDParams(), device="cpu", memory=free) != (3, y, x)
    # too little GPU memory for 2 whole frames: 8-frame spatial tiles, multiples of 16 px
    fake_cuda.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 256 * 8 * 100 * 100, 80 * 2**30))
    nt, ty, tx = chunked.auto_tile((20, y, x), WCVDParams(), device="cuda")
    assert nt == chunked.TILE_FRAMES and ty == tx and ty % 16 == 0 and 96 <= ty <= 112


# --------------------------------------------------------------------------------------
# multi-GPU: round-robin devices, one model copy per device
# --------------------------------------------------------------------------------------
def _device_in_new_thread(shared, device, calls=2):
    got = []
    th = threading.Thread(target=lambda: got.extend(shared.device(device) for _ in range(calls)))
    th.start()
    th.join()
    assert len(set(got)) == 1  # a thread keeps its GPU
    return got[0]


def test_threads_take_gpus_round_robin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    shared = chunked._Shared(max_px=1, total_blocks=1, total_px=1, progress_s=None)
    assert [_device_in_new_thread(shared, "cuda") for _ in range(5)] == ["cuda:0", "cuda:1"] * 2 + ["cuda:0"]
    assert _device_in_new_thread(shared, "cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: plain 'cuda'
    assert _device_in_new_thread(chunked._Shared(1, 1, 1, None), "cuda") == "cuda"


class _StubModel(torch.nn.Module):
    """``.to`` records the device instead of moving (there is no GPU to move to)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.moved_to = None

    def to(self, device, *args, **kwargs):
        self.moved_to = device
        return self


def test_cached_model_one_deep_copy_per_gpu(fake_cuda):
    copies = []
    real_deepcopy = chunked._copy.deepcopy
    fake_cuda.setattr(chunked._copy, "deepcopy", lambda obj, *a: (copies.append(obj), real_deepcopy(obj, *a))[1])
    model = _StubModel()
    a0, ck = chunked.cached_model(model, "cuda:0")
    a1, _ = chunked.cached_model(model, "cuda:1")
    assert ck is None
    assert chunked.cached_model(model, "cuda:0")[0] is a0 and chunked.cached_model(model, "cuda:1")[0] is a1
    assert copies == [model, model]  # one deep copy per device, not per call
    assert a0 is not model and a1 is not model and a0 is not a1
    assert (a0.moved_to, a1.moved_to, model.moved_to) == (torch.device("cuda:0"), torch.device("cuda:1"), None)
    assert not a0.training  # copies are put in eval mode
    assert chunked.cached_model(model, "cpu")[0] is model and len(copies) == 2  # the CPU uses the object


# --------------------------------------------------------------------------------------
# out of memory on a CUDA device: cache emptied, tile halved, retried
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,emptied", [("cuda", 1), ("cpu", 0)])
def test_oom_on_cuda_empties_the_cache_and_halves_the_tile(fake_cuda, device, emptied):
    fake_cuda.setattr(torch.cuda, "device_count", lambda: 1)
    empty = []
    fake_cuda.setattr(torch.cuda, "empty_cache", lambda: empty.append(True))
    done = []

    def predict_box(job, model, ckpt, dev, src, dst, core):
        if not done and core == (0, 4, 0, 32, 0, 32):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        done.append((dev, core))
    fake_cuda.setattr(chunked, "_predict_box", predict_box)
    fake_cuda.setattr(chunked, "_store_cache", {("src", "r"): object(), ("dst", "r+"): object()})
    run = "test-oom-" + device
    fake_cuda.setitem(chunked._shared_state, run, chunked._Shared(4 * 32 * 32, 1, 4 * 32 * 32, None))
    job = chunked._TileJob(src="src", dst="dst", shape=(4, 32, 32), halo_t=1, halo_s=3, device=device,
                           batch_frames=8, threads=1)
    assert chunked._run_tile(job, _StubModel(), None, (0, 4, 0, 32, 0, 32), run) == 4 * 32 * 32
    assert len(empty) == emptied
    assert sorted(c for _, c in done) == [(0, 2, 0, 32, 0, 32), (2, 4, 0, 32, 0, 32)]  # halved in time
    assert {d for d, _ in done} == {device}
    assert chunked._shared_state[run].oom == 1 and chunked._shared_state[run].max_px == 2 * 32 * 32
