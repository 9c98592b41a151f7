# Pre-denoise (gaussian2d | wcid | none) used only to measure drift.


rule prefilter:
    input:
        f"{RESULTS}/{{ds}}/raw.zarr",
    output:
        intermediate(directory(f"{RESULTS}/{{ds}}/prefiltered.zarr")),
    params:
        cfg=stage(prefilter_settings),
    log:
        f"{RESULTS}/logs/{{ds}}/prefilter.log",
    resources:
        gpu=gpu_slots("prefilter"),
        mem_mb=mem_mb(3, 2000),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/prefilter.py"
