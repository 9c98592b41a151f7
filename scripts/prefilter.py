"""Rule `prefilter`: pre-denoise the raw stack so drift can be measured on low-dose data.

Zarr to Zarr at bounded memory (emdenoise.pipeline.prefilter_zarr): the Gaussian by
blocks of whole frames; WCID trained on the stack (crops read from the store above
1 GB) and applied by chunked inference; the values of pipeline.prefilter on the whole array.
"""
from emdenoise import pipeline, stage
from emdenoise.config import plain, stage_config


def main(smk):
    # the rule passes only the chosen method's settings (common.smk: prefilter_settings)
    ds = stage_config(smk.params.cfg)
    pf = ds.prefilter
    settings = {}
    if pf.method == "gaussian2d":
        settings["sigma"] = pf.sigma
    elif pf.method == "wcid":  # WCID trains its own epochs with the other `train` settings
        settings.update(wcid_params=ds.model.wcvd_params(dims=2), train_params=ds.train.replace(epochs=pf.epochs))
    pipeline.prefilter_zarr(smk.input[0], smk.output[0], method=pf.method, attrs={"prefilter": plain(pf)}, **settings)


stage.run(snakemake, main)  # noqa: F821
