"""Rule `prefilter`: pre-denoise the raw stack so drift can be measured on low-dose data."""
from emdenoise import filters, io, stage


def main(smk):
    ds = smk.params.dataset
    raw, attrs = io.read_zarr(smk.input[0])
    out = filters.prefilter(raw[:], method=ds.prefilter.method, sigma=ds.prefilter.sigma)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "prefilter": {"method": ds.prefilter.method, "sigma": ds.prefilter.sigma}})


stage.run(snakemake, main)  # noqa: F821
