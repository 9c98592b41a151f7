"""Rule `baselines`: Gaussian 2D (per frame, temporal reach 0) and Gaussian 3D (t, y, x; temporal
kernel truncated at ceil(2 sigma_t) frames, its reach: emdenoise.filters.gaussian3d)."""
import numpy as np

from emdenoise import filters, io, stage
from emdenoise.config import stage_config


def main(smk):
    b = stage_config(smk.params.cfg).baselines
    aligned, attrs = io.read_zarr(smk.input[0])
    stack = np.asarray(aligned[:], dtype=np.float32)
    px = attrs.get("pixel_size")
    io.write_zarr(smk.output.gaussian2d, filters.gaussian2d(stack, b.gaussian2d_sigma), pixel_size=px,
                  attrs={**attrs, "method": "gaussian2d", "sigma": b.gaussian2d_sigma, "temporal_reach": 0})
    io.write_zarr(smk.output.gaussian3d, filters.gaussian3d(stack, tuple(b.gaussian3d_sigma)), pixel_size=px,
                  attrs={**attrs, "method": "gaussian3d", "sigma": list(b.gaussian3d_sigma),
                         "temporal_reach": filters.temporal_reach("gaussian3d", sigma=tuple(b.gaussian3d_sigma))})


stage.run(snakemake, main)  # noqa: F821
