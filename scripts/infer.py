"""Rule `infer`: the trained model applied to every frame, Zarr to Zarr at bounded memory.

Movies stream through chunked inference (emdenoise.chunked.infer_zarr); tilt series are
cut into overlapping tiles stitched with a blending window (emdenoise.infer.denoise_tiled).
A model trained on several datasets (`model.train_on`) is applied with this dataset's
own normalisation (emdenoise.checkpoint.for_stack). A pretrained model (`model.checkpoint`) is checked against the data first
(emdenoise.pipeline.check_fit): a misfit is logged as a warning, a non-blind model refused.
"""
import json

from emdenoise import checkpoint, chunked, infer, io, pipeline, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    cfg = ds.infer
    model, ckpt = checkpoint.load_checkpoint(smk.input.model)  # refuses a model that is not blind
    src, src_attrs = io.read_zarr(smk.input.stack)
    attrs = {"method": smk.wildcards.model, "model_checkpoint": str(smk.input.model),
             "model_kind": ckpt.get("model", "wcvd"), "temporal_reach": model.params.halo_t,
             "ks_max": max(ckpt["model_params"].get("ks", [7])), "blind_radius": int(ckpt.get("blind_radius", 0)),
             "precision": str(infer.inference_dtype(model, cfg.device, cfg.precision)).removeprefix("torch.")}
    if ckpt.get("reach_choice"):  # the reach model.context: auto chose (pipeline.choose_reach), for select
        attrs["reach_choice"] = ckpt["reach_choice"]
    ckpt = checkpoint.for_stack(ckpt, src)  # one model for several datasets: this one's own statistics
    if ckpt.get("normalise") == "per_dataset":
        stage.log.info("model trained on %s; normalised with this dataset's statistics %s",
                       ", ".join(ckpt.get("train_on") or []), ckpt["normalisation"])
    if smk.wildcards.model == "pretrained":
        spot = json.loads(open(smk.input.blindspot).read())["blindspot"]
        for problem in pipeline.check_fit(ckpt, src, src_attrs.get("pixel_size"), blindspot=spot):
            stage.log.warning("model %s may not fit this data: %s", smk.input.model, problem)
    if ds.kind == "tilt_series":
        # stitched blocks of frames go straight to the store: memory does not grow with T
        with io.ZarrStackWriter(smk.output[0], src.shape, pixel_size=src_attrs.get("pixel_size"),
                                attrs={**src_attrs, **attrs,
                                       "tiling": {"tile": cfg.tilt_tile, "overlap": cfg.tilt_overlap}}) as out:
            infer.denoise_tiled(model, ckpt, src, tile=cfg.tilt_tile, overlap=cfg.tilt_overlap, device=cfg.device,
                                batch_frames=cfg.batch_frames, precision=cfg.precision, out=out)
        return
    tile = None if cfg.tile is None else (cfg.batch_frames, cfg.tile, cfg.tile)
    stats = chunked.infer_zarr(model, ckpt, smk.input.stack, smk.output[0], device=cfg.device, tile=tile,
                               workers=cfg.workers or smk.threads, scheduler_address=cfg.scheduler_address,
                               batch_frames=cfg.batch_frames, attrs=attrs, precision=cfg.precision)
    stage.log.info("inference: %s", stats)


stage.run(snakemake, main)  # noqa: F821
