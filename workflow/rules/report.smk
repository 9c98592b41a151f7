# One table and one page for all datasets (per-dataset diagnostics come from the metrics rule).


rule report:
    input:
        metrics=expand(f"{RESULTS}/{{ds}}/metrics.csv", ds=DATASETS),
        previews=expand(f"{RESULTS}/{{ds}}/preview.png", ds=DATASETS),
        drift=expand(f"{RESULTS}/{{ds}}/drift.png", ds=DATASETS),
        noise=expand(f"{RESULTS}/{{ds}}/noise_correlation.png", ds=DATASETS),
        blindspot=expand(f"{RESULTS}/{{ds}}/blindspot.json", ds=DATASETS),
        choices=list(model_choices().values()),
        diagnostics=expand(f"{RESULTS}/{{ds}}/diagnostics", ds=DATASETS),
        drift_csv=expand(f"{RESULTS}/{{ds}}/drift.csv", ds=DATASETS),
        train_logs=[p for logs in train_logs().values() for p in logs.values()],
        # the exported stacks: the disk use is complete (but provenance.json, a few kB, which
        # any setting edit rewrites: depending on it would re-run the report for every edit)
        exports=[export_path(ds) for ds in DATASETS if candidates(ds)],
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
        train_logs=train_logs(),
        inputs={ds: CFG.datasets[ds].path for ds in DATASETS},
    log:
        f"{RESULTS}/logs/report.log",
    resources:
        mem_mb=1000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/report.py"
