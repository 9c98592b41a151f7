"""Screenshots of the report for the docs: the overview and one dataset's section.

    python bench/report_screenshots.py [results/report/report.html] [--out docs] [--section NAME]

Renders the page in headless Chromium (emdenoise.report.browse; Debian package
``chromium``) and writes ``<out>/report_overview.png`` and ``<out>/report_section.png``.
``make docs`` runs the demo pipeline's report first (a no-op when it is up to date).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from emdenoise import report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", nargs="?", default="results/report/report.html")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--section", default=None, help="dataset shown (default: the first one)")
    ap.add_argument("--width", type=int, default=1240)
    args = ap.parse_args(argv)
    page = Path(args.html)
    if not page.exists():
        print(f"{page}: no report (run `make run` first)", file=sys.stderr)
        return 1
    if report.find_chromium() is None:
        print("headless Chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 1
    names = re.findall(r'<section class="dataset" id="ds-([^"]+)"', page.read_text())
    section = args.section or names[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shots = {"report_overview.png": ("", 1000), "report_section.png": (f"#section={section}", 2300)}
    for name, (fragment, height) in shots.items():
        report.browse(page, fragment=fragment, screenshot=out / name, size=(args.width, height))
        from PIL import Image  # 128-colour palette: a third of the size, fine for a page of text and greys

        Image.open(out / name).convert("RGB").quantize(colors=128).save(out / name, optimize=True)
        print(f"{out / name}  ({page}{fragment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
