"""Rule `lowpass`: the post-processing of a model's method (emdenoise.pipeline.postprocess).

WCVD: circular FFT low-pass (WCVD paper, SM 2), its diameter chosen by uMSE against the
aligned raw movie when `lowpass.diameter: auto`; SHINE's method has none: its output
passes through unchanged.
"""

from emdenoise import io, pipeline, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)  # nothing for SHINE (common.smk: lowpass_settings)
    stack, attrs = io.read_zarr(smk.input.denoised)
    raw, _ = io.read_zarr(smk.input.raw)  # lazy: read only when a low-pass diameter is scored
    out, record = pipeline.postprocess(stack[:], ds, smk.wildcards.model, raw, attrs.get("temporal_reach"),
                                       model_kind=attrs.get("model_kind"), ks_max=attrs.get("ks_max"))
    stage.log.info("post-processing: %s", record)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"), attrs={**attrs, "lowpass": record})


stage.run(snakemake, main)  # noqa: F821
