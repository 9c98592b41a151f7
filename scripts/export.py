"""Rule `export`: denoised stack as ImageJ TIFF (Fiji) or MRC (IMOD), pixel size kept.

For tilt series the tilt angles read at ingest (.tlt / .rawtlt beside the MRC) are
written beside the output as <name>.tlt. A known frame time (s) becomes the TIFF's ImageJ
`finterval`.

Streamed: the Zarr stack is read and written in blocks of at most 256 MB of frames
(io.write_mrc / io.write_tiff), so memory does not grow with the number of frames.
"""
from emdenoise import io, stage


def main(smk):
    stack, attrs = io.read_zarr(smk.input[0])
    out = smk.output[0]
    if out.endswith(".mrc"):
        io.write_mrc(out, stack, pixel_size=attrs.get("pixel_size"), tilt_angles=attrs.get("tilt_angles"))
    else:
        io.write_tiff(out, stack, pixel_size=attrs.get("pixel_size"),
                      metadata={k: attrs[k] for k in ("dataset", "method", "source", "sha256", "frame_time") if k in attrs})


stage.run(snakemake, main)  # noqa: F821
