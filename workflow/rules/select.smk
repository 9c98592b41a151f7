# The dataset's denoised stack: the configured model's, or for `model: auto` the candidate
# (WCVD, SHINE, the blind-tuned classical filter `classical`: Gaussian 3D or NL-means) with the lowest self-supervised
# (Noise2Self) loss of its blind output (no ground truth; emdenoise.metrics.select_model).


rule select:
    input:
        unpack(candidate_stacks),
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    output:
        denoised=directory(f"{RESULTS}/{{ds}}/denoised.zarr"),
        choice=f"{RESULTS}/{{ds}}/model_choice.json",
    params:
        cfg=stage("name", "model.name"),
        candidates=lambda wildcards: select_candidates(wildcards.ds),
    log:
        f"{RESULTS}/logs/{{ds}}/select.log",
    resources:
        mem_mb=mem_mb(0, 2000),  # the chosen stack copied by blocks
        runtime=runtime(30, 5),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/select.py"
