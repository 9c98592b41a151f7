"""The report: built from small synthetic inputs made here (no pipeline run), then opened in
headless Chromium (Debian package ``chromium``; .ci/run installs it): no console errors,
every image decoded, the overview table sorts on click, a screenshot renders."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from emdenoise import report  # noqa: E402
from emdenoise.filters import gaussian3d  # noqa: E402
from emdenoise.metrics import (compute_metrics, select_model, self_supervised_loss,  # noqa: E402
                               self_supervised_loss_per_frame)
from test_metrics import moving_particles  # noqa: E402

NO_CHROMIUM = "headless Chromium not found: install the Debian package (apt-get install -y chromium; .ci/run does)"


def _tiny_png(path: Path, title: str) -> str:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [0, 1, 0])
    ax.set_title(title)
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return str(path)


def make_dataset(root: Path, name: str, noisy, clean, methods: dict, *, chosen: str | None,
                 blindspot: int = 3, drift_px: float = 2.0) -> dict:
    """One dataset's pipeline outputs as the report rule reads them. methods: name ->
    (stack, reach); the networks among them get a training log. Returns report inputs."""
    d = root / name
    d.mkdir(parents=True)
    stacks = {"raw": noisy, **{m: s for m, (s, _) in methods.items()}}
    reaches = {"raw": 0, **{m: r for m, (_, r) in methods.items()}}
    table = compute_metrics(stacks, noisy, truth=clean, reaches=reaches, temporal_radius=2)
    cands = [m for m in methods if m not in ("gaussian2d", "gaussian3d")]
    report.write_diagnostics(d / "diagnostics", stacks, table=table, truth=clean,
                             frame_losses={m: self_supervised_loss_per_frame(stacks[m], noisy) for m in cands}
                             if len(cands) > 1 else None)
    table.insert(0, "dataset", name)
    table.to_csv(d / "metrics.csv", index=False)
    report.plot_preview(stacks, d / "preview.png", truth=clean, title=name)
    t = np.arange(noisy.shape[0])
    pd.DataFrame({"frame": t, "dy": drift_px * t / t[-1], "dx": 0.0}).to_csv(d / "drift.csv", index=False)
    (d / "blindspot.json").write_text(json.dumps({"blindspot": blindspot, "estimate_used": "frame", "rule": "test"}))
    out = {"metrics": d / "metrics.csv", "previews": d / "preview.png", "drift": _tiny_png(d / "drift.png", "drift"),
           "noise": _tiny_png(d / "noise.png", "noise"), "blindspot": d / "blindspot.json",
           "diagnostics": d / "diagnostics", "drift_csv": d / "drift.csv", "choice": None, "logs": {}}
    if chosen:
        cands = [m for m in methods if m not in ("gaussian2d", "gaussian3d")]
        choice = select_model({m: self_supervised_loss(stacks[m], noisy) for m in cands})
        choice["chosen"] = chosen  # as if select had chosen it (the over-smoothing one, for the test)
        if chosen == "wcvd":  # the record scripts/select.py copies from a context network's checkpoint
            choice["reach_choice"] = {"reaches": [12, 35], "val_loss": [1.01, 1.0], "z": [0.0, -1.2], "min_z": 2.0,
                                      "chosen": 12, "blocks": 64}
        (d / "model_choice.json").write_text(json.dumps({"dataset": name, "candidates": cands, **choice}))
        out["choice"] = d / "model_choice.json"
        for m in cands:
            if m != "classical":
                epochs = np.arange(1, 11)
                pd.DataFrame({"epoch": epochs, "train_loss": 1 / epochs, "val_loss": 1.1 / epochs, "lr": 1e-3,
                              "seconds": epochs}).to_csv(d / f"train_log_{m}.csv", index=False)
                out["logs"][m] = str(d / f"train_log_{m}.csv")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three datasets: a dynamic movie whose chosen output over-smooths in time (residual
    warning, large drift); the same movie with a good model (blind spot 9 x 9); a short
    movie, baselines only (too few frames for the uMSE radius)."""
    root = tmp_path_factory.mktemp("report")
    noisy, clean = moving_particles(n_frames=36, seed=0)  # T >= 2 * 12 + 11: uMSE scores reach 12
    rng = np.random.default_rng(3)
    good = (clean + rng.normal(scale=0.3, size=clean.shape)).astype(np.float32)
    methods = {"gaussian2d": (gaussian3d(noisy, (0.0, 1.0, 1.0)), 0), "gaussian3d": (gaussian3d(noisy, 1.0), 2),
               "classical": (gaussian3d(noisy, (6.0, 0.0, 0.0)), 12), "wcvd": (good, 1)}
    short_noisy, short_clean = moving_particles(n_frames=7, seed=1)
    sets = {
        "dyn_oversmoothed": make_dataset(root, "dyn_oversmoothed", noisy, clean, methods, chosen="classical",
                                         drift_px=14.0),
        "dyn_good": make_dataset(root, "dyn_good", noisy, clean, methods, chosen="wcvd", blindspot=9),
        "short_baselines": make_dataset(root, "short_baselines", short_noisy, short_clean,
                                        {"gaussian2d": (gaussian3d(short_noisy, (0.0, 1.0, 1.0)), 0),
                                         "gaussian3d": (gaussian3d(short_noisy, 1.0), 2)}, chosen=None),
    }
    names = list(sets)
    inputs = SimpleNamespace(**{k: [str(sets[n][k]) for n in names] for k in
                                ("metrics", "previews", "drift", "noise", "blindspot", "diagnostics", "drift_csv")})
    outputs = SimpleNamespace(table=str(root / "report" / "metrics.csv"), markdown=str(root / "report" / "report.md"),
                              html=str(root / "report" / "report.html"))
    np.save(root / "dyn_good_input.npy", noisy)  # stands for the dataset's raw input
    summaries = report.write_report(names, inputs, outputs,
                                    choices={n: str(s["choice"]) for n, s in sets.items() if s["choice"]},
                                    train_logs={n: s["logs"] for n, s in sets.items() if s["logs"]},
                                    footprints={"dyn_good": report.footprint(root / "dyn_good",
                                                                             root / "dyn_good_input.npy")})
    return Path(outputs.html), {s["dataset"]: s for s in summaries}


def test_overview_rows_and_warnings(built):
    page, rows = built
    bad, good, short = rows["dyn_oversmoothed"], rows["dyn_good"], rows["short_baselines"]
    assert bad["status"] == "check" and bad["chosen"] == "classical"
    assert any(w.startswith("residual structure in classical") for w in bad["warnings"]), bad
    assert any("drift 14.0 px" in w for w in bad["warnings"])
    assert good["chosen"] == "wcvd" and not any("residual" in w for w in good["warnings"]), good
    assert any("blind spot 9×9" in w for w in good["warnings"])
    assert good["disk_x_input"] > 0.1 and good["disk_files"] > 10 and bad["disk_x_input"] != bad["disk_x_input"]
    assert "Disk (× input)" in page.read_text()
    # uPSNR against frames 13 away (the classical candidate's reach sets the radius) is biased
    # on a moving scene: the gain may be negative even for the near-perfect model, which is
    # why the residual check exists
    assert np.isfinite(good["gain_db"]) and good["best_classical"] in report.CLASSICAL
    assert short["status"] == "baselines only" and short["chosen"] is None
    assert any(w.startswith("too few frames (7)") for w in short["warnings"]), short


def test_page_is_self_contained_and_small(built):
    page, _ = built
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), [r[:40] for r in refs]
    assert "http://" not in text and "https://" not in text and "@import" not in text
    assert "Content-Security-Policy" in text
    assert len(text) < 3 * 400_000, len(text)  # three datasets, a few hundred kB each at most
    for name in ("dyn_oversmoothed", "dyn_good", "short_baselines"):
        assert f'id="ds-{name}"' in text
    for what in ("Residual raw − denoised", "power spectra", "line profile", "uPSNR per frame", "training curves",
                 "Model choice", "self-supervised loss per frame"):
        assert what in text, what
    # the reach model.context: auto chose, with why
    assert ("wcvd_ctx reach 12 frames each side: 35 frames were not significantly better (z -1.2; needs &lt;= -2), "
            "and at this reach uMSE can still check the output") in text


def _results(dom: str) -> dict:
    m = re.search(r'<pre id="test-results"[^>]*>(.*?)</pre>', dom, re.S)
    assert m and m.group(1), dom[-2000:]
    return json.loads(html.unescape(m.group(1)))


def test_in_headless_chromium(built, tmp_path):
    exe = report.find_chromium()
    if exe is None:
        pytest.skip(NO_CHROMIUM)
    page, rows = built
    dom, console = report.browse(page, fragment="#selftest")
    res = _results(dom)
    assert res["errors"] == [] and console == [], (res["errors"], console)
    n_img = page.read_text().count("<img ")
    assert len(res["images"]) == n_img > 20
    bad = [im["alt"] for im in res["images"] if not (im["complete"] and im["naturalWidth"] > 0)]
    assert not bad, bad
    assert len(res["sort"]) == len(report._OVERVIEW_COLUMNS)
    assert all(s["ascending"] and s["descending"] for s in res["sort"]), res["sort"]
    # the DOM after the self-test's last click: overview rows ascending by gain (NaN first)
    table = re.search(r'<table id="overview-table".*?</table>', dom, re.S).group(0)
    col = [c for c, _, _ in report._OVERVIEW_COLUMNS].index("gain_db")
    gains = [re.findall(r'<td data-sort="([^"]*)"', tr)[col] for tr in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]]
    values = [float(g) if g else -np.inf for g in gains]
    assert len(values) == 3 and values == sorted(values), gains
    names = re.findall(r'<a href="#ds-([^"]+)"', table)
    expected = sorted(rows, key=lambda n: rows[n]["gain_db"] if rows[n]["gain_db"] == rows[n]["gain_db"] else -np.inf)
    assert names == expected
    # one dataset alone (#section=NAME), and a screenshot that shows something
    dom, console = report.browse(page, fragment="#section=dyn_good")
    assert re.search(r'<section class="dataset" id="ds-dyn_oversmoothed" style="display: none;', dom)
    assert re.search(r'<section class="dataset" id="ds-dyn_good"(?! style="display: none)', dom) and console == []
    assert re.search(r'<div class="top" style="display: none;', dom)
    shot = tmp_path / "shot.png"
    report.browse(page, fragment="#section=dyn_good", screenshot=shot, size=(1000, 800))
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (800, 1000) and img.std() > 10


def test_lattice_peak_profile_and_crop_on_a_known_pattern():
    yy, xx = np.mgrid[:128, :160].astype(np.float64)
    angle, period = np.radians(30.0), 8.0
    fringes = np.cos(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    img = np.zeros_like(fringes)
    img[40:104, 80:144] = fringes[40:104, 80:144]  # the lattice fills one 64 px patch
    img += 0.2 * np.random.default_rng(0).normal(size=img.shape)
    peak = report.lattice_peak(img)
    assert peak["period_px"] == pytest.approx(period, rel=0.05)
    assert abs(((peak["angle_deg"] - 30.0) + 90) % 180 - 90) < 4  # the wave vector, up to its sign
    assert peak["contrast"] > 20
    y0, x0, h, w = report.crop_box(img, 64)
    assert (h, w) == (64, 64) and abs(y0 - 40) <= 4 and abs(x0 - 80) <= 4
    pos, vals = report.line_profile(fringes, (72, 112), (peak["ky"], peak["kx"]), 32)
    spectrum = np.abs(np.fft.rfft(vals - vals.mean()))  # across the fringes: 32 px hold 4 periods
    assert np.argmax(spectrum) == 4
    freq, power = report.radial_spectrum(fringes[None])
    assert freq[np.nanargmax(power)] == pytest.approx(1 / period, abs=0.01)


def test_radial_spectrum_equals_the_full_plane_ring_means_frame_by_frame():
    """The half-plane spectrum (rfft2, the mirrored columns counted twice), read one frame
    at a time from any iterable, gives the full plane's ring means: the reference is
    computed here with fft2 over the whole plane, for even and odd widths."""
    rng = np.random.default_rng(2)
    for shape in ((3, 40, 64), (2, 37, 51)):
        frames = rng.normal(size=shape) + np.sin(0.6 * np.arange(shape[2]))
        ny, nx = shape[1:]
        win = np.outer(np.hanning(ny), np.hanning(nx))
        power = sum(np.abs(np.fft.fft2((f - f.mean()) * win)) ** 2 for f in frames) / (len(frames) * np.sum(win ** 2))
        k = np.hypot(*np.meshgrid(np.fft.fftfreq(ny), np.fft.fftfreq(nx), indexing="ij"))
        n_bins = min(ny, nx) // 2
        idx = np.digitize(k.ravel(), np.linspace(0, 0.5, n_bins + 1)) - 1
        keep = idx < n_bins
        want = np.bincount(idx[keep], power.ravel()[keep], n_bins) / np.bincount(idx[keep], minlength=n_bins)
        freq, got = report.radial_spectrum(f for f in frames)  # a generator: one frame at a time
        assert len(freq) == n_bins
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_preview_shrinks_large_frames_by_area_averaging():
    img = np.arange(40 * 30, dtype=np.float32).reshape(40, 30)
    assert report.shrink(img, 64) is img  # small enough: untouched
    small = report.shrink(img, 16)  # factor 3: 13 x 10 blocks, the last row dropped
    assert small.shape == (13, 10)
    np.testing.assert_allclose(small[1, 2], img[3:6, 6:9].mean())


def test_overview_warns_when_drift_could_not_be_measured():
    import pandas as pd
    from emdenoise.drift import drift_table
    from emdenoise.report import dataset_summary
    table = pd.DataFrame({"dataset": ["d", "d"], "method": ["raw", "classical"], "upsnr_db": [20.0, 24.0],
                          "umse_radius": [3, 3], "umse_valid": [True, True]})
    zeros = np.zeros((6, 2))
    rows = {}
    for status, bad in (("measured", []), ("interpolated", [2]), ("unmeasurable", [1, 2, 3, 4, 5])):
        check = {"peak_z": [9.0] * 6, "unreliable_frames": bad, "status": status, "min_peak_z": 6.0}
        df = drift_table(zeros, zeros, zeros, check)
        rows[status] = dataset_summary("d", table, choice={"chosen": "classical"}, index={"n_frames": 40},
                                       drift=df, blindspot=None)["warnings"]
    assert not any("drift" in w for w in rows["measured"])
    assert any("interpolated in 1 frame" in w for w in rows["interpolated"])
    assert any("not measurable" in w for w in rows["unmeasurable"])


def test_overview_of_a_short_movie_whose_choice_uMSE_cannot_check():
    """20 frames: the tuned Gaussian (reach 64) and the context network (reach 9) have no
    uMSE. The tuned Gaussian chosen: gain 0 over the best classical (itself), no warning (a
    linear filter invents nothing); the network chosen: gain unknown (not a gain over the
    weaker baselines) and a warning that only its self-supervised loss vouches for it."""
    import pandas as pd
    from emdenoise.report import dataset_summary
    table = pd.DataFrame({"dataset": ["d"] * 4, "method": ["raw", "gaussian3d", "wcvd_ctx", "classical"],
                          "reach": [0, 2, 9, 64], "upsnr_db": [20.0, 30.0, float("nan"), float("nan")],
                          "umse_radius": [2] * 4, "umse_valid": [True, True, False, False]})
    loss = {"wcvd_ctx": 1.01, "classical": 1.0}
    gauss = dataset_summary("d", table, choice={"chosen": "classical", "loss": loss}, index={"n_frames": 20},
                            drift=None, blindspot=None)
    assert gauss["best_classical"] == "classical" and gauss["gain_db"] == 0.0 and gauss["warnings"] == []
    net = dataset_summary("d", table, choice={"chosen": "wcvd_ctx", "loss": loss}, index={"n_frames": 20},
                          drift=None, blindspot=None)
    assert np.isnan(net["gain_db"]) and net["status"] == "check"
    assert any("wcvd_ctx reaches 9 frames" in w and "self-supervised" in w for w in net["warnings"]), net


def test_the_report_says_why_there_is_no_gain_figure():
    """The real Au movie with the Gaussian mix as the classical candidate: it reaches 64
    frames each side, uMSE can check 44 on 100 frames, so the overview's gain is NaN; the
    dataset's paragraph says why and gives the loss difference instead. Nothing when the
    candidate has a uPSNR, is within the radius, or is the choice."""
    import pandas as pd
    from emdenoise import metrics
    from emdenoise.report import _unscored, dataset_summary
    table = pd.DataFrame({"dataset": ["d"] * 3, "method": ["raw", "wcvd_ctx", "classical"],
                          "reach": [0, 44, 64], "upsnr_db": [25.95, 39.906, float("nan")],
                          "umse_radius": [44] * 3, "umse_valid": [True, True, False]})
    choice = {"chosen": "wcvd_ctx", "loss": {"wcvd_ctx": 1758.24, "classical": 1769.11}}
    assert np.isnan(dataset_summary("d", table, choice=choice, index={"n_frames": 100}, drift=None,
                                    blindspot=None)["gain_db"])
    s = _unscored(table, choice, 100)
    assert s.startswith("No gain figure: the classical candidate reaches 64 frames each side") and "100 frames" in s
    assert "(radius 44)" in s and "wcvd_ctx's error is 10.87 (squared units) below it" in s, s
    assert s.endswith("(model.max_reach: checkable keeps every candidate within what uMSE can check.)")
    assert "above it" in _unscored(table, {**choice, "loss": {"wcvd_ctx": 1770.0, "classical": 1769.11}}, 100)
    assert _unscored(table.assign(upsnr_db=[25.95, 39.906, 39.9]), choice, 100) is None  # a gain exists
    assert _unscored(table, {**choice, "chosen": "classical"}, 100) is None  # gain 0 by definition
    assert metrics.unscored_sentence(choice, 40, 100, 44) is None  # within the radius


def test_the_report_says_when_umse_and_the_self_supervised_loss_disagree():
    """The real Au movie: the context network's loss is 12.5 below the tuned Gaussian's
    (z -102) while its uMSE at radius 44 is 1.1 above (-0.065 dB uPSNR). The overview
    warns and the sentence gives both differences; when the checks agree, nothing."""
    import pandas as pd
    from emdenoise import metrics
    from emdenoise.report import dataset_summary
    table = pd.DataFrame({"dataset": ["d"] * 3, "method": ["raw", "wcvd_ctx", "classical"],
                          "reach": [0, 44, 8], "umse": [1827.5, 73.48, 72.39],
                          "upsnr_db": [25.95, 39.906, 39.971], "umse_radius": [44] * 3, "umse_valid": [True] * 3})
    choice = {"chosen": "wcvd_ctx", "loss": {"wcvd_ctx": 1758.24, "classical": 1770.74}}
    s = metrics.disagreement_sentence(choice, dict(zip(table.method, table.umse)), 44)
    assert "12.5 (squared units) below" in s and "1.09 above" in s and "-0.06 dB uPSNR" in s and "45" in s, s
    row = dataset_summary("d", table, choice=choice, index={"n_frames": 100}, drift=None, blindspot=None)
    assert row["status"] == "check" and any("disagree" in w for w in row["warnings"]), row
    agree = table.assign(umse=[1827.5, 71.0, 72.39])
    row = dataset_summary("d", agree, choice=choice, index={"n_frames": 100}, drift=None, blindspot=None)
    assert not any("disagree" in w for w in row["warnings"]), row
    assert metrics.disagreement_sentence({**choice, "chosen": "classical"}, dict(zip(table.method, table.umse)),
                                         44) is None
