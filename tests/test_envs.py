"""envs/emdenoise.yaml (for --sdm conda) lists the same packages as pyproject.toml."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# PyPI name -> conda-forge name where they differ
CONDA_NAME = {"torch": "pytorch-cpu", "matplotlib": "matplotlib-base", "dask[array]": "dask"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", req.strip())
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_conda_env_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "envs" / "emdenoise.yaml").read_text())
    conda = dict(_split(d.replace("=", "==", 1) if re.match(r"^[\w-]+=[^=]", d) else d)
                 for d in env["dependencies"] if isinstance(d, str))
    for dep in deps:
        name, spec = _split(dep)
        if name == "snakemake":  # the workflow engine runs the rules; it is not inside their env
            continue
        cname = CONDA_NAME.get(name, name)
        assert cname in conda, f"{cname} missing from envs/emdenoise.yaml"
        assert conda[cname] == spec, f"{cname}: conda '{conda[cname]}' vs pyproject '{spec}'"
