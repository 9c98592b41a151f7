import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

import emdenoise.config as emcfg
from emdenoise.errors import InputError

min_version("9.0")


# The demo config only when none is given: `--configfile my.yaml` must not inherit the
# demo datasets (Snakemake would merge the two).
if not config:

    configfile: "config/config.yaml"



validate(config, "../schemas/config.schema.yaml")
try:
    CFG = emcfg.build(config)
except InputError as exc:  # one clear line instead of a traceback
    raise WorkflowError(f"emdenoise config: {exc}")

RESULTS = CFG.results
DATASETS = sorted(CFG.datasets)
BASELINES = ["gaussian2d", "gaussian3d"]


wildcard_constraints:
    ds="|".join(re.escape(d) for d in DATASETS),


def dataset(wildcards):
    """The typed DatasetConfig of the rule's {ds}."""
    return CFG.datasets[wildcards.ds]


def has_truth(ds):
    return CFG.datasets[ds].ground_truth is not None


def methods(ds):
    """Denoised stacks compared in the metrics table, besides the raw frames."""
    return BASELINES


def method_stacks(wildcards):
    return {m: f"{RESULTS}/{wildcards.ds}/{m}.zarr" for m in methods(wildcards.ds)}


def drift_inputs(wildcards):
    """Tilt series skip drift correction by default: then no pre-filtered stack is needed."""
    inputs = {"raw": f"{RESULTS}/{wildcards.ds}/raw.zarr"}
    if dataset(wildcards).drift_enabled:
        inputs["prefiltered"] = f"{RESULTS}/{wildcards.ds}/prefiltered.zarr"
    return inputs


def truth_stack(wildcards):
    if has_truth(wildcards.ds):
        return {"truth": f"{RESULTS}/{wildcards.ds}/truth_aligned.zarr"}
    return {}
