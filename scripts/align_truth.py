"""Rule `align_truth`: give the ground truth exactly the shifts and crop of the raw stack
(streamed by blocks of frames, as the `drift` rule writes the aligned movie)."""
import pandas as pd

from emdenoise import drift, filters, io, stage
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
    info = drift.plan_shifts(applied, truth.shape, mode=ds.drift.apply)
    shape = drift.aligned_shape(info, truth.shape, ds.drift.crop)
    if shape != tuple(aligned.shape):
        raise InputError(ds.ground_truth, f"ground truth frames {truth.shape[1:]} do not match the movie's")
    k = filters.block_frames(shape[1:])  # streamed: a block of frames in memory, not the movie
    io.write_zarr_blocks(smk.output[0], shape, drift.aligned_blocks(truth, info, crop=ds.drift.crop, frames=k), k,
                         pixel_size=attrs.get("pixel_size"), attrs=attrs)


stage.run(snakemake, main)  # noqa: F821
