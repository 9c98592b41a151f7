"""Command line: ``emdenoise info FILE``, ``simulate OUT ...``, ``denoise IN OUT``, ``verify RESULTS``.

Bad input ends with one line ``emdenoise: error: <file>: <problem>`` and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from . import __version__, io, metrics, models, pipeline, provenance, synthetic, train, watch
from . import config as emcfg
from .errors import InputError


class Progress:
    """Progress of ``emdenoise denoise`` (``pipeline.denoise_stack``'s ``progress``): one
    tqdm bar per candidate for training (epochs, with the validation loss) and one for
    inference (frames), with the time left; ``verbose`` adds one readable line per epoch
    (``train.epoch_line``) on stdout.  ``disable=None`` shows the bars only when ``file``
    is a terminal (not in logs or pipes)."""

    def __init__(self, verbose: bool = False, file=None, disable: bool | None = None):
        self.verbose, self.file, self.disable = verbose, file if file is not None else sys.stderr, disable
        self.bars = {}

    def __call__(self, name: str, row: dict) -> None:
        from tqdm import tqdm

        stage = row.get("stage", "train")
        bar = self.bars.get((name, stage))
        if bar is None:
            bar = self.bars[(name, stage)] = tqdm(
                total=int(row["of"]), desc=f"{name} {'training' if stage == 'train' else 'denoising'}",
                unit="epoch" if stage == "train" else "frame", file=self.file, disable=self.disable,
                dynamic_ncols=True, leave=True)
        done = int(row["epoch"] if stage == "train" else row["done"])
        bar.update(max(0, done - bar.n))
        if stage == "train":
            val = row.get("val_loss")
            if val is not None and val == val:
                bar.set_postfix(val=f"{val:.4g}", refresh=False)
            if self.verbose:
                tqdm.write(f"{name} {train.epoch_line(row)}", file=sys.stdout)
        if done >= bar.total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _info(args: argparse.Namespace) -> None:

    print(json.dumps(io.describe(args.file, pixel_size=args.pixel_size, eer_group=args.eer_group,
                                 eer_upsampling=args.eer_upsampling), indent=2, default=str))


def _simulate(args: argparse.Namespace) -> None:

    movie = synthetic.simulate_movie(
        n_frames=args.frames, shape=(args.size[0], args.size[-1]), mode=args.mode, spacing=args.spacing,
        dose=args.dose, max_drift=args.max_drift, psf_sigma=args.psf_sigma, seed=args.seed,
    )
    noisy = np.rint(movie.noisy).astype(np.uint16) if args.mode == "counting" else movie.noisy
    io.write_stack(args.output, noisy, pixel_size=args.pixel_size)
    if args.truth:
        io.write_stack(args.truth, movie.clean, pixel_size=args.pixel_size)
    if args.shifts:
        np.savetxt(args.shifts, movie.shifts, delimiter=",", header="dy,dx", comments="", fmt="%.4f")
    print(f"wrote {args.output} {movie.noisy.shape} ({args.mode} mode)")


def _denoise(args: argparse.Namespace) -> None:
    """Align (whole pixels), train on the input itself, denoise, post-process, choose,
    shift back and write: the output stays registered to the input."""

    settings: dict = {}
    if args.config:
        try:
            settings = yaml.safe_load(open(args.config)) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(args.config, f"cannot read config: {exc}") from exc
        emcfg.validate({"defaults": settings})
    # everything that can fail fast does so before minutes of training
    io.check_output_path(args.output)
    if args.save_model and not args.save_model.endswith(".pt"):
        raise InputError(args.save_model, "--save-model must end in .pt")
    try:
        device = str(models.resolve_device(args.device or "auto"))
    except InputError as exc:  # e.g. --device cuda without CUDA: name the file it was to denoise
        raise InputError(args.input, exc.problem) from None
    ds = emcfg.build({"datasets": {"cli": {"path": args.input}}, "defaults": settings}).datasets["cli"]
    if args.model:
        ds = dataclasses.replace(ds, model=dataclasses.replace(ds.model, name=args.model))
    if args.load_model:  # apply a trained model: no training (refused here if it is not blind)
        train.load_checkpoint(args.load_model)
        ds = dataclasses.replace(ds, model=dataclasses.replace(ds.model, checkpoint=args.load_model))
    if not ds.candidates:
        raise InputError(args.config, "model: none denoises nothing; choose wcvd, shine or auto")
    arr, meta = io.read_stack(args.input, pixel_size=args.pixel_size, eer_group=args.eer_group,
                              eer_upsampling=args.eer_upsampling)
    io.validate_stack(arr, args.input, min_frames=3)
    try:  # enough frames for every candidate -- before any training
        pipeline.check_frames(ds, arr.shape[0])
    except InputError as exc:
        raise InputError(args.input, exc.problem) from None
    big = 4 * int(np.prod(arr.shape)) > pipeline.IN_MEMORY_BYTES
    work = _work_folder(args.work_dir, args.output) if big or args.work_dir else None
    try:
        _denoise_into(args, arr, meta, ds, device, work)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _work_folder(work_dir: str | None, output: str) -> Path:
    """A new folder for the bounded-memory path's Zarr stores: inside ``work_dir``
    (created if missing) or beside the output (its disk must hold the result anyway)."""
    parent = Path(work_dir) if work_dir else Path(output).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".emdenoise-work-", dir=parent))
    except OSError as exc:
        raise InputError(str(parent), f"cannot create a work folder: {exc.strerror or exc}") from None


def _denoise_into(args, arr, meta, ds, device, work) -> None:
    """The chain and the write of ``emdenoise denoise``: in memory (``work`` None) or
    through Zarr stores in ``work`` (the input copied there first, by blocks)."""
    if work is None:
        stack = np.asarray(arr[:], dtype=np.float32)
    else:
        io.write_zarr(work / "input.zarr", arr, pixel_size=meta.get("pixel_size"), pyramid=False)
        stack, _ = io.read_zarr(work / "input.zarr")
        print(f"{args.input}: {4 * np.prod(arr.shape) / 2**30:.2f} GiB as float32: intermediates go to {work} "
              "(bounded memory)", file=sys.stderr)
    progress = Progress(verbose=args.verbose)
    try:
        result = pipeline.denoise_stack(stack, ds, device=device, progress=progress,
                                        train_overrides={"device": device, "epochs": args.epochs},
                                        align=False if args.no_drift else None, pixel_size=meta.get("pixel_size"),
                                        workdir=work)
    except InputError as exc:
        raise InputError(args.input, exc.problem) from None
    finally:
        progress.close()
    chosen, choice = result["chosen"], result["choice"]
    for problem in result["warnings"]:
        print(f"emdenoise: warning: {args.load_model} may not fit {args.input}: {problem}", file=sys.stderr)
    if result["drift"] is not None:
        moved = result["drift"]["offsets"] is not None
        print(f"drift: up to {result['drift']['max_shift_px']:.1f} px; "
              + ("frames aligned by whole pixels for denoising and shifted back" if moved else "nothing to align"))
    if len(result["outputs"]) > 1:
        losses = ", ".join(f"{m} {v:.6g}" for m, v in choice["loss"].items())
        print(f"auto: chose {chosen} (lowest self-supervised loss of the blind outputs: {losses})")
    reach = (result["checkpoints"].get("wcvd_ctx") or {}).get("reach_choice")
    if reach:
        print(metrics.reach_sentence(reach))
    ckpt = result["checkpoints"].get(chosen)  # None: the tuned classical filter won
    io.write_stack(args.output, result["output"], pixel_size=meta.get("pixel_size"),
                   metadata={"source": meta["source"], "sha256": meta["sha256"], "method": chosen,
                             **{k: meta[k] for k in ("frame_time", "tilt_angles") if k in meta}})
    if chosen == "ensemble":
        print(f"wrote {args.output} {stack.shape} ({metrics.ensemble_sentence(choice['ensemble'])}"
              + ("; no model saved: the ensemble is several" if args.save_model else "") + ")")
        return
    if ckpt is None:
        sigma = tuple(round(float(v), 2) for v in choice.get("sigma", ()))
        what = (metrics.nlm_sentence(choice["nlm"]) if choice.get("filter") == "nlm"
                else metrics.mix_sentence(choice["mix"]) if choice.get("filter") == "gaussian_mix"
                else f"Gaussian 3D sigma (t, y, x) = {sigma}")
        print(f"wrote {args.output} {stack.shape} (classical: {what}, tuned without ground truth; no network beat "
              "it" + ("; no model saved" if args.save_model else "") + ")")
        return
    if args.save_model:
        train.save_checkpoint(ckpt, args.save_model)
    if args.load_model:
        print(f"wrote {args.output} {stack.shape} ({ckpt.get('model', 'wcvd')} from {args.load_model}, no training)")
        return
    print(f"wrote {args.output} {stack.shape} ({chosen}, best epoch {ckpt['best_epoch']}, "
          f"{ckpt['train_seconds']:.0f} s training on {ckpt['device']})")


def _watch(args: argparse.Namespace) -> None:
    """Denoise frames as the microscope writes them (emdenoise.watch)."""
    device = str(models.resolve_device(args.device or "auto"))
    stats = watch.watch(args.input, args.output, args.load_model, device=device, poll=args.poll,
                        idle=None if args.idle <= 0 else args.idle)
    print(f"watch: {stats['frames']} frames in {stats['seconds']:.1f} s ({stats['frames_per_s']:.2f} frames/s), "
          f"lag mean {stats['lag_mean_s']:.2f} s, max {stats['lag_max_s']:.2f} s")


def _verify(args: argparse.Namespace) -> None:

    problems = provenance.verify(args.results)
    for line in problems:
        print(line)
    if problems:
        sys.exit(1)
    print(f"{args.results}: all recorded inputs and outputs match their checksums")


def _device(value: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(emcfg.DEVICE_PATTERN, value):
        raise argparse.ArgumentTypeError(f"invalid device {value!r}: use auto, cpu, cuda or cuda:N")
    return value


def _eer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eer-group", type=int, default=None,
                   help="Falcon EER: raw frames summed per output frame (default 20)")
    p.add_argument("--eer-upsampling", type=int, choices=[1, 2, 4], default=None,
                   help="Falcon EER: super-resolution factor (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emdenoise", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"emdenoise {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape, dtype, pixel size, checksum and statistics of a stack")
    info.add_argument("file", help="TIFF, MRC, NPY, Zarr, DM3/DM4, SER/EMI, EMD, EER or a folder of single-frame files")
    info.add_argument("--pixel-size", type=float, default=None, help="override the pixel size (Å)")
    _eer_args(info)
    info.set_defaults(func=_info)

    sim = sub.add_parser("simulate", help="write a synthetic nanoparticle movie with known ground truth")
    sim.add_argument("output", help="output stack (.tif, .mrc, .npy or .zarr)")
    sim.add_argument("--truth", help="also write the clean ground truth here")
    sim.add_argument("--shifts", help="also write the true drift path (CSV dy,dx in px)")
    sim.add_argument("--mode", choices=["counting", "linear"], default="counting")
    sim.add_argument("--frames", type=int, default=20)
    sim.add_argument("--size", type=int, nargs="+", default=[256], metavar="N", help="Y [X] in px")
    sim.add_argument("--spacing", type=float, default=9.0, help="atomic column spacing (px)")
    sim.add_argument("--dose", type=float, default=1.0, help="mean electrons per pixel per frame")
    sim.add_argument("--max-drift", type=float, default=6.0, help="largest drift (px)")
    sim.add_argument("--psf-sigma", type=float, default=1.0, help="detector PSF in linear mode (px)")
    sim.add_argument("--pixel-size", type=float, default=None, help="pixel size written to the file (Å)")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=_simulate)

    den = sub.add_parser("denoise", help="train a blind-spot model on one stack and write it denoised")
    den.add_argument("input", help="TIFF, MRC, NPY, Zarr, DM3/DM4, SER/EMI, EMD, EER or a folder of frames (T >= 3)")
    den.add_argument("output", help="denoised stack (.tif, .mrc, .zarr or .npy)")
    den.add_argument("--model", choices=["wcvd", "shine", "auto"], default=None,
                     help="denoising model (default: the config's, auto); auto trains WCVD (kt and "
                          "model.long_kt), SHINE and tunes a classical filter (Gaussian 3D or NL-means), and keeps the "
                          "one with the lowest self-supervised (Noise2Self) loss")
    den.add_argument("--config", help="YAML with any of the pipeline's per-stage settings "
                     "(model, train, infer, lowpass: the keys of `defaults` in config/config.yaml)")
    den.add_argument("--device", type=_device, default=None, help="auto | cpu | cuda | cuda:N")
    den.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    den.add_argument("--pixel-size", type=float, default=None, help="Å/px, overrides the file's")
    _eer_args(den)
    den.add_argument("--save-model", help="also save the trained checkpoint here (.pt)")
    den.add_argument("--load-model", help="apply this trained checkpoint (.pt) instead of training; warns when "
                     "it does not fit the data (window, pixel size, noise correlation, intensities)")
    den.add_argument("--no-drift", action="store_true",
                     help="do not align frames before denoising (default: measure drift, align by whole "
                          "pixels, denoise, shift back; tilt series are never aligned)")
    den.add_argument("--work-dir", default=None,
                     help="folder for the intermediates of movies larger than 128 MiB (float32), which go through "
                          "Zarr stores instead of memory (default: a temporary folder beside the output; removed "
                          "when done). Given, every movie takes that path")
    den.add_argument("-v", "--verbose", action="store_true", help="print the validation loss every epoch (progress bars "
                     "with the time left are shown on a terminal anyway)")
    den.set_defaults(func=_denoise)

    wat = sub.add_parser("watch", help="denoise single-frame files as they appear in a folder (live, in situ)")
    wat.add_argument("input", help="folder the detector writes frames into (.tif, .mrc, .dm4, ...)")
    wat.add_argument("output", help="folder for the denoised frames (same names, .tif) and preview.png")
    wat.add_argument("--load-model", required=True, help="trained checkpoint (.pt), e.g. from "
                     "`emdenoise denoise first_frames.tif out.tif --save-model m.pt`")
    wat.add_argument("--idle", type=float, default=30.0, help="stop after this many seconds without a new frame "
                     "(0: only on Ctrl-C); the last frames are written with mirrored windows")
    wat.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the folder")
    wat.add_argument("--device", type=_device, default=None, help="auto | cpu | cuda | cuda:N")
    wat.set_defaults(func=_watch)

    ver = sub.add_parser("verify", help="recompute the checksums recorded in provenance.json files")
    ver.add_argument("results", help="a results folder (searched recursively for provenance.json)")
    ver.set_defaults(func=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError as exc:
        parser.exit(2, f"emdenoise: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
