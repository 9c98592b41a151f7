import errno
import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

import emdenoise.config as emcfg
import emdenoise.stage as emstage
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


def intermediate(path):
    """An output nobody reads after the next stage: Snakemake temp() unless the config
    keeps intermediates (``keep_intermediates``, default true: exact re-runs)."""
    return path if CFG.keep_intermediates else temp(path)
DATASETS = sorted(CFG.datasets)
BASELINES = ["gaussian2d", "gaussian3d"]


wildcard_constraints:
    ds="|".join(re.escape(d) for d in DATASETS),


GPUS_VISIBLE = emstage.gpus_visible()


def gpu_slots(stage_name):
    """A rule's `gpu` resource (`DatasetConfig.gpu_jobs`: 1 unless the dataset's device is
    cpu; 0 on a machine without a GPU, `stage.gpus_visible`, so CPU-only workstations run
    trainings side by side). The workstation profile caps `gpu` at 1 (profiles/default), so
    `--cores 32` never puts two trainings on one GPU; a SLURM job gets its own GPU
    (profiles/slurm sets it per rule: the submit host's own GPUs do not matter)."""

    def slots(wildcards):
        return dataset(wildcards).gpu_jobs(stage_name) if GPUS_VISIBLE else 0

    return slots


def input_megabytes(input):
    """MB of the job's input stacks as float32 (`emdenoise.stage.stack_megabytes`)."""
    stacks = [p for p in input if not p.endswith((".json", ".csv", ".pt", ".png"))]
    for p in stacks:
        if not os.path.exists(p):  # made by an earlier job: Snakemake asks again once it exists
            raise FileNotFoundError(errno.ENOENT, "not made yet", p)
    return sum(emstage.stack_megabytes(p) for p in stacks)


def mem_mb(copies, base=1000, most=None):
    """A rule's `mem_mb`: `base` MB plus `copies` float32 copies of its input stacks
    (sizes read when the job is scheduled; at most `most` MB where the stage streams
    larger stacks), doubled on each retry (`emdenoise.stage.job_memory_mb`; retries:
    profiles/slurm). Stages that stream their stacks whatever the size take copies=0."""

    def resource(wildcards, input, attempt):
        held = copies * input_megabytes(input)
        return emstage.job_memory_mb(held if most is None else min(held, most), 1, base, attempt)

    return resource


def runtime(minutes, per_gb=0):
    """A rule's `runtime` (minutes): `minutes` plus `per_gb` minutes per GB of its input
    stacks (float32), doubled on each retry (`emdenoise.stage.job_runtime_min`). The rates
    are ~3x what bench/bench_memory.py measured on 2 CPU cores."""

    def resource(wildcards, input, attempt):
        return emstage.job_runtime_min(input_megabytes(input) if per_gb else 0, minutes, per_gb, attempt)

    return resource


def dataset(wildcards):
    """The typed DatasetConfig of the rule's {ds} (for inputs; scripts get stage())."""
    return CFG.datasets[wildcards.ds]


def stage(*sections):
    """A rule's `params:` entry: the {ds} settings its script reads, as a plain dict.

    sections: str | callable. A DatasetConfig field ("drift", "kind"), one setting
    ("model.name"), or a function (DatasetConfig, wildcards) -> list[str] for settings
    that matter only in some cases (one prefilter method, one {model}). Snakemake records
    plain params, so an edit of any of them re-runs the rule and what follows; the script
    reads them with emcfg.stage_config, which refuses sections that were not passed.
    Returns a function of wildcards -> dict.
    """

    def params(wildcards):
        ds = dataset(wildcards)
        names = [n for s in sections for n in (s(ds, wildcards) if callable(s) else [s])]
        return emcfg.stage_params(ds, *names)

    return params


def prefilter_settings(ds, wildcards):
    return emcfg.prefilter_settings(ds)


def model_settings(ds, wildcards):
    return emcfg.model_settings(ds, wildcards.model)


def lowpass_settings(ds, wildcards):
    return emcfg.lowpass_settings(ds, wildcards.model)


def has_truth(ds):
    return CFG.datasets[ds].ground_truth is not None


def candidates(ds):
    """Models trained for a dataset: [wcvd], [shine], for `auto` wcvd, wcvd_ctx (temporal
    context; wcvd_kt<long_kt> when set) and shine, [] for `none`."""
    return CFG.datasets[ds].candidates


def select_candidates(ds):
    """What `select` chooses from: the trained models, and for `auto` also the Gaussian 3D
    tuned without ground truth (`classical`, no checkpoint) and their `ensemble`."""
    return CFG.datasets[ds].select_candidates


def ensemble_members(wildcards):
    """The ensemble's members, key their name: each network's blind output (before its
    low-pass and own pixel) and the classical candidate's stack (its blind version is
    computed from its recorded settings)."""
    ds = wildcards.ds
    return {**{m: f"{RESULTS}/{ds}/{m}/denoised_raw.zarr" for m in candidates(ds)},
            "classical": f"{RESULTS}/{ds}/classical/denoised.zarr"}


def methods(ds):
    """Denoised stacks compared in the metrics table, besides the raw frames."""
    return BASELINES + select_candidates(ds)


def method_stacks(wildcards):
    ds = wildcards.ds
    return {m: f"{RESULTS}/{ds}/{m}/denoised.zarr" if m in select_candidates(ds) else f"{RESULTS}/{ds}/{m}.zarr"
            for m in methods(ds)}


def checkpoints(ds):
    """Each trained model's checkpoint, key model_<name>."""
    return {f"model_{m}": model_path(ds, m) for m in candidates(ds)}


def model_path(ds, model):
    """A candidate's checkpoint: trained for the dataset, trained once for several
    (`model.train_on`: results/_shared/<group>/), or the configured one (`model.checkpoint`)."""
    if model == "pretrained":
        return CFG.datasets[ds].model.checkpoint
    if ds in CFG.train_groups:
        return f"{RESULTS}/_shared/{emcfg.group_key(CFG.train_groups[ds])}/{model}/model.pt"
    return f"{RESULTS}/{ds}/{model}/model.pt"


# models shared by several datasets (`model.train_on`): group key -> the datasets they
# train on, and -> every dataset involved (trained on or applied to)
TRAIN_GROUPS = {emcfg.group_key(m): m for m in CFG.train_groups.values()}
GROUP_DATASETS = {
    key: sorted(set(members) | {d for d, m in CFG.train_groups.items() if m == members})
    for key, members in TRAIN_GROUPS.items()
}


def group_stage(wildcards):
    """`params:` of a shared training: the settings of the first dataset applying it
    (emdenoise.config.train_groups checked that all of them agree)."""
    users = sorted(d for d, m in CFG.train_groups.items() if emcfg.group_key(m) == wildcards.group)
    ds = CFG.datasets[users[0]]
    return emcfg.stage_params(ds, "train", *emcfg.model_settings(ds, wildcards.model))


def candidate_stacks(wildcards):
    """Each select candidate's denoised stack (key: its name) and each model's checkpoint."""
    ds = wildcards.ds
    stacks = {m: f"{RESULTS}/{ds}/{m}/denoised.zarr" for m in select_candidates(ds)}
    return {**stacks, **checkpoints(ds)}


def export_ext(ds):
    """Denoised stacks are exported in the input's family: MRC for MRC input, else TIFF."""
    path = CFG.datasets[ds].path.lower()
    return "mrc" if path.endswith((".mrc", ".mrcs", ".st", ".ali", ".rec", ".map")) else "tif"


def export_path(ds):
    """The exported denoised stack: results/{ds}/denoised.tif|.mrc; a tilt series follows
    IMOD's basename convention, results/{ds}/{ds}_denoised.mrc with {ds}_denoised.tlt
    beside it (what etomo looks for next to a stack)."""
    if CFG.datasets[ds].kind == "tilt_series":
        return f"{RESULTS}/{ds}/{ds}_denoised.{export_ext(ds)}"
    return f"{RESULTS}/{ds}/denoised.{export_ext(ds)}"


def dataset_outputs(ds):
    """Everything a dataset's run delivers (requested by `rule all` via the report)."""
    outs = [f"{RESULTS}/{ds}/metrics.csv", f"{RESULTS}/{ds}/provenance.json"]
    if candidates(ds):
        outs.append(export_path(ds))
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
    if candidates(ds):
        inputs.update(checkpoints(ds))  # provenance records the chosen one's (none for `classical`)
        inputs["choice"] = f"{RESULTS}/{ds}/model_choice.json"
        inputs["denoised"] = f"{RESULTS}/{ds}/denoised.zarr"
        inputs["export"] = export_path(ds)
    return inputs


def model_choices(wildcards=None):
    return {ds: f"{RESULTS}/{ds}/model_choice.json" for ds in DATASETS if candidates(ds)}


def train_logs(wildcards=None):
    """Each trained candidate's training log, by dataset and model (the report's curves)."""
    return {ds: {m: os.path.join(os.path.dirname(model_path(ds, m)), "train_log.csv") for m in candidates(ds) if m != "pretrained"}
            for ds in DATASETS if candidates(ds)}  # a pretrained model was trained elsewhere


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
