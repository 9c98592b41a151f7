# Raw frames (TIFF, MRC, NPY, Zarr, folder, DM3/DM4, SER/EMI, EMD, EER) -> float32 (T, Y, X)
# Zarr with metadata and the file's calibration.
# EER grouping is passed only for EER input: editing it must not re-ingest a TIFF.


rule ingest:
    input:
        lambda wildcards: dataset(wildcards).path,
    output:
        directory(f"{RESULTS}/{{ds}}/raw.zarr"),
    params:
        cfg=stage(
            "name", "kind", "pixel_size", "frames",
            lambda ds, wc: ["eer_group", "eer_upsampling"] if str(ds.path).lower().endswith(".eer") else [],
        ),
    log:
        f"{RESULTS}/logs/{{ds}}/ingest.log",
    resources:
        mem_mb=mem_mb(1, 2000),  # frame blocks; a reader that is not lazy holds its file
        runtime=runtime(30, 5),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/ingest.py"


rule ingest_truth:
    input:
        lambda wildcards: dataset(wildcards).ground_truth,
    output:
        directory(f"{RESULTS}/{{ds}}/truth.zarr"),
    params:
        cfg=stage(
            "name", "kind", "pixel_size", "frames",
            lambda ds, wc: ["eer_group", "eer_upsampling"] if str(ds.path).lower().endswith(".eer") else [],
        ),
    log:
        f"{RESULTS}/logs/{{ds}}/ingest_truth.log",
    resources:
        mem_mb=mem_mb(1, 2000),
        runtime=runtime(30, 5),
    conda:
        "../../envs/emdenoise.yaml"
    script:
        "../../scripts/ingest.py"
