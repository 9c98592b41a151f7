"""Rule `select`: the dataset's denoised stack, chosen among the candidates.

One candidate: it is the result. `model: auto`: the networks and the blind-tuned Gaussian
3D (`classical`); the one with the lowest uMSE at one temporal radius outside every
candidate's reach (emdenoise.metrics.select_model), recorded with its evidence in
model_choice.json (with the chosen checkpoint's path, or none for a classical filter).
"""
import json

import numpy as np

from emdenoise import io, metrics, stage
from emdenoise.errors import InputError


def reach(ds, name, attrs):
    """Temporal reach of a candidate: from its stack's attributes (classical) or the config."""
    return int(attrs["temporal_reach"]) if "temporal_reach" in attrs else ds.temporal_reach(name)


def main(smk):
    ds = smk.params.dataset
    names = smk.params.candidates
    raw, _ = io.read_zarr(smk.input.raw)
    stacks = {m: io.read_zarr(smk.input[m]) for m in names}
    if len(names) == 1:
        choice = {"chosen": names[0], "rule": f"configured (model: {ds.model.name})"}
    else:
        reaches = {m: reach(ds, m, attrs) for m, (_, attrs) in stacks.items()}
        try:
            choice = metrics.select_model({m: np.asarray(a[:]) for m, (a, _) in stacks.items()},
                                          np.asarray(raw[:]), reaches=reaches,
                                          temporal_radius=ds.metrics.temporal_radius)
        except InputError as exc:
            raise InputError(ds.path, f"model: auto compares candidates by uMSE: {exc.problem}; "
                                      "choose model: wcvd or shine") from None
    chosen = choice["chosen"]
    key = f"model_{chosen}"
    if key in smk.input.keys():
        choice.update(kind="network", checkpoint=str(smk.input[key]))
    else:
        choice.update(kind="classical filter (no checkpoint)", checkpoint=None,
                      sigma=stacks[chosen][1].get("sigma"))
    stage.log.info("model choice: %s", choice)
    arr, attrs = stacks[chosen]
    attrs = {k: v for k, v in attrs.items() if k != "scores"}
    io.write_zarr(smk.output.denoised, arr[:], pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "method": chosen, "model_choice": choice})
    with io.atomic_path(smk.output.choice) as tmp, open(tmp, "w") as fh:
        json.dump({"dataset": ds.name, "candidates": list(names), **choice}, fh, indent=2)


stage.run(snakemake, main)  # noqa: F821
