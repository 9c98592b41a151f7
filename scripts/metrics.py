"""Rule `metrics`: uMSE, uPSNR, SNR (+ PSNR, SSIM with ground truth) per method; preview image."""
import numpy as np

from emdenoise import io, metrics, report, stage


def main(smk):
    ds = smk.params.dataset
    raw, _ = io.read_zarr(smk.input.raw)
    raw = np.asarray(raw[:], dtype=np.float32)
    stacks = {"raw": raw}
    for method in smk.params.methods:
        arr, _ = io.read_zarr(smk.input[method])
        stacks[method] = np.asarray(arr[:], dtype=np.float32)
    truth = None
    if "truth" in smk.input.keys():
        truth = np.asarray(io.read_zarr(smk.input.truth)[0][:], dtype=np.float32)
    table = metrics.compute_metrics(stacks, raw, truth=truth, peak=ds.metrics.peak)
    table.insert(0, "dataset", ds.name)
    with io.atomic_path(smk.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(smk.output.preview) as tmp:
        report.plot_preview(stacks, tmp, truth=truth, title=ds.name)


stage.run(snakemake, main)  # noqa: F821
