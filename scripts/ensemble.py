"""Rule `ensemble`: `model: auto`'s candidates combined pixel by pixel (emdenoise.pipeline.ensemble).

The members are the candidates `select` trusts -- each network's blind output (before its
low-pass and own pixel) unless its blind radius is below the noise's (its loss would be
biased low, as in select), and the classical candidate's blind version (recovered from its output for a gated mix,
else a pass of the filter with its recorded settings into a scratch Zarr beside the output,
removed after).
The gate is fitted on a grid of sampled pixels, cross-fitted by frame parity; its
self-supervised loss (`n2s_loss`, per frame `n2s_loss_frames`) is what `select` compares
with the candidate it would replace.  The output is the ensemble with its own pixel given
back (emdenoise.pipeline.ensemble_output), streamed frame block by frame block.
"""
import json
import tempfile
from pathlib import Path

from emdenoise import io, metrics, pipeline, stage
from emdenoise.errors import InputError


def main(smk):
    stack, attrs = io.read_zarr(smk.input.stack)  # lazy, as is everything below
    noise_radius = int(json.loads(open(smk.input.blindspot).read())["blindspot"]) // 2
    members, reaches, radii = {}, [], []
    for name in smk.params.members:
        arr, a = io.read_zarr(smk.input[name])
        radius = int(a.get("blind_radius", noise_radius))
        if radius < noise_radius:
            stage.log.info("ensemble: %s left out (blind radius %d px < the noise's %d px)", name, radius, noise_radius)
            continue
        members[name] = arr
        reaches.append(int(a.get("temporal_reach", 0)))
        radii.append(radius)
        if name == "classical":
            classical = (arr, a)
    out = Path(smk.output[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ensemble-") as work:
        if "classical" in members:  # its blind (J-invariant) version, by the filter's tiles
            members["classical"] = pipeline.classical_blind_stack(stack, classical[1], work, output=classical[0])
        record, blind = pipeline.ensemble(members, stack, threads=max(1, smk.threads))
        stage.log.info("ensemble: %s", metrics.ensemble_sentence(record))
        if blind is None:
            raise InputError(smk.input.stack, f"no ensemble: {record['skipped']}")
        output, own = pipeline.ensemble_output(blind, stack, record)
        stage.log.info("ensemble: loss %.6g, own-pixel weight %.3f", record["n2s_loss"], own["weight"])
        io.write_zarr(out, output, pixel_size=attrs.get("pixel_size"),
                      attrs={"method": "ensemble", "n2s_loss": record["n2s_loss"],
                             "n2s_loss_frames": record["n2s_loss_frames"], "temporal_reach": max(reaches),
                             "blind_radius": min(radii), "ensemble": {**record, "own_pixel": own}})


stage.run(snakemake, main)  # noqa: F821
