"""Rule `infer`: the trained model applied to every frame of the aligned stack."""
import torch

from emdenoise import infer, io, stage, train


def main(smk):
    ds = smk.params.dataset
    torch.set_num_threads(max(1, smk.threads))
    stack, attrs = io.read_zarr(smk.input.stack)
    model, ckpt = train.load_checkpoint(smk.input.model, device=ds.infer.device)
    out = infer.denoise(model, ckpt, stack[:], device=ds.infer.device, batch_frames=ds.infer.batch_frames)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "method": ds.model.name, "model_checkpoint": str(smk.input.model)})


stage.run(snakemake, main)  # noqa: F821
