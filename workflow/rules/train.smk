# Per-dataset self-supervised training of a blind-spot model (GPU when present).
# {model} is wcvd or shine; `model: auto` trains both (see select.smk).


rule train:
    input:
        stack=f"{RESULTS}/{{ds}}/aligned.zarr",
        blindspot=f"{RESULTS}/{{ds}}/blindspot.json",
    output:
        model=f"{RESULTS}/{{ds}}/{{model}}/model.pt",
        log_csv=f"{RESULTS}/{{ds}}/{{model}}/train_log.csv",
    wildcard_constraints:
        model="wcvd(_kt[0-9]+)?(_ctx)?|shine",
    params:
        cfg=stage("name", "train", model_settings),
    log:
        f"{RESULTS}/logs/{{ds}}/train_{{model}}.log",
    threads: 2
    resources:
        gpu=gpu_slots("train"),
        mem_mb=mem_mb(3, 4000),
        runtime=runtime(240),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/train.py"
