# What produced this dataset's results: config, code and package versions, checksums, times.


rule provenance:
    input:
        unpack(provenance_inputs),
    output:
        f"{RESULTS}/{{ds}}/provenance.json",
    params:
        cfg=stage(*emcfg.DATASET_SECTIONS),
        logs=lambda wildcards: f"{RESULTS}/logs/{wildcards.ds}",
    log:
        f"{RESULTS}/logs/{{ds}}/provenance.log",
    resources:
        mem_mb=1000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/provenance.py"
