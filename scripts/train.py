"""Rule `train`: self-supervised training of the dataset's blind-spot model."""
import numpy as np
import torch

from emdenoise import io, stage, train


def main(smk):
    ds = smk.params.dataset
    torch.set_num_threads(max(1, smk.threads))
    aligned, _ = io.read_zarr(smk.input[0])
    ckpt = train.train_model(np.asarray(aligned[:], dtype=np.float32), ds.model.wcvd_params(), ds.train,
                             log_csv=smk.output.log_csv,
                             progress=lambda row: stage.log.info("epoch %s", row))
    ckpt["dataset"] = ds.name
    train.save_checkpoint(ckpt, smk.output.model)


stage.run(snakemake, main)  # noqa: F821
