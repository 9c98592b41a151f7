# Spatial noise-correlation heatmaps (SHINE) and the blind-spot size they ask for.


rule noise:
    input:
        f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        table=f"{RESULTS}/{{ds}}/noise_correlation.csv",
        plot=report(
            f"{RESULTS}/{{ds}}/noise_correlation.png",
            caption="../report/noise.rst",
            category="Noise correlation",
            labels={"dataset": "{ds}"},
        ),
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    params:
        cfg=stage("name", "noise"),
    log:
        f"{RESULTS}/logs/{{ds}}/noise.log",
    resources:
        mem_mb=mem_mb(0, 1500),  # reads only the frames of <= 5 adjacent pairs
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/noise.py"
