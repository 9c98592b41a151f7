"""Rule `select`: the dataset's denoised stack and model, chosen among the candidates.

One candidate: it is the result. `model: auto`: the candidate with the lower uMSE at
temporal radius >= 2 (emdenoise.metrics.select_model), recorded with its evidence.
"""
import json
import shutil

import numpy as np

from emdenoise import checkpoint, io, pipeline, stage
from emdenoise.errors import InputError


def main(smk):
    ds = smk.params.dataset
    names = smk.params.candidates
    raw, _ = io.read_zarr(smk.input.raw)
    stacks = {m: io.read_zarr(smk.input[m]) for m in names}
    # each candidate's temporal reach (frames on each side it looked at) sets the uMSE radius
    loaded = {m: checkpoint.load_checkpoint(smk.input[f"model_{m}"]) for m in names}
    reaches = {m: model.params.halo_t for m, (model, _) in loaded.items()}
    try:
        choice = pipeline.choose({m: np.asarray(a[:]) for m, (a, _) in stacks.items()}, np.asarray(raw[:]),
                                 ds, reaches)
    except InputError as exc:
        raise InputError(ds.path, exc.problem) from None
    if "shine" in loaded:  # which SHINE size ran (auto: CPU-sized without a GPU)
        choice["shine_size"] = loaded["shine"][1].get("shine_size")
    stage.log.info("model choice: %s", choice)
    chosen, attrs = stacks[choice["chosen"]]
    io.write_zarr(smk.output.denoised, chosen[:], pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "method": choice["chosen"], "model_choice": choice})
    with io.atomic_path(smk.output.model) as tmp:
        shutil.copyfile(smk.input[f"model_{choice['chosen']}"], tmp)
    with io.atomic_path(smk.output.choice) as tmp, open(tmp, "w") as fh:
        json.dump({"dataset": ds.name, "candidates": list(names), **choice}, fh, indent=2)


stage.run(snakemake, main)  # noqa: F821
