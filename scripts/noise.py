"""Rule `noise`: noise-correlation heatmaps and the blind-spot size (SHINE).

Bounded memory: the aligned Zarr stays lazy; emdenoise.noise.estimate_blindspot reads
only the frames of up to noise.MAX_PAIRS adjacent pairs spread over the movie.
"""
import json

import pandas as pd

from emdenoise import io, noise, stage
from emdenoise.config import stage_config
from emdenoise.errors import InputError


def main(smk):
    ds = stage_config(smk.params.cfg)
    aligned, attrs = io.read_zarr(smk.input[0])
    if attrs.get("drift", {}).get("mode", "integer") != "integer":
        raise InputError(smk.input[0], "noise must be measured on frames that were never interpolated; "
                            "set drift.apply: integer for this dataset")
    result = noise.estimate_blindspot(aligned, max_lag=ds.noise.max_lag, threshold=ds.noise.threshold,
                                      estimate=ds.noise.estimate)
    with io.atomic_path(smk.output.table) as tmp:
        tables = [noise.heatmap_table(result[f"heatmap_{kind}"]).assign(estimate=kind)
                  for kind in ("frame", "difference") if result.get(f"heatmap_{kind}") is not None]
        pd.concat(tables)[["estimate", "dy", "dx", "r"]].to_csv(tmp, index=False)
    with io.atomic_path(smk.output.plot) as tmp:
        noise.plot_heatmaps(result, tmp)
    with io.atomic_path(smk.output.blindspot) as tmp, open(tmp, "w") as fh:
        json.dump({"dataset": ds.name, **result}, fh, indent=2)


stage.run(snakemake, main)  # noqa: F821
