"""Rule `metrics`: uMSE, uPSNR, SNR (+ PSNR, SSIM with ground truth) per method; preview image;
the report's per-dataset diagnostics (panels, residuals, spectra, line profile, per-frame
uPSNR: emdenoise.report.write_diagnostics), which need the stacks.

One uMSE radius for all methods: max(metrics.temporal_radius, widest temporal reach)
(emdenoise.metrics.compute_metrics); the table records it (umse_radius, snr_lag).

The stacks stay lazy (Zarr): every metric reads them frame by frame, so memory is a few
frames per method, whatever the number of frames (see emdenoise.report.write_diagnostics).
"""
from emdenoise import io, metrics, pipeline, report, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    raw, _ = io.read_zarr(smk.input.raw)
    stacks, reaches = {"raw": raw}, {"raw": 0}
    frame_losses = {}  # auto's candidates: the per-frame loss their stage recorded (what select compared)
    for method in smk.params.methods:
        arr, attrs = io.read_zarr(smk.input[method])
        stacks[method] = arr
        reaches[method] = pipeline.temporal_reach(ds, method, attrs)
        if "n2s_loss_frames" in attrs:
            frame_losses[method] = attrs["n2s_loss_frames"]
    truth = None
    if "truth" in smk.input.keys():
        truth = io.read_zarr(smk.input.truth)[0]
    table = metrics.compute_metrics(stacks, raw, truth=truth, peak=ds.metrics.peak, reaches=reaches,
                                    temporal_radius=ds.metrics.temporal_radius)
    r = int(table.umse_radius.iloc[0])
    stage.log.info("uMSE radius %d (reaches %s): reference frames t-%d, t+%d, t+%d; SNR from frames t, t+%d",
                   r, reaches, r + 1, r + 1, r + 2, 2 * r + 1)
    if not table.umse_valid.all():
        stage.log.warning("only %d frames: uMSE radius %d; no uMSE / SNR for %s (their reach is longer)",
                          raw.shape[0], r, ", ".join(table.method[~table.umse_valid]))
    table.insert(0, "dataset", ds.name)
    with io.atomic_path(smk.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(smk.output.preview) as tmp:
        report.plot_preview(stacks, tmp, truth=truth, title=ds.name)
    with io.atomic_path(smk.output.diagnostics) as tmp:
        index = report.write_diagnostics(tmp, stacks, table=table, truth=truth, peak=ds.metrics.peak,
                                         frame_losses=frame_losses if len(frame_losses) > 1 else None)
    for m, rs in index["residual"].items():
        if rs["structure"]:
            stage.log.warning("residual of %s holds structure: low-pass excess %.2f, signal share %.3f +- %.3f",
                              m, rs["spatial"], rs["signal_share"], rs["signal_share_se"])


stage.run(snakemake, main)  # noqa: F821
