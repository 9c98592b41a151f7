"""Rule `report`: all datasets' metrics in one CSV, plus a Markdown and a self-contained
HTML page (overview table, then per dataset: panels at one contrast, residuals, spectra,
line profile, per-frame uPSNR, training curves, model choice, disk use; emdenoise.report).

The rule runs after each dataset's export, so the disk use of results/{dataset}/ is the
run's footprint for it (provenance.json, a few kB, may be written after).
"""
from pathlib import Path

from emdenoise import report, stage


def main(smk):
    footprints = {ds: report.footprint(Path(metrics).parent, smk.params.inputs[ds])
                  for ds, metrics in zip(smk.params.datasets, smk.input.metrics)}
    for ds, fp in footprints.items():
        stage.log.info("%s: %.1f MiB in %d files on disk, %.2f x the input", ds, fp["bytes"] / 2**20, fp["files"],
                       fp["x_input"])
    report.write_report(smk.params.datasets, smk.input, smk.output, choices=smk.params.choices,
                        train_logs=smk.params.train_logs, footprints=footprints)


stage.run(snakemake, main)  # noqa: F821
