# Apply a trained model to the whole aligned stack: T frames out for T frames in.


rule infer:
    input:
        stack=f"{RESULTS}/{{ds}}/aligned.zarr",
        model=f"{RESULTS}/{{ds}}/{{model}}/model.pt",
    output:
        directory(f"{RESULTS}/{{ds}}/{{model}}/denoised_raw.zarr"),
    wildcard_constraints:
        model="wcvd(_kt[0-9]+)?|shine",
    params:
        cfg=stage("kind", "infer"),
    log:
        f"{RESULTS}/logs/{{ds}}/infer_{{model}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/infer.py"
