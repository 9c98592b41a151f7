# The classical filter tuned without ground truth (Noise2Self): Gaussian 3D, NL-means of a
# temporal average or a Gaussian mix (per class or gated per pixel), whichever scores lower;
# a `model: auto` candidate.


rule classical:
    input:
        stack=f"{RESULTS}/{{ds}}/aligned.zarr",
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    output:
        denoised=directory(f"{RESULTS}/{{ds}}/classical/denoised.zarr"),
        tuning=f"{RESULTS}/{{ds}}/classical/tuning.csv",
    params:
        cfg=stage("name", "model.max_reach"),
    log:
        f"{RESULTS}/logs/{{ds}}/classical.log",
    threads: 2  # the mix's gate (torch)
    resources:
        mem_mb=mem_mb(0, 2500),  # streamed by tiles (filters.TILE_BUDGET)
        runtime=runtime(30, 25),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/classical.py"
