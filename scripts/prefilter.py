"""Rule `prefilter`: pre-denoise the raw stack so drift can be measured on low-dose data."""
from emdenoise import io, pipeline, stage
from emdenoise.config import plain, stage_config


def main(smk):
    # the rule passes only the chosen method's settings (common.smk: prefilter_settings)
    ds = stage_config(smk.params.cfg)
    pf = ds.prefilter
    raw, attrs = io.read_zarr(smk.input[0])
    settings = {}
    if pf.method == "gaussian2d":
        settings["sigma"] = pf.sigma
    elif pf.method == "wcid":  # WCID trains its own epochs with the other `train` settings
        settings.update(wcid_params=ds.model.wcvd_params(dims=2), train_params=ds.train.replace(epochs=pf.epochs))
    out = pipeline.prefilter(raw[:], method=pf.method, **settings)
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "prefilter": plain(pf)})


stage.run(snakemake, main)  # noqa: F821
