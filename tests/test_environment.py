"""The checks, the tested ranges, and the agreement of the requirement lists (the installer: test_installer.py)."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement as Spec
from packaging.utils import canonicalize_name

from instantid_colab import environment as env
from instantid_colab.environment import INSTALL_HINT, REQUIREMENTS

ROOT = Path(__file__).resolve().parents[1]


def make_report(**changes) -> env.EnvironmentReport:
    packages = {row.distribution: "99.0" for row in REQUIREMENTS}
    fields = dict(python="3.12.0", platform="Linux", packages=packages, onnxruntime_distributions=("onnxruntime-gpu",),
                  onnxruntime_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), onnxruntime_error=None,
                  torch_cuda="12.4", cudnn=90100, cuda_available=True,
                  gpus=(env.GpuInfo("Tesla T4", (7, 5), 14.75),), torch_error=None)
    fields.update(changes)
    return env.EnvironmentReport(**fields)


def test_check_on_a_healthy_colab_finds_nothing():
    assert env.check(make_report()) == []


def test_check_names_missing_and_old_packages_with_the_fix():
    packages = {row.distribution: "99.0" for row in REQUIREMENTS} | {"insightface": None, "diffusers": "0.27.0"}
    problems = {p.package: p for p in env.check(make_report(packages=packages))}
    assert problems["insightface"].severity == "error" and problems["insightface"].fix == INSTALL_HINT
    assert problems["diffusers"].message == "0.27.0 is older than 0.31."


def test_check_onnxruntime_cases():
    both = env.check(make_report(onnxruntime_distributions=("onnxruntime", "onnxruntime-gpu")))
    assert [p.severity for p in both] == ["error"] and "both onnxruntime and onnxruntime-gpu" in both[0].message
    none = env.check(make_report(onnxruntime_distributions=(), onnxruntime_providers=None, onnxruntime_error="ModuleNotFoundError"))
    assert none[0].message.startswith("not installed") and "onnxruntime-gpu" in none[0].fix
    cpu_on_cuda = env.check(make_report(onnxruntime_distributions=("onnxruntime",), onnxruntime_providers=("CPUExecutionProvider",)))
    assert cpu_on_cuda[0].severity == "warning" and "swaps in onnxruntime-gpu" in cpu_on_cuda[0].fix


def test_check_without_cuda_warns_and_asks_for_the_cpu_wheel():
    problems = env.check(make_report(cuda_available=False, gpus=(), onnxruntime_distributions=(), onnxruntime_providers=None))
    assert {(p.package, p.severity) for p in problems} == {("onnxruntime", "error"), ("cuda", "warning")}
    assert "(installs onnxruntime)" in next(p.fix for p in problems if p.package == "onnxruntime")


def _floors(lines) -> dict[str, str]:
    floors = {}
    for line in lines:
        spec = Spec(line)
        (bound,) = list(spec.specifier)
        assert bound.operator == ">=", line
        floors[canonicalize_name(spec.name)] = bound.version
    return floors


def table_floors() -> dict[str, str]:
    return {row.distribution: row.minimum for row in REQUIREMENTS}


def test_requirements_colab_txt_agrees_with_the_table():
    lines = [line.strip() for line in (ROOT / "requirements-colab.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    floors = _floors(lines)
    table = table_floors()
    expected = {row.distribution for row in REQUIREMENTS if row.role == "install"} | {"onnxruntime-gpu"}
    assert set(floors) == expected
    assert floors.pop("onnxruntime-gpu") == table["onnxruntime"]
    assert all(table[name] == floor for name, floor in floors.items())


def test_pyproject_floors_agree_with_the_table():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = _floors(project["dependencies"])
    assert set(floors) == {row.distribution for row in REQUIREMENTS if row.role in ("install", "preinstalled")}
    assert floors == {name: table_floors()[name] for name in floors}


def test_table_covers_insightfaces_own_requirements():
    try:
        declared = importlib.metadata.requires("insightface")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("insightface is not installed here")
    base = {canonicalize_name(Spec(line).name) for line in declared if Spec(line).marker is None}
    covered = {name for row in REQUIREMENTS for name in (row.distribution, *row.alternatives)}
    assert base - covered == set()


def test_every_row_has_a_tested_range_from_its_floor_up():
    from packaging.version import Version

    for row in REQUIREMENTS:
        oldest, newest = env.tested_range(row)
        assert Version(newest) >= Version(oldest), row.distribution
    assert env.tested_range(env.requirement("torch")) == ("2.11", env.TESTED_NEWEST["torch"])
    assert env.tested_range(env.requirement("gradio"))[0] == env.requirement("gradio").minimum


def test_a_version_outside_the_tested_range_is_a_note_not_a_problem():
    report = env.report()
    packages = {**report.packages, "diffusers": "0.99.0", "torch": "2.7.1+cu126", "gradio": env.TESTED_NEWEST["gradio"]}
    adjusted = env.EnvironmentReport(**{**vars(report), "packages": packages})
    problems = {p.package: p for p in env.untested(adjusted)}
    assert not {"diffusers", "torch"} & {p.package for p in env.check(adjusted)}
    diffusers = problems["diffusers"]
    assert diffusers.severity == "note"
    assert diffusers.message.startswith("0.99.0 is outside the tested range 0.31 to 0.42.1")
    assert diffusers.fix == "if something fails, pip install 'diffusers==0.42.1'"
    assert problems["torch"].message.startswith("2.7.1+cu126 is outside the tested range 2.11 to 2.13.0")
    assert "gradio" not in problems
    assert "  diffusers        0.99.0           0.31       0.31 to 0.42.1" in env.EnvironmentReport(
        **{**vars(report), "packages": packages}).render().splitlines()


def test_readme_states_the_tested_range_of_every_package():
    """The README's "Tested versions" table is the environment table: a raised floor must be written there too."""
    text = (ROOT / "README.md").read_text().split("## Tested versions", 1)[1].split("\n## ", 1)[0]
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    for row in REQUIREMENTS:
        floor, newest = rows[row.distribution]
        assert floor.split(" ")[0] == row.minimum and newest == env.TESTED_NEWEST[row.distribution], row.distribution
    assert set(rows) - {"package"} == {row.distribution for row in REQUIREMENTS}
