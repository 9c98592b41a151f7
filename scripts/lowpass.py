"""Rule `lowpass`: the post-processing of a model's method (emdenoise.pipeline.postprocess).

WCVD: circular FFT low-pass (WCVD paper, SM 2); SHINE's method has none: its output
passes through unchanged.
"""
from emdenoise import io, pipeline, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)  # nothing for SHINE (common.smk: lowpass_settings)
    stack, attrs = io.read_zarr(smk.input[0])
    out, record = pipeline.postprocess(stack[:], ds, smk.wildcards.model)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"), attrs={**attrs, "lowpass": record})


stage.run(snakemake, main)  # noqa: F821
