"""Rule `lowpass`: circular FFT low-pass of the network output (WCVD paper, SM 2)."""
from emdenoise import filters, io, stage


def main(smk):
    lp = smk.params.dataset.lowpass
    stack, attrs = io.read_zarr(smk.input[0])
    out = filters.fft_lowpass(stack[:], diameter=lp.diameter, ks_max=max(smk.params.dataset.model.ks),
                              pad=lp.pad, edge_width=lp.edge_width) if lp.enabled else stack[:]
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "lowpass": {"enabled": lp.enabled, "diameter": lp.diameter, "pad": lp.pad}})


stage.run(snakemake, main)  # noqa: F821
