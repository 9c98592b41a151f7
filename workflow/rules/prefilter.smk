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
        mem_mb=mem_mb(2, 2000, most=1100),  # WCID trains in memory up to train.IN_MEMORY_BYTES
        runtime=runtime(60, 10),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/prefilter.py"
