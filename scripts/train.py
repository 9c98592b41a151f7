"""Rules `train` and `train_shared`: self-supervised training of one blind-spot model
(WCVD or SHINE) on one dataset, or on several at once (`model.train_on`).

Stacks up to emdenoise.train.IN_MEMORY_BYTES (float32, all together) are read into memory;
larger ones are read crop by crop from their Zarr stores (emdenoise.train.train_model; same
result, bounded memory).
"""
import json
from pathlib import Path

import numpy as np
import torch

from emdenoise import checkpoint, io, pipeline, stage, train
from emdenoise.config import stage_config


def training_stacks(paths):
    """The aligned stacks as float32 numpy when they fit in train.IN_MEMORY_BYTES together,
    else as lazy Zarr arrays; and the pixel size of the first (all opened once)."""
    arrays = [io.read_zarr(p) for p in paths]
    total = sum(4 * int(np.prod(a.shape)) for a, _ in arrays)
    in_memory = total <= train.IN_MEMORY_BYTES
    stacks = [np.asarray(a[:], dtype=np.float32) if in_memory else a for a, _ in arrays]
    if not in_memory:
        stage.log.info("%.0f MB of frames: training reads crops from the Zarr stores", total / 2**20)
    return stacks, arrays[0][1].get("pixel_size")


def main(smk):
    ds, name = stage_config(smk.params.cfg), smk.wildcards.model
    torch.set_num_threads(max(1, smk.threads))
    shared = "members" in smk.params.keys()
    paths = list(smk.input.stacks) if shared else [smk.input.stack]
    stacks, pixel_size = training_stacks(paths)
    spots = [json.loads(open(p).read())["blindspot"] for p in (smk.input.blindspots if shared else [smk.input.blindspot])]
    # a shared model must be blind to the widest noise correlation of every dataset it is
    # applied to, and its window must fit the shortest of them
    blindspot = max(spots)
    applied = [p for p in smk.input.applied if p not in paths] if shared else []  # datasets only applied to
    n_frames = min([s.shape[0] for s in stacks] + [io.read_zarr(p)[0].shape[0] for p in applied])
    # (model.context: auto then logs the reach it keeps: this one or the shorter one uMSE can check)
    stage.log.info("training %s%s: %s", name, f" on {', '.join(smk.params.members)}" if shared else "",
                   pipeline.model_params(ds, name, blindspot, n_frames=n_frames))
    # a resume state beside the outputs (not one of them: Snakemake would delete it with a
    # failed job): a job killed at the time limit continues from it when resubmitted
    resume = Path(smk.output.model).with_name("train_state.pt")
    if resume.exists():
        stage.log.info("resuming from %s if it matches this run", resume)
    ckpt = pipeline.train_candidate(stacks if shared else stacks[0], ds, name, blindspot,
                                    log_csv=smk.output.log_csv, progress=lambda row: stage.log.info("%s", train.epoch_line(row)),
                                    resume=resume, data_info={"pixel_size": pixel_size}, n_frames=n_frames,
                                    names=list(smk.params.members) if shared else None)
    checkpoint.save_checkpoint(ckpt, smk.output.model)


stage.run(snakemake, main)  # noqa: F821
