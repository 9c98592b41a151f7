# uMSE / uPSNR / SNR (and PSNR / SSIM against ground truth) per method, plus a preview and
# the report's per-dataset diagnostics (small PNG / CSV / JSON files that need the stacks).


rule metrics:
    input:
        unpack(method_stacks),
        unpack(truth_stack),
        raw=f"{RESULTS}/{{ds}}/aligned.zarr",
    output:
        table=f"{RESULTS}/{{ds}}/metrics.csv",
        preview=report(
            f"{RESULTS}/{{ds}}/preview.png",
            caption="../report/preview.rst",
            category="Previews",
            labels={"dataset": "{ds}"},
        ),
        diagnostics=directory(f"{RESULTS}/{{ds}}/diagnostics"),
    params:
        cfg=stage("name", "metrics"),
        methods=lambda wildcards: methods(wildcards.ds),
    log:
        f"{RESULTS}/logs/{{ds}}/metrics.log",
    resources:
        mem_mb=mem_mb(0, 3000),  # frame by frame; diagnostics hold a few frames per method
        runtime=runtime(30, 10),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/metrics.py"
