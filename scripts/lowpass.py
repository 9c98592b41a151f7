"""Rule `lowpass`: the post-processing of a model's method (emdenoise.pipeline.postprocess).

Every network: its own pixel given back with the weight that minimises the error
(emdenoise.pipeline.unblind, `unblind.enabled`). WCVD then: circular FFT low-pass (WCVD paper, SM 2), its diameter chosen by uMSE against the
aligned raw movie when `lowpass.diameter: auto`; SHINE's method has none: its output
passes through unchanged.

Before that, the model's own output (blind to each pixel and its noise-correlated
neighbours) is scored against the aligned movie: its self-supervised loss
(`n2s_loss` in the attributes, emdenoise.metrics.self_supervised_loss; `n2s_loss_frames`
per frame, for the report) is what `select` compares between the candidates.

Streamed: the stacks stay lazy (Zarr); the loss and the uMSE scores read them frame by
frame and the low-passed output is computed and written one block of frames at a time
(io.write_zarr, 256 MB blocks): peak memory ~ 3 float32 copies of one block.
"""

from emdenoise import io, metrics, pipeline, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)  # nothing for SHINE (common.smk: lowpass_settings)
    stack, attrs = io.read_zarr(smk.input.denoised)  # lazy, as is everything below
    raw, _ = io.read_zarr(smk.input.raw)
    per_frame = metrics.self_supervised_loss_per_frame(stack, raw)
    loss = float(per_frame.mean())
    out, record = pipeline.postprocess(stack, ds, smk.wildcards.model, raw, attrs.get("temporal_reach"),
                                       model_kind=attrs.get("model_kind"), ks_max=attrs.get("ks_max"), loss=loss)
    stage.log.info("self-supervised loss of the model's output %.6g; post-processing: %s", loss, record)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "lowpass": record, "n2s_loss": loss, "n2s_loss_frames": per_frame.tolist()})


stage.run(snakemake, main)  # noqa: F821
