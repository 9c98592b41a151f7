# One table and one page for all datasets.


rule report:
    input:
        metrics=expand(f"{RESULTS}/{{ds}}/metrics.csv", ds=DATASETS),
        previews=expand(f"{RESULTS}/{{ds}}/preview.png", ds=DATASETS),
        drift=expand(f"{RESULTS}/{{ds}}/drift.png", ds=DATASETS),
        noise=expand(f"{RESULTS}/{{ds}}/noise_correlation.png", ds=DATASETS),
        blindspot=expand(f"{RESULTS}/{{ds}}/blindspot.json", ds=DATASETS),
        choices=list(model_choices().values()),
    output:
        table=report(
            f"{RESULTS}/report/metrics.csv",
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"table": "all datasets"},
        ),
        markdown=f"{RESULTS}/report/report.md",
        html=f"{RESULTS}/report/report.html",
    params:
        datasets=DATASETS,
        choices=model_choices(),
    log:
        f"{RESULTS}/logs/report.log",
    resources:
        mem_mb=1000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/report.py"
