"""The demo (`make run`): wall time and the time of every rule, on this machine.

    python bench/bench_demo.py [--cores 2] [--keep DIR]

Runs the shipped config (two synthetic movies, `model: auto`) into a fresh results
folder, with the venv in place (what `make run` does after `make venv`), and prints the
wall time, the sum of the stage times per rule (from the `start` / `done` lines of the
stage logs) and the share of the wall time that is Snakemake's own (job start-up:
a Python process per job). Target (issue "fast where users run it"): <= 120 s on 2 cores.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DONE = re.compile(r"INFO emdenoise: done (\w+) in ([\d.]+) s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", default=None, help="results folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    snakemake = Path(sys.executable).with_name("snakemake")
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        results = args.keep or str(Path(tmp) / "results")
        t0 = time.perf_counter()
        proc = subprocess.run([str(snakemake), "--cores", str(args.cores), "--config", f"results={results}",
                               "--configfile", str(REPO / "config" / "config.yaml")],
                              cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        per_rule = defaultdict(list)
        for line in proc.stderr.splitlines():
            m = DONE.search(line)
            if m:
                per_rule[m.group(1)].append(float(m.group(2)))
    busy = sum(sum(v) for v in per_rule.values())
    print(f"demo: {wall:.0f} s wall on {args.cores} cores (target <= 120 s): "
          f"{'met' if wall <= 120 else 'NOT met'}")
    print(f"{'rule':12s} {'jobs':>4s} {'seconds':>8s}")
    for rule, secs in sorted(per_rule.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:12s} {len(secs):4d} {sum(secs):8.1f}")
    print(f"stage time {busy:.0f} s over {sum(map(len, per_rule.values()))} jobs; "
          f"wall x cores - stage time = {wall * args.cores - busy:.0f} core-seconds of job start-up and waiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
