"""Rules `ingest` / `ingest_truth`: raw frames in any supported format -> float32 Zarr."""
from emdenoise import io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    io.ingest(smk.input[0], smk.output[0], pixel_size=ds.pixel_size, frames=ds.frames,
              extra_attrs={"dataset": ds.name, "kind": ds.kind})


stage.run(snakemake, main)  # noqa: F821
