"""Rule `demo`: write a synthetic demo movie and its ground truth (emdenoise.synthetic)."""
import numpy as np

from emdenoise import io, stage, synthetic
from emdenoise.config import DemoConfig


def main(smk):
    d = DemoConfig(**smk.params.demo)  # a plain dict, so that Snakemake re-runs on edits
    movie = synthetic.simulate_movie(
        n_frames=d.n_frames, shape=tuple(d.shape), mode=d.mode, spacing=d.spacing,
        dose=d.dose, max_drift=d.max_drift, psf_sigma=d.psf_sigma, seed=d.seed,
    )
    noisy = movie.noisy
    if d.mode == "counting":  # counts are integers, as a counting detector writes them
        noisy = np.rint(noisy).astype(np.uint16)
    io.write_stack(smk.output.movie, noisy)
    io.write_stack(smk.output.truth, movie.clean)


stage.run(snakemake, main)  # noqa: F821 (injected by Snakemake)
