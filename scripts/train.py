"""Rule `train`: self-supervised training of one blind-spot model (WCVD or SHINE)."""
import json
from pathlib import Path

import numpy as np
import torch

from emdenoise import checkpoint, io, pipeline, stage, train
from emdenoise.config import stage_config


def main(smk):
    ds, name = stage_config(smk.params.cfg), smk.wildcards.model
    torch.set_num_threads(max(1, smk.threads))
    aligned, attrs = io.read_zarr(smk.input.stack)
    blindspot = json.loads(open(smk.input.blindspot).read())["blindspot"]
    stage.log.info("training %s: %s", name, pipeline.model_params(ds, name, blindspot, n_frames=aligned.shape[0]))
    # a resume state beside the outputs (not one of them: Snakemake would delete it with a
    # failed job): a job killed at the time limit continues from it when resubmitted
    resume = Path(smk.output.model).with_name("train_state.pt")
    if resume.exists():
        stage.log.info("resuming from %s if it matches this run", resume)
    ckpt = pipeline.train_candidate(np.asarray(aligned[:], dtype=np.float32), ds, name, blindspot,
                                    log_csv=smk.output.log_csv, progress=lambda row: stage.log.info("%s", train.epoch_line(row)),
                                    resume=resume, data_info={"pixel_size": attrs.get("pixel_size")})
    checkpoint.save_checkpoint(ckpt, smk.output.model)


stage.run(snakemake, main)  # noqa: F821
