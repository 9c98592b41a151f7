"""Rule `prefilter`: pre-denoise the raw stack so drift can be measured on low-dose data."""
import dataclasses

from emdenoise import io, pipeline, stage


def main(smk):
    ds = smk.params.dataset
    pf = ds.prefilter
    raw, attrs = io.read_zarr(smk.input[0])
    out = pipeline.prefilter(raw[:], method=pf.method, sigma=pf.sigma, wcid_params=ds.model.wcvd_params(dims=2),
                            train_params=dataclasses.replace(ds.train, epochs=pf.epochs))
    io.write_zarr(smk.output[0], out, pixel_size=attrs.get("pixel_size"),
                  attrs={**attrs, "prefilter": dataclasses.asdict(pf)})


stage.run(snakemake, main)  # noqa: F821
