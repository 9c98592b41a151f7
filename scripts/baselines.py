"""Rule `baselines`: Gaussian 2D (per frame, temporal reach 0) and Gaussian 3D (t, y, x; temporal
kernel truncated at ceil(2 sigma_t) frames, its reach: emdenoise.filters.gaussian3d).

Streamed Zarr to Zarr by blocks of whole frames (emdenoise.filters.gaussian2d_blocks /
gaussian3d_blocks; the 3D filter reads its temporal reach on either side), each block
one shard of the output: peak memory ~ 3 float32 copies of (block + 2 reach) frames,
block = filters.BLOCK_BYTES of frames, plus the OME pyramid's 256 MB read blocks
(io.ZarrStackWriter), whatever the number of frames.
"""
from emdenoise import filters, io, stage
from emdenoise.config import stage_config


def write_blocks(path, shape, blocks, frames: int, pixel_size, attrs) -> None:
    """Write the (a, block) pairs of a streamed filter to an OME-Zarr whose shards are
    ``frames`` whole frames (each block fills whole shards: no read-modify-write)."""
    with io.ZarrStackWriter(path, shape, pixel_size=pixel_size, attrs=attrs, shards=(frames,) + tuple(shape[1:])) as w:
        for a, block in blocks:
            w[a:a + len(block)] = block


def main(smk):
    b = stage_config(smk.params.cfg).baselines
    aligned, attrs = io.read_zarr(smk.input[0])  # lazy: read block by block
    px = attrs.get("pixel_size")
    k = filters.block_frames(aligned.shape[1:])
    sigma3 = tuple(b.gaussian3d_sigma)
    write_blocks(smk.output.gaussian2d, aligned.shape, filters.gaussian2d_blocks(aligned, b.gaussian2d_sigma, k), k, px,
                 {**attrs, "method": "gaussian2d", "sigma": b.gaussian2d_sigma, "temporal_reach": 0})
    write_blocks(smk.output.gaussian3d, aligned.shape, filters.gaussian3d_blocks(aligned, sigma3, k), k, px,
                 {**attrs, "method": "gaussian3d", "sigma": list(sigma3),
                  "temporal_reach": filters.temporal_reach("gaussian3d", sigma=sigma3)})


stage.run(snakemake, main)  # noqa: F821
