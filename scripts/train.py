"""Rule `train`: self-supervised training of one blind-spot model (WCVD or SHINE)."""
import json

import numpy as np
import torch

from emdenoise import io, stage, train
from emdenoise.config import stage_config


def main(smk):
    ds, name = stage_config(smk.params.cfg), smk.wildcards.model
    torch.set_num_threads(max(1, smk.threads))
    aligned, _ = io.read_zarr(smk.input.stack)
    if name == "shine":  # blind spot sized by the noise stage unless fixed in the config
        params = ds.shine.params(json.loads(open(smk.input.blindspot).read())["blindspot"])
    else:
        params = ds.model.wcvd_params()
    stage.log.info("training %s: %s", name, params)
    ckpt = train.train_model(np.asarray(aligned[:], dtype=np.float32), params, ds.train_params(name),
                             log_csv=smk.output.log_csv, progress=lambda row: stage.log.info("epoch %s", row))
    ckpt["dataset"] = ds.name
    train.save_checkpoint(ckpt, smk.output.model)


stage.run(snakemake, main)  # noqa: F821
