"""A machine before `install`: the installer, `doctor` and every `--help` run on the standard library and
`packaging` alone, as on a fresh venv where setup_colab.sh has installed torch, packaging and numpy only.

Each run is a new interpreter started with `-S` (no site-packages), whose path holds this checkout and a folder
with `packaging` plus package metadata saying torch and numpy are installed (the installer plans from metadata).
An import blocker makes every other import fail, torch's and numpy's included, as they would if missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import packaging
import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import importlib.abc, runpy, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top not in sys.stdlib_module_names and top not in ("instantid_colab", "packaging"):
            raise ImportError(f"blocked on this fresh machine: {name}", name=name)

sys.meta_path.insert(0, Blocker())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def fresh_site(tmp_path_factory) -> Path:
    """`packaging` (linked), and metadata for torch and numpy as setup_colab.sh leaves them."""
    site = tmp_path_factory.mktemp("site")
    (site / "packaging").symlink_to(Path(packaging.__file__).parent, target_is_directory=True)
    for name, version in (("packaging", packaging.__version__), ("torch", "2.13.0"), ("numpy", "2.4.6")):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return site


def fresh(site: Path, *argv: str, module: str = "instantid_colab") -> subprocess.CompletedProcess:
    environment = {"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin", "HOME": str(site)}
    return subprocess.run([sys.executable, "-S", "-c", RUN, module, *argv], capture_output=True, text=True,
                          env=environment, cwd=site, timeout=120)


def test_the_blocker_blocks_what_a_fresh_machine_lacks(fresh_site):
    done = fresh(fresh_site, module="instantid_colab.images")  # its first line imports numpy
    assert done.returncode == 1 and "ImportError: blocked on this fresh machine: numpy" in done.stderr


def test_install_dry_run_lists_what_it_would_install(fresh_site):
    done = fresh(fresh_site, "install", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Dry run (") and lines[0].endswith("); would run:")  # which route: lock or resolved
    install = next(line for line in lines if "diffusers>=" in line)
    for spec in ("diffusers>=0.31", "transformers>=4.48.0", "psutil>=5.9.4", "pillow>=9.5", "gradio>=5.22",
                 "matplotlib>=3.7", "opencv-python>=4.5.5.64"):
        assert spec in install.split(), spec
    assert "numpy" not in install and "torch" not in install  # kept as installed, never changed
    assert any(line.strip().endswith(("--no-deps insightface>=2.0", "--no-deps insightface==2.1")) for line in lines)
    assert [spec for spec in install.split() if spec.startswith("onnxruntime")][0].startswith(
        ("onnxruntime>=", "onnxruntime=="))  # no CUDA seen: the CPU wheel


def test_doctor_lists_what_is_missing_and_says_why_memory_is_not_measured(fresh_site):
    done = fresh(fresh_site, "doctor")
    assert done.returncode == 1, done.stderr  # errors found: packages missing
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert "torch: cannot import (ImportError: blocked on this fresh machine: torch)" in out
    assert "[error] diffusers: not installed" in out and "Fix: python -m instantid_colab install" in out
    assert ("Memory not measured: psutil is not installed. Run `python -m instantid_colab install`, then `doctor` "
            "again.") in out
    as_json = fresh(fresh_site, "doctor", "--json")
    assert '"memory": null' in as_json.stdout and '"memory_error": "Memory not measured: psutil' in as_json.stdout


@pytest.mark.parametrize("command", ["", "doctor", "install", "inspect", "download", "generate", "batch", "app"])
def test_every_help_runs(fresh_site, command):
    done = fresh(fresh_site, *filter(None, [command]), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m instantid_colab" + (f" {command}" if command else ""))


@pytest.mark.parametrize("command", ["", "inspect", "bench"])
def test_every_pose_help_runs(fresh_site, command):
    done = fresh(fresh_site, *filter(None, [command]), "--help", module="instantid_colab.pose")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m instantid_colab.pose")
