"""Rule `export`: denoised stack as ImageJ TIFF (Fiji) or MRC (IMOD), pixel size kept."""
from emdenoise import io, stage


def main(smk):
    stack, attrs = io.read_zarr(smk.input[0])
    io.write_stack(smk.output[0], stack[:], pixel_size=attrs.get("pixel_size"),
                   metadata={k: attrs[k] for k in ("dataset", "method", "source", "sha256") if k in attrs})


stage.run(snakemake, main)  # noqa: F821
