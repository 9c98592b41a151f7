# Per-dataset self-supervised training of the blind-spot model (GPU when present).


rule train:
    input:
        f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        model=f"{RESULTS}/{{ds}}/model.pt",
        log_csv=f"{RESULTS}/{{ds}}/train_log.csv",
    params:
        dataset=dataset,
    log:
        f"{RESULTS}/logs/{{ds}}/train.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/train.py"
