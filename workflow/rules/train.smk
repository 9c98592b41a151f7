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
        mem_mb=mem_mb(2, 4000, most=1100),  # stack + normalised copy up to train.IN_MEMORY_BYTES, crops from Zarr above
        runtime=runtime(240),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/train.py"


# One model for several datasets (`model.train_on`): trained once on crops from all of
# them, each normalised with its own statistics; applied to each by `infer`.


rule train_shared:
    input:
        stacks=lambda wildcards: [f"{RESULTS}/{m}/aligned.zarr" for m in TRAIN_GROUPS[wildcards.group]],
        # every dataset the model is applied to: its blind spot must cover all of their
        # noise, its temporal window fit the shortest of them
        applied=lambda wildcards: [f"{RESULTS}/{d}/aligned.zarr" for d in GROUP_DATASETS[wildcards.group]],
        blindspots=lambda wildcards: [f"{RESULTS}/{d}/blindspot.json" for d in GROUP_DATASETS[wildcards.group]],
    output:
        model=f"{RESULTS}/_shared/{{group}}/{{model}}/model.pt",
        log_csv=f"{RESULTS}/_shared/{{group}}/{{model}}/train_log.csv",
    wildcard_constraints:
        model="wcvd(_kt[0-9]+)?(_ctx)?|shine",
        group="|".join(re.escape(k) for k in TRAIN_GROUPS) or "no-shared-model",
    params:
        cfg=group_stage,
        members=lambda wildcards: list(TRAIN_GROUPS[wildcards.group]),
    log:
        f"{RESULTS}/logs/_shared/{{group}}/train_{{model}}.log",
    threads: 2
    resources:
        gpu=lambda wildcards: CFG.datasets[GROUP_DATASETS[wildcards.group][0]].gpu_jobs("train") if GPUS_VISIBLE else 0,
        mem_mb=mem_mb(2, 4000, most=1100),
        runtime=runtime(240),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/train.py"
