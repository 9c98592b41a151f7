# The dataset's denoised stack: the configured model's, or for `model: auto` the candidate
# with the lower uMSE (no ground truth needed; emdenoise.metrics.select_model).


rule select:
    input:
        unpack(candidate_stacks),
        raw=f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        denoised=directory(f"{RESULTS}/{{ds}}/denoised.zarr"),
        model=f"{RESULTS}/{{ds}}/model.pt",
        choice=f"{RESULTS}/{{ds}}/model_choice.json",
    params:
        cfg=stage("name", "model.name", "metrics.temporal_radius"),
        candidates=lambda wildcards: dataset(wildcards).candidates,
    log:
        f"{RESULTS}/logs/{{ds}}/select.log",
    resources:
        mem_mb=4000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/select.py"
