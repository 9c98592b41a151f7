"""Rule `infer`: the trained model applied to every frame, Zarr to Zarr at bounded memory.

Movies stream through chunked inference (emdenoise.chunked.infer_zarr); tilt series are
cut into overlapping tiles stitched with a blending window (emdenoise.infer.denoise_tiled).
"""
from emdenoise import checkpoint, chunked, infer, io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    cfg = ds.infer
    attrs = {"method": smk.wildcards.model, "model_checkpoint": str(smk.input.model)}
    if ds.kind == "tilt_series":
        stack, src_attrs = io.read_zarr(smk.input.stack)
        model, ckpt = checkpoint.load_checkpoint(smk.input.model, device=cfg.device)
        out = infer.denoise_tiled(model, ckpt, stack, tile=cfg.tilt_tile, overlap=cfg.tilt_overlap,
                                   device=cfg.device, batch_frames=cfg.batch_frames)
        attrs["temporal_reach"] = model.params.halo_t
        io.write_zarr(smk.output[0], out, pixel_size=src_attrs.get("pixel_size"),
                      attrs={**src_attrs, **attrs, "tiling": {"tile": cfg.tilt_tile, "overlap": cfg.tilt_overlap}})
        return
    tile = None if cfg.tile is None else (cfg.batch_frames, cfg.tile, cfg.tile)
    stats = chunked.infer_zarr(smk.input.model, None, smk.input.stack, smk.output[0], device=cfg.device, tile=tile,
                             workers=cfg.workers or smk.threads, scheduler_address=cfg.scheduler_address,
                             batch_frames=cfg.batch_frames, attrs=attrs)
    stage.log.info("inference: %s", stats)


stage.run(snakemake, main)  # noqa: F821
