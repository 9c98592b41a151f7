"""Human-readable results: preview images, the combined metrics table, Markdown and HTML.

The HTML page embeds its images (base64) so it can be mailed or archived as one file.
"""
from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .io import atomic_path  # noqa: E402

METRIC_COLUMNS = ["dataset", "method", "umse", "upsnr_db", "snr_db", "psnr_db", "ssim", "umse_radius"]


def display_range(stacks: Mapping[str, np.ndarray], frame: int) -> tuple[float, float]:
    """One (low, high) display range for every panel of a preview.

    Taken from the 1st and 99th percentiles of the *denoised* panels (all of them
    together) so that every method, and the raw frame, is shown at the same contrast;
    raw noise then clips, which is the honest comparison.
    """
    pool = [np.asarray(s[frame]).ravel() for name, s in stacks.items() if name != "raw"]
    if not pool:
        pool = [np.asarray(stacks["raw"][frame]).ravel()]
    lo, hi = np.percentile(np.concatenate(pool), [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def plot_preview(stacks: Mapping[str, np.ndarray], png_path: str | os.PathLike, *,
                 truth: np.ndarray | None = None, title: str = "", frame: int | None = None) -> None:
    """Middle frame of every (T, Y, X) stack side by side, same grey scale; PNG."""
    panels = dict(stacks)
    if truth is not None:
        panels["ground truth"] = truth
    t = panels["raw"].shape[0] // 2 if frame is None else frame
    lo, hi = display_range(panels, t)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, s) in zip(axes[0], panels.items()):
        ax.imshow(np.asarray(s[t]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title}  frame {t}  (display range {lo:.3g}–{hi:.3g} for all panels)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90, format="png")
    plt.close(fig)


def collect_metrics(csv_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-dataset metrics tables; guarantees the standard columns."""
    table = pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True)
    for col in METRIC_COLUMNS:
        if col not in table:
            table[col] = np.nan
    rest = [c for c in table.columns if c not in METRIC_COLUMNS]
    return table[METRIC_COLUMNS + rest]


def _img(path: str | os.PathLike) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _fmt(table: pd.DataFrame) -> pd.DataFrame:
    return table.round({"umse": 5, "upsnr_db": 2, "snr_db": 2, "snr_corr": 4, "psnr_db": 2, "ssim": 4})


def write_report(datasets: Sequence[str], inputs, outputs, choices: Mapping[str, str] | None = None) -> None:
    """Write the combined CSV, report.md and report.html.

    inputs: object with lists ``metrics``, ``previews``, ``drift``, ``noise``,
    ``blindspot`` ordered like ``datasets``; outputs: ``table``, ``markdown``, ``html``;
    choices: dataset -> model_choice.json (which model denoised it, and why).
    """
    table = collect_metrics(inputs.metrics)
    with atomic_path(outputs.table) as tmp:
        table.to_csv(tmp, index=False)
    spots = [json.loads(Path(p).read_text()) for p in inputs.blindspot]
    md_dir = Path(outputs.markdown).parent
    md = ["# emdenoise report", "",
          "uMSE / uPSNR: WCVD paper eq. 1–2 from raw frames t−r−1, t+r+1, t+r+2, outside every method's "
          "temporal reach (r = umse_radius; lower uMSE, higher uPSNR is better). SNR: SHINE eq. 5 from the "
          "correlation snr_corr of output frames t and t+2r+1, whose input frames do not overlap. "
          "PSNR / SSIM only where a ground truth exists.", "",
          _fmt(table).to_markdown(index=False) if _has_tabulate() else _fmt(table).to_string(index=False), ""]
    body = ["<h1>emdenoise report</h1>", "<p>uMSE / uPSNR: WCVD paper eq. 1–2 from raw frames t−r−1, t+r+1, "
            "t+r+2, outside every method's temporal reach (r = umse_radius). SNR: SHINE eq. 5 from output "
            "frames t and t+2r+1 (no shared input frames). PSNR / SSIM against ground truth "
            "where one exists.</p>", _fmt(table).to_html(index=False, na_rep="–")]
    for i, name in enumerate(datasets):
        spot = spots[i]
        line = (f"Blind spot chosen: {spot.get('blindspot')}×{spot.get('blindspot')} "
                f"(estimate: {spot.get('estimate_used')}; rule: {spot.get('rule', '')})")
        radius = table.loc[table.dataset == name, "umse_radius"].dropna() if "umse_radius" in table else []
        if len(radius):
            r = int(radius.iloc[0])
            line += (f" uMSE radius {r}: reference frames t−{r + 1}, t+{r + 1}, t+{r + 2}; "
                     f"SNR from frames t and t+{2 * r + 1}.")
        if choices and name in choices:
            c = json.loads(Path(choices[name]).read_text())
            evidence = ", ".join(f"{m} {v:.4g}" for m, v in c.get("umse", {}).items())
            line += (f" Model: {c['chosen']} ({c['rule']}" + (f"; uMSE {evidence}" if evidence else "") + ").")
        md += [f"## {name}", "", line, ""]
        body += [f"<h2>{html.escape(name)}</h2>", f"<p>{html.escape(line)}</p>"]
        for label, key in (("Preview (same contrast in every panel)", "previews"),
                           ("Drift", "drift"), ("Noise correlation", "noise")):
            path = getattr(inputs, key)[i]
            md += [f"![{label}]({os.path.relpath(path, md_dir)})", ""]
            body += [f"<h3>{label}</h3>", _img(path)]
    with atomic_path(outputs.markdown) as tmp:
        Path(tmp).write_text("\n".join(md))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>emdenoise report</title>"
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            "</head><body>" + "\n".join(body) + "</body></html>")
    with atomic_path(outputs.html) as tmp:
        Path(tmp).write_text(page)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas.to_markdown needs it)
    except ImportError:
        return False
    return True
