# `model: auto` with `model.ensemble`: the candidates' blind outputs combined pixel by pixel
# (a small MLP gate fitted on the movie, cross-fitted by frame parity; emdenoise.pipeline.ensemble),
# one more candidate for `select`.


rule ensemble:
    input:
        unpack(ensemble_members),
        stack=f"{RESULTS}/{{ds}}/aligned.zarr",
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    output:
        directory(f"{RESULTS}/{{ds}}/ensemble/denoised.zarr"),
    params:
        members=lambda wildcards: list(ensemble_members(wildcards)),
    log:
        f"{RESULTS}/logs/{{ds}}/ensemble.log",
    threads: 2  # the gate (torch)
    resources:
        mem_mb=mem_mb(0, 3000),  # frame blocks of every member; the classical filter's blind pass by tiles
        runtime=runtime(30, 20),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/ensemble.py"
