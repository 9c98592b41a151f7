"""Rule `select`: the dataset's denoised stack and model, chosen among the candidates.

One candidate: it is the result. `model: auto`: the candidate with the lower uMSE at
temporal radius >= 2 (emdenoise.metrics.select_model), recorded with its evidence.
"""
import json
import shutil

import numpy as np

from emdenoise import io, metrics, stage
from emdenoise.config import stage_config
from emdenoise.errors import InputError


def main(smk):
    ds = stage_config(smk.params.cfg)
    names = smk.params.candidates
    raw, _ = io.read_zarr(smk.input.raw)
    stacks = {m: io.read_zarr(smk.input[m]) for m in names}
    if len(names) == 1:
        choice = {"chosen": names[0], "rule": f"configured (model: {ds.model.name})"}
    else:
        r = max(2, ds.metrics.temporal_radius)
        if raw.shape[0] < 2 * r + 4:
            raise InputError(smk.input.raw, f"model: auto compares candidates by uMSE, which needs at least {2 * r + 4} "
                                      f"frames; this movie has {raw.shape[0]}: choose model: wcvd or shine")
        choice = metrics.select_model({m: np.asarray(a[:]) for m, (a, _) in stacks.items()},
                                      np.asarray(raw[:]), temporal_radius=r)
    stage.log.info("model choice: %s", choice)
    chosen, attrs = stacks[choice["chosen"]]
    io.write_zarr(smk.output.denoised, chosen[:], pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "method": choice["chosen"], "model_choice": choice})
    with io.atomic_path(smk.output.model) as tmp:
        shutil.copyfile(smk.input[f"model_{choice['chosen']}"], tmp)
    with io.atomic_path(smk.output.choice) as tmp, open(tmp, "w") as fh:
        json.dump({"dataset": ds.name, "candidates": list(names), **choice}, fh, indent=2)


stage.run(snakemake, main)  # noqa: F821
