"""Live denoising: frames written by the microscope into a folder, denoised as they arrive.

``emdenoise watch IN_DIR OUT_DIR --load-model model.pt`` polls IN_DIR for single-frame
files (TIFF, MRC, DM4, in natural name order), takes a file once it is completely written
(its size unchanged over two polls and it reads), and writes the denoised frame to
OUT_DIR under the same stem as a float32 TIFF (atomically).  Output frame t needs the
model's temporal window t - h .. t + h, so it is written when frame t + h has arrived;
the first frames use windows mirrored about their centre frame (as in batch inference),
and when watching stops (Ctrl-C or ``idle`` seconds without a new frame) the last h frames
are written with windows mirrored at the end.  Every frame therefore gets exactly one
output, equal to what ``infer.denoise`` gives for the whole movie.  Frames that arrive
faster than the model keeps up are queued, never dropped; the lag (arrival -> output
written) is logged.  A preview PNG (latest raw vs denoised frame) is rewritten every
``preview_every`` frames.  The model's post-processing (WCVD's low-pass) needs the whole
movie to be scored and is not applied here.

Train first on the first N frames of an experiment with
``emdenoise denoise first_N.tif out.tif --model wcvd --save-model m.pt`` (or on an earlier
movie of the same detector and dose), then watch with ``--load-model m.pt``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from . import infer, io
from .checkpoint import load_checkpoint
from .errors import InputError
from .tiling import check_frame_count, window_index

__all__ = ["watch", "WATCH_EXTENSIONS"]

WATCH_EXTENSIONS = (".tif", ".tiff", ".mrc", ".dm4", ".dm3", ".npy")
_log = logging.getLogger("emdenoise")


def _candidates(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and ".tmp" not in p.name and p.suffix.lower() in WATCH_EXTENSIONS]
    return sorted(files, key=io._natural_key)


def _read_frame(path: Path) -> np.ndarray | None:
    """The (Y, X) float32 frame of a single-frame file, or None while it is not readable."""
    try:
        arr, _ = io.read_stack(path)
        data = np.asarray(arr[:], dtype=np.float32)
    except Exception:  # noqa: BLE001 -- a file still being written does not read yet
        return None
    return data[0] if data.ndim == 3 and data.shape[0] == 1 else (data if data.ndim == 2 else None)


def _preview(path: Path, raw: np.ndarray, den: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = np.percentile(den, [1, 99])
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    for a, img, title in zip(ax, (raw, den), ("raw", "denoised")):
        a.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        a.set_title(title)
        a.axis("off")
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)


def watch(in_dir, out_dir, checkpoint, *, device: str = "cpu", poll: float = 0.5, idle: float | None = 30.0,
          preview_every: int = 10, stop=None) -> dict:
    """Denoise frames as they appear in ``in_dir``; returns statistics.

    in_dir / out_dir: folders (out_dir is created); checkpoint: a trained model (.pt),
    refused if it is not blind.  poll: seconds between looks at the folder.  idle: stop
    after this many seconds without a new frame (None: until Ctrl-C or ``stop``).
    stop: optional ``threading.Event`` that ends watching (the remaining frames are
    still written).  Returns {'frames', 'seconds', 'frames_per_s', 'lag_mean_s',
    'lag_max_s', 'outputs' (paths in frame order)}.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise InputError(in_dir, "is not a folder to watch")
    out_dir.mkdir(parents=True, exist_ok=True)
    model, ckpt = load_checkpoint(checkpoint, device=device)
    h = model.params.halo_t
    frames: list = []                        # frames received, in order; those no window reads
    names: list[Path] = []                   # any more are replaced by None (bounded memory)
    arrived: list[float] = []
    sizes: dict[Path, int] = {}
    seen: set[Path] = set()
    shape = None
    done, lags, outputs = 0, [], []
    t0 = last_new = time.perf_counter()

    def emit(t: int, n: int) -> None:
        w = window_index(t, t + 1, n, h)
        lo, hi = int(w.min()), int(w.max()) + 1
        block = np.stack([frames[i] for i in range(lo, hi)])
        out = infer.predict_windows(model, block, w - lo, normalisation=ckpt, device=device)[0]
        path = out_dir / f"{names[t].stem}.tif"
        io.write_tiff(path, out[None], metadata={"source": str(names[t]), "method": ckpt.get("model", "wcvd")})
        outputs.append(path)
        lags.append(time.perf_counter() - arrived[t])
        if preview_every and (t + 1) % preview_every == 0:
            _preview(out_dir / "preview.png", frames[t], out)
        _log.info("watch: frame %d (%s) written, lag %.2f s, %d queued", t, names[t].name, lags[-1],
                  len(frames) - 1 - t - h)

    try:
        while True:
            new = False
            pending = [p for p in _candidates(in_dir) if p not in seen]
            previous = dict(sizes)
            for p in pending:
                sizes[p] = p.stat().st_size
            for p in pending:
                if previous.get(p) != sizes[p] or sizes[p] == 0:  # still growing, or first seen
                    break                              # keep the order: wait for this file first
                frame = _read_frame(p)
                if frame is None:
                    break
                if shape is None:
                    shape = frame.shape
                if frame.shape != shape:
                    raise InputError(p, f"frame of {frame.shape} px, the movie's are {shape}")
                frames.append(frame)
                names.append(p)
                seen.add(p)
                arrived.append(time.perf_counter())
                new = True
            while done + h < len(frames):          # window complete: t + h has arrived
                emit(done, len(frames))
                done += 1
                if done - h - 1 >= 0:              # no later window reads that frame
                    frames[done - h - 1] = None
            now = time.perf_counter()
            if new:
                last_new = now
            if (stop is not None and stop.is_set()) or (idle is not None and now - last_new > idle):
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        _log.info("watch: interrupted, writing the last frames")
    n = len(frames)
    if n:
        check_frame_count(n, h, in_dir)
    while done < n:                                # the end of the movie: mirrored windows
        emit(done, n)
        done += 1
    sec = time.perf_counter() - t0
    return {"frames": n, "seconds": sec, "frames_per_s": n / sec if sec > 0 else float("nan"),
            "lag_mean_s": float(np.mean(lags)) if lags else float("nan"),
            "lag_max_s": float(np.max(lags)) if lags else float("nan"), "outputs": [str(p) for p in outputs]}

