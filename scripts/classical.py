"""Rule `classical`: the classical filter tuned on the movie itself (no ground truth), a
`model: auto` candidate (emdenoise.pipeline.classical_candidate): the Gaussian 3D
(emdenoise.filters.blind_gaussian3d) or NL-means of a temporal Gaussian average
(emdenoise.filters.blind_nlm) or a mix of Gaussians per structure class or gated per pixel
(emdenoise.filters.blind_gaussian_mix, emdenoise.pipeline.gate_mix), whichever
self-supervised loss is lower.

Streamed: the aligned movie is read by spatial tiles of all frames (with a halo of the
widest spatial kernel) and the output written into an OME-Zarr whose shards are those
tiles (all frames x tile x tile px); NL-means keeps its temporal averages in a scratch
Zarr beside the output (removed at the end) and works by blocks of frames.  Peak memory
~ filters.TILE_BUDGET plus the OME pyramid's 256 MB read blocks, whatever the frame size
and (down to filters.MIN_TILE px tiles) the number of frames.
"""
import json

import pandas as pd

from emdenoise import filters, io, metrics, pipeline, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    aligned, attrs = io.read_zarr(smk.input.stack)  # lazy: read tile by tile
    b = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    tile = filters.blind_tile(aligned.shape[0])  # the output's shards are the tuning's tiles
    limit = pipeline.reach_limit(ds.model.max_reach, aligned.shape[0])
    record = pipeline.classical_zarr(aligned, b, smk.output.denoised, attrs=attrs, pixel_size=attrs.get("pixel_size"),
                                     threads=max(1, smk.threads), max_reach=limit)  # threads: the gate's torch
    g = record["gaussian"]
    stage.log.info("classical: Gaussian 3D sigma (t, y, x) = %s, blind radius %d, self-supervised loss %.6g "
                   "(tiles of %d px)", g["sigma"], b, g["n2s_loss"], tile)
    stage.log.info("classical: NL-means %s", {k: v for k, v in record["nlm"].items() if k != "scores"})
    stage.log.info("classical: %s", metrics.mix_sentence(record["mix"]))
    stage.log.info("classical: chose %s, reach %d frames, loss %.6g", record["filter"], record["temporal_reach"],
                   record["n2s_loss"])
    with io.atomic_path(smk.output.tuning) as tmp:
        # one table: the Gaussian's sigma grid, then NL-means' settings (scored on crops)
        pd.concat([pd.DataFrame(record["scores"]).assign(filter="gaussian3d"),
                   pd.DataFrame(record["nlm"].get("scores", [])).assign(filter="nlm")]).to_csv(tmp, index=False)


stage.run(snakemake, main)  # noqa: F821
