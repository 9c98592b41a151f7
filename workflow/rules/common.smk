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


def model_name(ds):
    """The dataset's denoising model, or None for a baselines-only run."""
    name = CFG.datasets[ds].model.name
    return None if name == "none" else name


def methods(ds):
    """Denoised stacks compared in the metrics table, besides the raw frames."""
    return BASELINES + ([model_name(ds)] if model_name(ds) else [])


def method_stacks(wildcards):
    model = model_name(wildcards.ds)
    return {m: f"{RESULTS}/{wildcards.ds}/{'denoised' if m == model else m}.zarr" for m in methods(wildcards.ds)}


def export_ext(ds):
    """Denoised stacks are exported in the input's family: MRC for MRC input, else TIFF."""
    path = CFG.datasets[ds].path.lower()
    return "mrc" if path.endswith((".mrc", ".mrcs", ".st", ".ali", ".rec", ".map")) else "tif"


def dataset_outputs(ds):
    """Everything a dataset's run delivers (requested by `rule all` via the report)."""
    outs = [f"{RESULTS}/{ds}/metrics.csv", f"{RESULTS}/{ds}/provenance.json"]
    if model_name(ds):
        outs.append(f"{RESULTS}/{ds}/denoised.{export_ext(ds)}")
    return outs


def provenance_inputs(wildcards):
    ds = wildcards.ds
    inputs = {
        "raw": f"{RESULTS}/{ds}/raw.zarr",
        "aligned": f"{RESULTS}/{ds}/aligned.zarr",
        "drift": f"{RESULTS}/{ds}/drift.csv",
        "blindspot": f"{RESULTS}/{ds}/blindspot.json",
        "metrics": f"{RESULTS}/{ds}/metrics.csv",
    }
    if model_name(ds):
        inputs["model"] = f"{RESULTS}/{ds}/model.pt"
        inputs["denoised"] = f"{RESULTS}/{ds}/denoised.zarr"
        inputs["export"] = f"{RESULTS}/{ds}/denoised.{export_ext(ds)}"
    return inputs


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
