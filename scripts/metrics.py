"""Rule `metrics`: uMSE, uPSNR, SNR (+ PSNR, SSIM with ground truth) per method; preview image."""
import numpy as np

from emdenoise import io, metrics, report, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    raw, _ = io.read_zarr(smk.input.raw)
    raw = np.asarray(raw[:], dtype=np.float32)
    stacks = {"raw": raw}
    for method in smk.params.methods:
        arr, _ = io.read_zarr(smk.input[method])
        stacks[method] = np.asarray(arr[:], dtype=np.float32)
    truth = None
    if "truth" in smk.input.keys():
        truth = np.asarray(io.read_zarr(smk.input.truth)[0][:], dtype=np.float32)
    radius = metrics.feasible_radius(raw.shape[0], ds.metrics.temporal_radius)
    if radius < ds.metrics.temporal_radius:
        stage.log.warning("only %d frames: uMSE temporal radius lowered from %d to %d (3D methods then look "
                          "better than they are)", raw.shape[0], ds.metrics.temporal_radius, radius)
    table = metrics.compute_metrics(stacks, raw, truth=truth, peak=ds.metrics.peak, temporal_radius=radius)
    table.insert(0, "dataset", ds.name)
    table["umse_radius"] = radius
    with io.atomic_path(smk.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(smk.output.preview) as tmp:
        report.plot_preview(stacks, tmp, truth=truth, title=ds.name)


stage.run(snakemake, main)  # noqa: F821
