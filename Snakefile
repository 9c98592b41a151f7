# emdenoise: raw EM frames -> aligned, analysed and denoised stacks + a report.
# This file is the table of contents; each stage lives in workflow/rules/<stage>.smk,
# scripts/<stage>.py and src/emdenoise/<module>.py.

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/prefilter.smk"
include: "workflow/rules/drift.smk"
include: "workflow/rules/noise.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/classical.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/lowpass.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/provenance.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        f"{RESULTS}/report/metrics.csv",
        f"{RESULTS}/report/report.html",
        [dataset_outputs(ds) for ds in DATASETS],
    default_target: True
