"""Rule `lowpass`: circular FFT low-pass of the WCVD output (WCVD paper, SM 2).

SHINE's method has no low-pass: its output passes through unchanged.
"""
from emdenoise import filters, io, stage


def main(smk):
    ds = smk.params.dataset
    lp = ds.lowpass
    applied = lp.enabled and smk.wildcards.model == "wcvd"
    stack, attrs = io.read_zarr(smk.input[0])
    out = (filters.fft_lowpass(stack[:], diameter=lp.diameter, ks_max=max(ds.model.ks), pad=lp.pad,
                               edge_width=lp.edge_width) if applied else stack[:])
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "lowpass": {"applied": applied, "diameter": lp.diameter, "pad": lp.pad}})


stage.run(snakemake, main)  # noqa: F821
