# Apply a trained model to the whole aligned stack: T frames out for T frames in.


rule infer:
    input:
        stack=f"{RESULTS}/{{ds}}/aligned.zarr",
        model=lambda wildcards: model_path(wildcards.ds, wildcards.model),
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    output:
        intermediate(directory(f"{RESULTS}/{{ds}}/{{model}}/denoised_raw.zarr")),
    wildcard_constraints:
        model="wcvd(_kt[0-9]+)?(_ctx)?|shine|pretrained",
    params:
        cfg=stage("kind", "infer"),
    log:
        f"{RESULTS}/logs/{{ds}}/infer_{{model}}.log",
    threads: 2
    resources:
        gpu=gpu_slots("infer"),
        mem_mb=mem_mb(0, 4000),  # tiles of at most chunked.MAX_TILE_BYTES per worker; tilt series: frame blocks
        runtime=runtime(120, 10),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/infer.py"
