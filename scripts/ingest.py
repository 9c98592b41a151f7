"""Rules `ingest` / `ingest_truth`: raw frames in any supported format -> float32 Zarr.

The file's calibration (pixel size, frame time, dose, tilt angles) goes into the Zarr
attributes and so into provenance; the config's `pixel_size` overrides the file's.
"""
from emdenoise import io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    io.ingest(smk.input[0], smk.output[0], pixel_size=ds.pixel_size, frames=ds.frames,
              extra_attrs={"dataset": ds.name, "kind": ds.kind},
              **{k: getattr(ds, k) for k in ("eer_group", "eer_upsampling") if k in smk.params.cfg})


stage.run(snakemake, main)  # noqa: F821
