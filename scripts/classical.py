"""Rule `classical`: Gaussian 3D tuned on the movie itself (no ground truth), a `model: auto`
candidate (emdenoise.filters.blind_gaussian3d)."""
import json

import numpy as np

from emdenoise import filters, io, stage


def main(smk):
    aligned, attrs = io.read_zarr(smk.input.stack)
    b = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    res = filters.blind_gaussian3d(np.asarray(aligned[:], dtype=np.float32), b)
    stage.log.info("classical: sigma (t, yx) = %s, reach %d frames, blind radius %d", res.sigma, res.reach, b)
    scores = [{k: None if v != v else float(v) for k, v in row.items()}  # NaN -> null in the Zarr attrs
              for row in res.scores.to_dict(orient="records")]
    io.write_zarr(smk.output.denoised, res.denoised, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "method": "classical", "filter": "gaussian3d blind-tuned (Noise2Self)",
                         "sigma": [res.sigma[0], res.sigma[1], res.sigma[1]], "temporal_reach": res.reach,
                         "blind_radius": b, "output": res.output, "scores": scores})
    with io.atomic_path(smk.output.tuning) as tmp:
        res.scores.to_csv(tmp, index=False)


stage.run(snakemake, main)  # noqa: F821
