"""Rule `align_truth`: give the ground truth exactly the shifts and crop of the raw stack."""
import numpy as np
import pandas as pd

from emdenoise import drift, io, stage
from emdenoise.config import stage_config
from emdenoise.errors import InputError


def main(smk):
    ds = stage_config(smk.params.cfg)
    truth, attrs = io.read_zarr(smk.input.truth)
    aligned, _ = io.read_zarr(smk.input.aligned)
    table = pd.read_csv(smk.input.table)
    applied = table[["applied_dy", "applied_dx"]].to_numpy()
    if truth.shape[0] != applied.shape[0]:
        raise InputError(ds.ground_truth, f"ground truth has {truth.shape[0]} frames, the movie {applied.shape[0]}")
    out, _ = drift.apply_shifts(np.asarray(truth[:], dtype=np.float32), applied, mode=ds.drift.apply, crop=ds.drift.crop)
    if out.shape != aligned.shape:
        raise InputError(ds.ground_truth, f"ground truth frames {truth.shape[1:]} do not match the movie's")
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"), attrs=attrs)


stage.run(snakemake, main)  # noqa: F821
