# Drift measured on the pre-filtered stack, applied (whole pixels by default) to the raw one.


rule drift:
    input:
        unpack(drift_inputs),
    output:
        aligned=directory(f"{RESULTS}/{{ds}}/aligned.zarr"),
        table=f"{RESULTS}/{{ds}}/drift.csv",
        plot=report(
            f"{RESULTS}/{{ds}}/drift.png",
            caption="../report/drift.rst",
            category="Drift",
            labels={"dataset": "{ds}"},
        ),
    params:
        cfg=stage("drift", "kind"),
    log:
        f"{RESULTS}/logs/{{ds}}/drift.log",
    resources:
        mem_mb=mem_mb(0, 2500),  # frame by frame: a running leave-one-out sum, written by blocks
        runtime=runtime(30, 20),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/drift.py"


rule align_truth:
    input:
        truth=f"{RESULTS}/{{ds}}/truth.zarr",
        table=f"{RESULTS}/{{ds}}/drift.csv",
        aligned=f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        directory(f"{RESULTS}/{{ds}}/truth_aligned.zarr"),
    params:
        cfg=stage("drift.apply", "drift.crop", "ground_truth"),
    log:
        f"{RESULTS}/logs/{{ds}}/align_truth.log",
    resources:
        mem_mb=mem_mb(0, 2000),  # written by frame blocks (drift.aligned_blocks)
        runtime=runtime(30, 5),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/align_truth.py"
