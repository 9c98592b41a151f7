"""Rule `classical`: Gaussian 3D tuned on the movie itself (no ground truth), a `model: auto`
candidate (emdenoise.pipeline.classical_candidate -> emdenoise.filters.blind_gaussian3d).

Streamed: the aligned movie is read by spatial tiles of all frames (with a halo of the
widest spatial kernel) and the output written tile by tile into an OME-Zarr whose shards
are those tiles (all frames x tile x tile px).  Peak memory ~ filters.TILE_BUDGET plus
the OME pyramid's 256 MB read blocks, whatever the frame size and (down to
filters.MIN_TILE px tiles) the number of frames.
"""
import json

import pandas as pd

from emdenoise import filters, io, pipeline, stage


def main(smk):
    aligned, attrs = io.read_zarr(smk.input.stack)  # lazy: read tile by tile
    b = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    tile = filters.blind_tile(aligned.shape[0])  # the output's shards are the tuning's tiles
    record = pipeline.classical_zarr(aligned, b, smk.output.denoised, attrs=attrs, pixel_size=attrs.get("pixel_size"))
    stage.log.info("classical: sigma (t, y, x) = %s, reach %d frames, blind radius %d, self-supervised loss %.6g "
                   "(tiles of %d px)", record["sigma"], record["temporal_reach"], b, record["n2s_loss"], tile)
    with io.atomic_path(smk.output.tuning) as tmp:
        pd.DataFrame(record["scores"]).to_csv(tmp, index=False)


stage.run(snakemake, main)  # noqa: F821
