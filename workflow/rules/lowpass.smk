# FFT low-pass of the network output (WCVD paper) and export for Fiji / IMOD.


rule lowpass:
    input:
        f"{RESULTS}/{{ds}}/denoised_raw.zarr",
    output:
        directory(f"{RESULTS}/{{ds}}/denoised.zarr"),
    params:
        dataset=dataset,
    log:
        f"{RESULTS}/logs/{{ds}}/lowpass.log",
    resources:
        mem_mb=4000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/lowpass.py"


rule export:
    input:
        f"{RESULTS}/{{ds}}/denoised.zarr",
    output:
        f"{RESULTS}/{{ds}}/denoised.{{ext}}",
    wildcard_constraints:
        ext="tif|mrc",
    params:
        dataset=dataset,
    log:
        f"{RESULTS}/logs/{{ds}}/export_{{ext}}.log",
    resources:
        mem_mb=4000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/export.py"
