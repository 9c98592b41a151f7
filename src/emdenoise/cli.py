"""Command line: ``emdenoise info FILE``, ``simulate OUT ...``, ``verify RESULTS``.

Bad input ends with one line ``emdenoise: error: <file>: <problem>`` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import __version__
from .errors import InputError


def _info(args: argparse.Namespace) -> None:
    from . import io

    print(json.dumps(io.describe(args.file, pixel_size=args.pixel_size), indent=2, default=str))


def _simulate(args: argparse.Namespace) -> None:
    from . import io, synthetic

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


def _verify(args: argparse.Namespace) -> None:
    from . import provenance

    problems = provenance.verify(args.results)
    for line in problems:
        print(line)
    if problems:
        sys.exit(1)
    print(f"{args.results}: all recorded inputs and outputs match their checksums")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emdenoise", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"emdenoise {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape, dtype, pixel size, checksum and statistics of a stack")
    info.add_argument("file", help="TIFF, MRC, NPY, Zarr or a folder of single-frame files")
    info.add_argument("--pixel-size", type=float, default=None, help="override the pixel size (Å)")
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
