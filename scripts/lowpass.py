"""Rule `lowpass`: circular FFT low-pass of the WCVD output (WCVD paper, SM 2).

SHINE's method has no low-pass: its output passes through unchanged.
"""
from emdenoise import filters, io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)  # nothing for SHINE (common.smk: lowpass_settings)
    applied = smk.wildcards.model == "wcvd" and ds.lowpass.enabled
    stack, attrs = io.read_zarr(smk.input[0])
    record = {"applied": applied}
    out = stack[:]
    if applied:
        lp = ds.lowpass
        out = filters.fft_lowpass(out, diameter=lp.diameter, ks_max=max(ds.model.ks), pad=lp.pad,
                                  edge_width=lp.edge_width)
        record.update(diameter=lp.diameter, pad=lp.pad)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"), attrs={**attrs, "lowpass": record})


stage.run(snakemake, main)  # noqa: F821
