# FFT low-pass of the WCVD output (WCVD paper, SM 2; SHINE has none) and export for Fiji / IMOD.


rule lowpass:
    input:
        denoised=f"{RESULTS}/{{ds}}/{{model}}/denoised_raw.zarr",
        raw=f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        directory(f"{RESULTS}/{{ds}}/{{model}}/denoised.zarr"),
    wildcard_constraints:
        model="wcvd(_kt[0-9]+)?(_ctx)?|shine|pretrained",
    params:
        cfg=stage(lowpass_settings),
    log:
        f"{RESULTS}/logs/{{ds}}/lowpass_{{model}}.log",
    resources:
        mem_mb=mem_mb(0, 2500),  # streamed by blocks of frames
        runtime=runtime(30, 10),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/lowpass.py"


rule export:
    input:
        f"{RESULTS}/{{ds}}/denoised.zarr",
    output:
        f"{RESULTS}/{{ds}}/{{stem}}.{{ext}}",
    wildcard_constraints:
        ext="tif|mrc",
        stem="denoised|[A-Za-z0-9_.-]+_denoised",
    log:
        f"{RESULTS}/logs/{{ds}}/export_{{stem}}_{{ext}}.log",
    resources:
        mem_mb=mem_mb(0, 2000),  # written block by block
        runtime=runtime(30, 5),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/export.py"
