"""Rule `select`: the dataset's denoised stack, chosen among the candidates.

One candidate: it is the result. `model: auto`: the networks and the blind-tuned classical
filter (`classical`: Gaussian 3D or NL-means); the one with the lowest self-supervised (Noise2Self) loss of its blind
output (then `ensemble`, their combination, in its place where significantly lower:
emdenoise.pipeline.prefer_ensemble), recorded by the stage that made it (`n2s_loss`: lowpass for the networks,
classical for the classical filter; emdenoise.metrics.select_model) -- the classical filter unless a
network is lower by more than 2 standard errors of the per-frame difference
(`n2s_loss_frames`) -- with its evidence in
model_choice.json (with the chosen checkpoint's path, or none for a classical filter).
"""
import json

from emdenoise import io, pipeline, stage
from emdenoise.config import stage_config
from emdenoise.errors import InputError


def main(smk):
    ds = stage_config(smk.params.cfg)
    names = smk.params.candidates
    stacks = {m: io.read_zarr(smk.input[m]) for m in names}
    missing = [m for m, (_, attrs) in stacks.items() if "n2s_loss" not in attrs]
    if missing and len(names) > 1:
        raise InputError(smk.input[missing[0]], "no self-supervised loss (n2s_loss) recorded: "
                                                "made by an older version, delete it and rerun")
    # a network blind to less than the noise's correlated window scores too low: left out
    # (its blind radius recorded by infer; the classical filter's is the noise's own)
    radii = {m: int(attrs["blind_radius"]) for m, (_, attrs) in stacks.items() if "blind_radius" in attrs}
    noise_radius = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    frames = {m: attrs["n2s_loss_frames"] for m, (_, attrs) in stacks.items() if "n2s_loss_frames" in attrs}
    choice = pipeline.choose({m: attrs.get("n2s_loss") for m, (_, attrs) in stacks.items() if m != "ensemble"}, ds,
                             radii, noise_radius, frames)
    if "ensemble" in stacks:  # replaces the choice only where significantly lower
        choice = pipeline.prefer_ensemble(choice, stacks["ensemble"][1]["ensemble"], frames)
    choice["reaches"] = {m: pipeline.temporal_reach(ds, m, attrs) for m, (_, attrs) in stacks.items()}
    # each network's own-pixel weight as applied (pipeline.postprocess; 0: not given back)
    choice["unblind"] = {m: attrs["lowpass"]["unblind"]["weight"] * attrs["lowpass"]["unblind"]["applied"]
                         for m, (_, attrs) in stacks.items() if "unblind" in (attrs.get("lowpass") or {})}
    if "ensemble" in stacks:
        choice["unblind"]["ensemble"] = stacks["ensemble"][1]["ensemble"]["own_pixel"]["weight"]
    if "model_shine" in smk.input.keys():  # which SHINE size ran (auto: CPU-sized without a GPU)
        from emdenoise import checkpoint  # torch: only here

        choice["shine_size"] = checkpoint.load_checkpoint(smk.input.model_shine)[1].get("shine_size")
    if "reach_choice" in stacks.get("wcvd_ctx", (None, {}))[1]:  # recorded by infer from the checkpoint
        choice["reach_choice"] = stacks["wcvd_ctx"][1]["reach_choice"]
    chosen = choice["chosen"]
    key = f"model_{chosen}"
    if key in smk.input.keys():
        choice.update(kind="network", checkpoint=str(smk.input[key]))
    elif chosen == "ensemble":  # every member's checkpoint
        choice.update(kind="ensemble", checkpoint=None,
                      checkpoints={m: str(smk.input[f"model_{m}"]) for m in choice["ensemble"]["members"]
                                   if f"model_{m}" in smk.input.keys()})
    else:
        a = stacks[chosen][1]
        choice.update(kind="classical filter (no checkpoint)", checkpoint=None, sigma=a.get("sigma"),
                      filter=a.get("filter", "gaussian3d"))
        if "nlm" in a:  # tried or skipped, chosen or not: the report says which
            choice["nlm"] = {k: v for k, v in a["nlm"].items() if k != "scores"}
        if "mix" in a:
            choice["mix"] = a["mix"]
    stage.log.info("model choice: %s", choice)
    arr, attrs = stacks[chosen]
    attrs = {k: v for k, v in attrs.items() if k != "scores"}
    io.write_zarr(smk.output.denoised, arr, pixel_size=attrs.get("pixel_size"),  # streamed block by block
                  attrs={**attrs, "method": chosen, "model_choice": choice})
    with io.atomic_path(smk.output.choice) as tmp, open(tmp, "w") as fh:
        json.dump({"dataset": ds.name, "candidates": list(names), **choice}, fh, indent=2)


stage.run(snakemake, main)  # noqa: F821
