# Synthetic demo movies with known ground truth (emdenoise.synthetic); made only when missing.


rule demo:
    output:
        movie="resources/demo/{name}.{ext}",
        truth="resources/demo/{name}_truth.{ext}",
    wildcard_constraints:
        name="|".join(CFG.demo) or "^$",
        ext="tif|mrc|npy",
    params:
        demo=lambda wildcards: emcfg.plain(CFG.demo[wildcards.name]),
    log:
        f"{RESULTS}/logs/demo/{{name}}.{{ext}}.log",
    resources:
        mem_mb=1000,
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/demo.py"
