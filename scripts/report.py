"""Rule `report`: all datasets' metrics in one CSV, plus a Markdown and a self-contained
HTML page (overview table, then per dataset: panels at one contrast, residuals, spectra,
line profile, per-frame uPSNR, training curves, model choice; emdenoise.report)."""
from emdenoise import report, stage


def main(smk):
    report.write_report(smk.params.datasets, smk.input, smk.output, choices=smk.params.choices,
                        train_logs=smk.params.train_logs)


stage.run(snakemake, main)  # noqa: F821
