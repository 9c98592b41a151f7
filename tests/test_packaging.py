"""`pip install .` (not only -e) gives a working package: the config schema is package data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import emdenoise
from emdenoise import config as emcfg

ROOT = Path(__file__).resolve().parents[1]


def test_schema_is_inside_the_package():
    pkg = Path(emdenoise.__file__).resolve().parent
    assert emcfg.SCHEMA.is_file() and pkg in emcfg.SCHEMA.resolve().parents
    # the workflow validates with the very same file
    assert (ROOT / "workflow" / "schemas" / "config.schema.yaml").resolve() == emcfg.SCHEMA.resolve()


def test_non_editable_install_has_the_schema(tmp_path):
    """Build a wheel from a copy of the sources, install it into a bare folder and check
    config.SCHEMA there (no source tree on the path)."""
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("emdenoise-*.whl"))
    assert "emdenoise/schemas/config.schema.yaml" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # -S: no site processing, so the development checkout's editable finder (a .pth
    # hook) is not loaded; the installed copy and the third-party packages are put on the path
    code = ("import sys, sysconfig, pathlib; target = pathlib.Path(sys.argv[1]).resolve(); "
            "sys.path[:0] = [str(target), sysconfig.get_paths()['purelib']]; "
            "import emdenoise.config as c; "
            "assert target in c.SCHEMA.resolve().parents and c.SCHEMA.is_file(), c.SCHEMA; "
            "c.validate({'datasets': {'a': {'path': 'x.eer', 'eer_group': 10}}}); print(c.SCHEMA)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-S", "-c", code, str(target)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(target.resolve()) in r.stdout
