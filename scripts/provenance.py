"""Rule `provenance`: write provenance.json for one dataset (emdenoise.provenance)."""
from pathlib import Path

from emdenoise import io, provenance, stage
from emdenoise.config import stage_config


def _model_info(path) -> dict:
    import torch  # only where a model was chosen

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: ckpt[k] for k in ("model", "model_params", "train_params", "normalisation", "device",
                                 "best_epoch", "best_val_loss", "code_version", "torch_version", "shine_size")
            if k in ckpt}


def main(smk):
    ds = stage_config(smk.params.cfg)
    _, attrs = io.read_zarr(smk.input.raw)
    model_info = {}
    choice = {}
    if "choice" in smk.input.keys():
        import json

        choice = json.loads(Path(smk.input.choice).read_text())
    chosen = choice.get("chosen")
    if f"model_{chosen}" in smk.input.keys():  # none when a classical filter was chosen
        model_info = _model_info(smk.input[f"model_{chosen}"])
    elif chosen == "ensemble":  # every member that is a network (the classical one has no checkpoint)
        members = choice["ensemble"]["members"]
        model_info = {"ensemble": {"members": members, "kind": choice["ensemble"]["kind"],
                                   "models": {m: _model_info(smk.input[f"model_{m}"]) for m in members
                                              if f"model_{m}" in smk.input.keys()}}}
    logs = sorted(p for p in Path(smk.params.logs).glob("*.log") if p.name != "provenance.log")
    outputs = [v for k, v in smk.input.items() if k != "raw"] + [smk.input.raw]
    record = provenance.build_record(ds, input_path=attrs.get("source", ds.path), input_sha256=attrs.get("sha256"),
                                     outputs=outputs, logs=logs, model_info=model_info,
                                     acquisition={k: attrs[k] for k in ("format", "pixel_size", "pixel_size_source",
                                                                        "pixel_size_file", *io.CALIBRATION_KEYS)
                                                  if attrs.get(k) is not None})
    provenance.write_record(record, smk.output[0])


stage.run(snakemake, main)  # noqa: F821
