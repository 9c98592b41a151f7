# Classical baselines of the WCVD paper: Gaussian 2D per frame and Gaussian 3D.


rule baselines:
    input:
        f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        gaussian2d=directory(f"{RESULTS}/{{ds}}/gaussian2d.zarr"),
        gaussian3d=directory(f"{RESULTS}/{{ds}}/gaussian3d.zarr"),
    params:
        cfg=stage("baselines"),
    log:
        f"{RESULTS}/logs/{{ds}}/baselines.log",
    resources:
        mem_mb=mem_mb(0, 2000),  # streamed by frame blocks (filters.filter_blocks)
        runtime=runtime(30, 10),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/baselines.py"
