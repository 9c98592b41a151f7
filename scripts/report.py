"""Rule `report`: all datasets' metrics in one CSV, plus a Markdown and an HTML summary."""
from emdenoise import report, stage


def main(smk):
    report.write_report(smk.params.datasets, smk.input, smk.output, choices=smk.params.choices)


stage.run(snakemake, main)  # noqa: F821
