"""Peak memory of the NumPy / SciPy workflow stages against the movie's size (issue 12).

For two sizes (default 50 x 2048² and 200 x 2048², float32: 0.84 and 3.4 GB) an aligned
movie (Poisson(2) counts) is written to a Zarr store frame by frame (never whole in RAM);
then each stage runs its real workflow script (``scripts/<stage>.py``, under a stand-in
for the ``snakemake`` object) in a fresh child process, whose peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

    ingest      the movie read as a raw Zarr movie, copied to raw.zarr by frame blocks
    prefilter   WCID trained on the movie (crops from Zarr above 512 MiB; 2 epochs here), applied
                by chunked inference, Zarr -> Zarr by tiles
    drift       drift measured on the pre-filtered stack frame by frame (leave-one-out running
                sum), the aligned movie written by frame blocks
    noise       noise-correlation heatmaps of up to 5 adjacent pairs, read frame by frame
    baselines   Gaussian 2D / 3D, Zarr -> Zarr by frame blocks
    classical   Gaussian 3D tuned without ground truth (78 sigma pairs), by spatial tiles
    train       WCVD, 2 epochs (crops from the Zarr store above 512 MiB; memory does not depend
                on the epochs)
    infer       that model applied by chunked inference (tiles sized from the free memory)
    infer_tilt  the same as a tilt series: overlapping tiles stitched, blocks of frames written
    select      one candidate: its output copied to denoised.zarr by blocks
    lowpass     WCVD's FFT low-pass with the diameter chosen by uMSE ('auto'), by frames
    export_mrc  Zarr -> MRC, export_tif  Zarr -> ImageJ TIFF, by frame blocks
    metrics     uMSE / uPSNR / SNR table, preview and report diagnostics, frame by frame
    cli         ``emdenoise denoise MOVIE out.tif --model wcvd --epochs 2 --no-drift``: above
                ``pipeline.IN_MEMORY_BYTES`` through Zarr stores in a work folder (drift is
                left out here: it is its own stage above and slow at this size)

The report stage is not measured: it opens no stack (tables, JSON and the metrics stage's
PNGs only).

The movie itself stands in for the raw movie of ``prefilter`` and ``drift``, for the
pre-filtered stack of ``drift`` (as with ``prefilter: none``: on pure noise the measurement
finds no significant peak, runs its 5 rounds and applies no shift, so whole frames are
written; the 2-epoch WCID's near-flat output would fool its check into large shifts and a
tiny crop), for the aligned movie of ``noise``, for the network's output
(denoised_raw.zarr) of ``lowpass`` and for the method stacks of ``metrics`` (raw,
gaussian2d, gaussian3d, classical as the stages above wrote them).  Printed per stage:
seconds, peak RSS of both sizes, their ratio (target: ~1.2 or less; a stage whose memory
grew with T would show ~4), and the disk footprint of its outputs.  ``prefilter`` trains
in memory up to ``train.IN_MEMORY_BYTES`` (512 MiB, scaled with the budgets:
both ``--small`` movies are under it); its lazy path with ``--sizes 48x512x512 96x512x512
--budget-scale 0.015625``.

    .venv/bin/python bench/bench_memory.py --small     # 12 x 512² and 48 x 512², ~3 min on 2 cores
    .venv/bin/python bench/bench_memory.py             # 50 x 2048² and 200 x 2048² (long: the tuned
                                                       # Gaussian scores 78 sigma pairs)
    .venv/bin/python bench/bench_memory.py --sizes 20x1024x1024 80x1024x1024 --stages baselines metrics
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TAME_MALLOC = False  # --tame-malloc
STAGES = ("ingest", "prefilter", "drift", "noise", "baselines", "classical", "train", "infer", "infer_tilt", "lowpass",
          "select", "export_mrc", "export_tif", "metrics", "cli")
#: The bench's WCID pre-filter: few epochs (its memory does not depend on them), on the CPU.
PREFILTER = {"method": "wcid", "epochs": 2}
PREFILTER_TRAIN = {"device": "cpu", "crop": 64, "val_crop": 64, "epochs": 2}


def make_input(path: Path, shape, seed: int = 0) -> None:
    """Poisson(2) counts as float32, written one frame at a time (as io.ingest writes)."""
    from emdenoise.io import ZarrStackWriter

    rng = np.random.default_rng(seed)
    with ZarrStackWriter(path, shape, pixel_size=1.0, attrs={"dataset": "bench"}) as w:
        for i in range(shape[0]):
            w[i] = rng.poisson(2.0, shape[1:]).astype(np.float32)


class _Files(list):
    """Snakemake's named input / output lists: positional and by attribute / key."""

    def __init__(self, positional=(), **named):
        super().__init__(list(positional) + list(named.values()))
        self._named = named

    def __getattr__(self, key):
        try:
            return self.__dict__["_named"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __getitem__(self, key):
        return self._named[key] if isinstance(key, str) else super().__getitem__(key)

    def keys(self):
        return self._named.keys()


def _smk(rule, cfg, inputs, outputs, log, methods=(), model=None):
    """What a script reads of ``snakemake``."""
    return SimpleNamespace(rule=rule, input=inputs, output=outputs, log=[str(log)], threads=os.cpu_count(),
                           params=_Files(cfg=cfg, methods=list(methods)),
                           wildcards=SimpleNamespace(model=model))


def stage_args(stage: str, d: Path):
    """(script, snakemake stand-in, outputs) of one stage in work folder ``d``."""
    from emdenoise import config as emcfg

    defaults = {"prefilter": PREFILTER, "train": PREFILTER_TRAIN, "model": {"name": "wcvd"}}
    kind = {"kind": "tilt_series"} if stage == "infer_tilt" else {}
    ds = emcfg.build({"datasets": {"bench": {"path": "x", **kind}}, "defaults": defaults},
                     check_paths=False).datasets["bench"]
    raw = str(d / "aligned.zarr")
    log = d / f"{stage}.log"
    if stage == "ingest":  # the Zarr input read as a raw movie (Zarr is one of the raw formats)
        out = _Files([str(d / "raw.zarr")])
        return "ingest", _smk(stage, emcfg.stage_params(ds, "name", "kind", "pixel_size", "frames"), _Files([raw]), out, log), out
    if stage == "train":
        (d / "blindspot.json").write_text(json.dumps({"blindspot": 1}))
        out = _Files(model=str(d / "wcvd" / "model.pt"), log_csv=str(d / "wcvd" / "train_log.csv"))
        inp = _Files(stack=raw, blindspot=str(d / "blindspot.json"))
        return "train", _smk(stage, emcfg.stage_params(ds, "name", "train", *emcfg.model_settings(ds, "wcvd")), inp, out, log,
                             model="wcvd"), out
    if stage in ("infer", "infer_tilt"):
        out = _Files([str(d / f"{stage}_raw.zarr")])
        inp = _Files(stack=raw, model=str(d / "wcvd" / "model.pt"), blindspot=str(d / "blindspot.json"))
        return "infer", _smk(stage, emcfg.stage_params(ds, "kind", "infer"), inp, out, log, model="wcvd"), out
    if stage == "select":  # one candidate: the network's output becomes the result (streamed copy)
        out = _Files(denoised=str(d / "denoised.zarr"), choice=str(d / "model_choice.json"))
        inp = _Files(wcvd=str(d / "infer_raw.zarr"), blindspot=str(d / "blindspot.json"))
        smk = _smk(stage, emcfg.stage_params(ds, "name", "model.name"), inp, out, log)
        smk.params = _Files(cfg=smk.params.cfg, candidates=["wcvd"])
        return "select", smk, out
    if stage == "cli":  # emdenoise denoise: read, train, infer, low-pass, write (no drift: its own stage)
        out = _Files([str(d / "cli_out.tif")])
        return "cli", ["denoise", raw, out[0], "--model", "wcvd", "--epochs", "2", "--device", "cpu", "--no-drift",
                       "--config", str(_write_cli_config(d))], out
    if stage == "prefilter":
        out = _Files([str(d / "prefiltered.zarr")])
        cfg = emcfg.stage_params(ds, *emcfg.prefilter_settings(ds))
        return "prefilter", _smk(stage, cfg, _Files([raw]), out, log), out
    if stage == "drift":
        inp = _Files(raw=raw, prefiltered=raw)
        out = _Files(aligned=str(d / "drift_aligned.zarr"), table=str(d / "drift.csv"), plot=str(d / "drift.png"))
        return "drift", _smk(stage, emcfg.stage_params(ds, "drift", "kind"), inp, out, log), out
    if stage == "noise":
        out = _Files(table=str(d / "noise_correlation.csv"), plot=str(d / "noise_correlation.png"),
                     blindspot=str(d / "noise_blindspot.json"))
        return "noise", _smk(stage, emcfg.stage_params(ds, "name", "noise"), _Files([raw]), out, log), out
    if stage == "baselines":
        out = _Files(gaussian2d=str(d / "gaussian2d.zarr"), gaussian3d=str(d / "gaussian3d.zarr"))
        return "baselines", _smk(stage, emcfg.stage_params(ds, "baselines"), _Files([raw]), out, log), out
    if stage == "classical":
        (d / "blindspot.json").write_text(json.dumps({"blindspot": 1}))
        out = _Files(denoised=str(d / "classical.zarr"), tuning=str(d / "tuning.csv"))
        inp = _Files(stack=raw, blindspot=str(d / "blindspot.json"))
        return "classical", _smk(stage, emcfg.stage_params(ds, "name"), inp, out, log), out
    if stage == "lowpass":
        out = _Files([str(d / "wcvd_denoised.zarr")])
        smk = _smk(stage, emcfg.stage_params(ds, *emcfg.lowpass_settings(ds, "wcvd")),
                   _Files(denoised=raw, raw=raw), out, log, model="wcvd")
        return "lowpass", smk, out
    if stage.startswith("export"):
        out = _Files([str(d / f"denoised.{stage.split('_')[1]}")])
        return "export", _smk(stage, {}, _Files([raw]), out, log), out
    if stage == "metrics":
        methods = [m for m in ("gaussian2d", "gaussian3d", "classical") if (d / f"{m}.zarr").exists()]
        inp = _Files(raw=raw, **{m: str(d / f"{m}.zarr") for m in methods})
        out = _Files(table=str(d / "metrics.csv"), preview=str(d / "preview.png"),
                     diagnostics=str(d / "diagnostics"))
        return "metrics", _smk(stage, emcfg.stage_params(ds, "name", "metrics"), inp, out, log, methods=methods), out
    raise ValueError(stage)


def _write_cli_config(d: Path) -> Path:
    path = d / "cli.yaml"
    path.write_text(json.dumps({"train": {k: v for k, v in PREFILTER_TRAIN.items() if k != "epochs"}}))
    return path


def scale_budgets(factor: float) -> None:
    """Scale the streaming budgets (bytes per block / tile) by ``factor``: with --small,
    by the frame area's ratio to 2048², so that small movies are streamed like big ones
    (the budgets exceed a whole small movie otherwise, and nothing would be bounded)."""
    from emdenoise import chunked, filters, io, metrics, train

    for mod, name in ((filters, "BLOCK_BYTES"), (filters, "TILE_BUDGET"), (metrics, "BLOCK_BYTES"),
                      (io, "_MAX_BLOCK_BYTES"), (chunked, "MAX_TILE_BYTES"), (train, "IN_MEMORY_BYTES")):
        setattr(mod, name, int(getattr(mod, name) * factor))


def child(stage: str, d: Path, budget_scale: float = 1.0) -> None:
    """Run one stage's script here (a fresh process); print a JSON line."""
    if stage == "input":
        shape = tuple(int(v) for v in d.name.split("x"))
        return make_input(d / "aligned.zarr", shape)
    if budget_scale != 1.0:
        scale_budgets(budget_scale)
    script, smk, outputs = stage_args(stage, d)
    path = ROOT / "scripts" / f"{script}.py"
    if script == "cli":  # the command's imports first: their memory is not the stage's
        from emdenoise import cli, pipeline
        if budget_scale != 1.0:
            pipeline.IN_MEMORY_BYTES = int(pipeline.IN_MEMORY_BYTES * budget_scale)
    else:  # the script's imports first
        tree = ast.parse(path.read_text())
        exec(compile(ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], []),
                     str(path), "exec"), {})
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if script == "cli":
        if cli.main(smk) != 0:
            raise SystemExit(f"emdenoise denoise {' '.join(smk)} failed")
    else:
        runpy.run_path(str(path), init_globals={"snakemake": smk})
    ru = resource.getrusage(resource.RUSAGE_SELF)
    from emdenoise.stage import disk_usage

    disk = sum(disk_usage(p)[0] for p in outputs)
    print("RESULT " + json.dumps({"stage": stage, "seconds": time.perf_counter() - t0,
                                  "peak_rss_gb": ru.ru_maxrss * 1024 / 1e9, "rss_before_gb": ru0.ru_maxrss * 1024 / 1e9,
                                  "disk_gb": disk / 1e9}), flush=True)


def run_stage(stage: str, d: Path, budget_scale: float = 1.0) -> dict | None:
    """Run ``stage`` in a child.  Everything memory-hungry, the input's making included,
    runs in children: a child's ru_maxrss starts at its parent's RSS (Linux keeps the
    high-water mark across fork / exec), so this process must stay small."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if TAME_MALLOC:  # one glibc arena, fixed mmap threshold: RSS then tracks what is in use
        env.update(MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, "--child", stage, "--dir", str(d),
                           "--budget-scale", str(budget_scale)], capture_output=True,
                          text=True, check=False, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{stage} failed:\n{proc.stderr[-4000:]}")
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", "--quick", action="store_true", help="12 x 512² and 48 x 512²")
    ap.add_argument("--sizes", nargs="+", default=None, metavar="TxYxX",
                    help="one or two sizes (e.g. 50x2048x2048 200x2048x2048; one: no ratio)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--dir", default="/tmp/emdenoise_bench_memory", help="scratch folder (deleted after)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--budget-scale", type=float, default=None,
                    help="scale the streaming budgets (default 1; with --small 1/16: 512² / 2048²)")
    ap.add_argument("--tame-malloc", action="store_true",
                    help="children run with MALLOC_ARENA_MAX=1 and a fixed mmap threshold: glibc's per-thread "
                         "arenas (Zarr decodes in threads) otherwise keep freed blocks, which shows as RSS")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global TAME_MALLOC
    TAME_MALLOC = args.tame_malloc
    if args.child:
        return child(args.child, Path(args.dir), args.budget_scale)
    scale = args.budget_scale if args.budget_scale is not None else (1 / 16 if args.small else 1.0)

    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    else:
        sizes = [(12, 512, 512), (48, 512, 512)] if args.small else [(50, 2048, 2048), (200, 2048, 2048)]
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    results = {}
    try:
        for shape in sizes:
            d = root / "x".join(map(str, shape))
            d.mkdir(parents=True)
            t0 = time.perf_counter()
            run_stage("input", d)
            print(f"input {shape} float32 ({np.prod(shape) * 4 / 1e9:.2f} GB) written in "
                  f"{time.perf_counter() - t0:.1f} s; cpus {os.cpu_count()}; budgets x {scale:.4g}", flush=True)
            for stage in args.stages:
                r = run_stage(stage, d, scale)
                results.setdefault(stage, {})[shape] = r
                print(f"  {stage:<11} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_gb']:.3f} GB "
                      f"(after imports {r['rss_before_gb']:.3f} GB)  outputs on disk {r['disk_gb'] * 1e3:.1f} MB",
                      flush=True)
            shutil.rmtree(d, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps({str(k): {str(s): v for s, v in by.items()}
                                                   for k, by in results.items()}, indent=1))
        if len(sizes) != 2:
            return
        a, b = sizes
        print(f"\npeak RSS (GB): {a} vs {b} ({np.prod(b) / np.prod(a):.1f}x the pixels)")
        print(f"{'stage':<11} {'first':>8} {'second':>8} {'ratio':>6} {'imports':>8} {'growth':>7} "
              f"{'disk MB':>9} {'disk MB':>9}")
        for stage, by in results.items():
            ra, rb = by[a], by[b]
            # growth: the ratio of what the stage itself added above its imports
            grow = (rb["peak_rss_gb"] - rb["rss_before_gb"]) / max(ra["peak_rss_gb"] - ra["rss_before_gb"], 1e-9)
            print(f"{stage:<11} {ra['peak_rss_gb']:8.3f} {rb['peak_rss_gb']:8.3f} "
                  f"{rb['peak_rss_gb'] / ra['peak_rss_gb']:6.2f} {ra['rss_before_gb']:8.3f} {grow:7.2f} "
                  f"{ra['disk_gb'] * 1e3:9.1f} {rb['disk_gb'] * 1e3:9.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
