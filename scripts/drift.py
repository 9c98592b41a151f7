"""Rule `drift`: measure drift on the pre-filtered stack, apply it to the raw stack.

Streamed at bounded memory: the measurement reads the pre-filtered Zarr frame by frame
(emdenoise.drift.measure_drift: a running leave-one-out sum, a few float64 frames), the
aligned stack is written block by block (drift.aligned_blocks, filters.BLOCK_BYTES of
frames per block and per shard), so peak memory does not grow with the number of frames.
"""
import numpy as np

from emdenoise import drift, filters, io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    raw, attrs = io.read_zarr(smk.input.raw)  # lazy: read frame by frame
    if "prefiltered" in smk.input.keys():
        pre, _ = io.read_zarr(smk.input.prefiltered)
        shifts, check = drift.measure_drift(pre, upsample=ds.drift.upsample,
                                            min_peak_z=ds.drift.min_peak_z, return_info=True)
        if check["status"] in ("interpolated", "unmeasurable"):
            stage.log.warning("drift %s: frames %s have no significant correlation peak (z < %s)",
                              check["status"], check["unreliable_frames"], check["min_peak_z"])
    else:  # drift correction disabled (tilt series by default): identity alignment
        shifts, check = np.zeros((raw.shape[0], 2)), {"status": "off"}
    info = drift.plan_shifts(shifts, raw.shape, mode=ds.drift.apply)
    table = drift.drift_table(shifts, info["applied"], info["residual"], check)
    with io.atomic_path(smk.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(smk.output.plot) as tmp:
        drift.plot_drift(table, tmp)
    record = {"enabled": ds.drift_enabled, "mode": info["mode"], "crop_yx": [int(v) for v in info["crop"]],
              "max_shift_px": float(np.abs(shifts).max()) if len(shifts) else 0.0, "check": check,
              "still": drift.still_axes(shifts)}
    shape = drift.aligned_shape(info, raw.shape, ds.drift.crop)
    k = filters.block_frames(shape[1:])
    io.write_zarr_blocks(smk.output.aligned, shape, drift.aligned_blocks(raw, info, crop=ds.drift.crop, frames=k), k,
                         pixel_size=attrs.get("pixel_size"), attrs={**attrs, "drift": record})


stage.run(snakemake, main)  # noqa: F821
