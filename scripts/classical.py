"""Rule `classical`: Gaussian 3D tuned on the movie itself (no ground truth), a `model: auto`
candidate (emdenoise.pipeline.classical_candidate -> emdenoise.filters.blind_gaussian3d)."""
import json

import numpy as np
import pandas as pd

from emdenoise import io, pipeline, stage


def main(smk):
    aligned, attrs = io.read_zarr(smk.input.stack)
    b = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    out, record = pipeline.classical_candidate(np.asarray(aligned[:], dtype=np.float32), b)
    stage.log.info("classical: sigma (t, y, x) = %s, reach %d frames, blind radius %d, self-supervised loss %.6g",
                   record["sigma"], record["temporal_reach"], b, record["n2s_loss"])
    io.write_zarr(smk.output.denoised, out, pixel_size=attrs.get("pixel_size"), attrs={**attrs, **record})
    with io.atomic_path(smk.output.tuning) as tmp:
        pd.DataFrame(record["scores"]).to_csv(tmp, index=False)


stage.run(snakemake, main)  # noqa: F821
