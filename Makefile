# Two commands on a fresh machine:  make run  (demo pipeline)   make test  (test suite)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= all
CONFIG ?= config/config.yaml

.PHONY: run test lint dryrun bench docs clean venv

# The venv is rebuilt when pyproject.toml changes. torch is pinned (==2.13.0): pip takes
# the CPU build from local disk; an open range would pull a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed

run: venv
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --printshellcmds

# two workers: most tests wait on subprocesses (Snakemake, the CLI) or run one torch thread
TEST_WORKERS ?= 2

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: venv
	$(BIN)/snakemake --lint

dryrun: venv
	$(BIN)/snakemake -n --cores 1

bench: venv
	for b in bench/bench_*.py; do \
	  case $$b in *bench_quality.py|*bench_memory.py|*bench_shared.py) $(BIN)/python $$b --quick || exit 1;; *) $(BIN)/python $$b || exit 1;; esac; \
	done   # bench_quality.py without --quick: the full ground-truth suite (hours on 2 cores)

# Screenshots of the demo report (overview, one dataset) in docs/: headless Chromium.
docs: venv
	$(BIN)/snakemake results/report/report.html --cores $(CORES) --configfile $(CONFIG)
	$(BIN)/python bench/report_screenshots.py results/report/report.html --out docs

clean:
	rm -rf results .snakemake resources/demo
