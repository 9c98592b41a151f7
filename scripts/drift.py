"""Rule `drift`: measure drift on the pre-filtered stack, apply it to the raw stack."""
import numpy as np

from emdenoise import drift, io, stage
from emdenoise.config import stage_config


def main(smk):
    ds = stage_config(smk.params.cfg)
    raw, attrs = io.read_zarr(smk.input.raw)
    stack = np.asarray(raw[:], dtype=np.float32)
    if "prefiltered" in smk.input.keys():
        pre, _ = io.read_zarr(smk.input.prefiltered)
        shifts, check = drift.measure_drift(np.asarray(pre[:]), upsample=ds.drift.upsample,
                                            min_peak_z=ds.drift.min_peak_z, return_info=True)
        if check["status"] in ("interpolated", "unmeasurable"):
            stage.log.warning("drift %s: frames %s have no significant correlation peak (z < %s)",
                              check["status"], check["unreliable_frames"], check["min_peak_z"])
    else:  # drift correction disabled (tilt series by default): identity alignment
        shifts, check = np.zeros((stack.shape[0], 2)), {"status": "off"}
    aligned, info = drift.apply_shifts(stack, shifts, mode=ds.drift.apply, crop=ds.drift.crop)
    table = drift.drift_table(shifts, info["applied"], info["residual"], check)
    with io.atomic_path(smk.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with io.atomic_path(smk.output.plot) as tmp:
        drift.plot_drift(table, tmp)
    record = {"enabled": ds.drift_enabled, "mode": info["mode"], "crop_yx": [int(v) for v in info["crop"]],
              "max_shift_px": float(np.abs(shifts).max()) if len(shifts) else 0.0, "check": check}
    io.write_zarr(smk.output.aligned, aligned, pixel_size=attrs.get("pixel_size"), attrs={**attrs, "drift": record})


stage.run(snakemake, main)  # noqa: F821
