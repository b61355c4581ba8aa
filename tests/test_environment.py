"""The installer against a recorded fake pip, the checks, and the agreement of the requirement lists."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement as Spec
from packaging.utils import canonicalize_name

from instantid_colab import environment as env
from instantid_colab.environment import INSTALL_HINT, REQUIREMENTS, Verification

ROOT = Path(__file__).resolve().parents[1]

# What the fake index resolves an unpinned install to.
LATEST = {"onnxruntime-gpu": "1.23.0", "onnxruntime": "1.23.0", "insightface": "2.1", "onnx": "1.19.0",
          "diffusers": "0.36.0", "scikit-image": "0.25.0", "pillow-heif": "1.1.1"}

COLAB = {
    "torch": "2.6.0+cu124", "torchvision": "0.21.0+cu124", "torchaudio": "2.6.0+cu124", "numpy": "2.0.2",
    "diffusers": "0.29.0", "transformers": "4.53.0", "accelerate": "1.8.0", "huggingface-hub": "0.33.0",
    "safetensors": "0.5.3", "psutil": "5.9.5", "packaging": "24.2", "pillow": "11.2.1", "gradio": "5.31.0",
    "opencv-python": "4.11.0.86", "scipy": "1.15.3", "tqdm": "4.67.1", "requests": "2.32.3", "peft": "0.15.2",
    "matplotlib": "3.10.0",
}


class FakePip:
    """A site-packages as a dict, changed by pip-like commands, recording each call and its constraints."""

    def __init__(self, installed: dict[str, str], fail: tuple[str, ...] = ()) -> None:
        self.installed = dict(installed)
        self.fail = fail
        self.calls: list[list[str]] = []
        self.constraints: list[str] = []

    def __call__(self, args):
        args = list(args)
        self.calls.append(args)
        if args[0] == "uninstall":
            for name in args[2:]:
                self.installed.pop(name, None)
            return env.PipResult(0, "Successfully uninstalled")
        assert args[0] == "install" and args[1] == "-c", args
        self.constraints.append(Path(args[2]).read_text())
        specs = [Spec(arg) for arg in args[3:] if not arg.startswith("-")]
        for spec in specs:
            if canonicalize_name(spec.name) in self.fail:
                return env.PipResult(1, f"Collecting stuff\nERROR: No matching distribution found for {spec}\n")
        for spec in specs:
            pinned = [s.version for s in spec.specifier if s.operator == "=="]
            self.installed[canonicalize_name(spec.name)] = pinned[0] if pinned else LATEST.get(spec.name, "9.9")
        return env.PipResult(0, "Successfully installed")

    def verify(self, cuda: bool) -> Verification:
        return Verification(dict(self.installed), {}, ("onnxruntime-gpu" in self.installed) if cuda else None)


def run_install(fake: FakePip, cuda: bool, **kwargs):
    return env.install(fake, cuda=cuda, versions=lambda: dict(fake.installed), verify=fake.verify, **kwargs)


def test_first_run_installs_what_is_missing_and_second_run_changes_nothing():
    fake = FakePip(COLAB)
    first = run_install(fake, cuda=True)

    assert first.ok, first.render()
    changes = {(c.distribution, c.before, c.after) for c in first.changes}
    assert changes == {
        ("onnxruntime-gpu", None, "1.23.0"), ("insightface", None, "2.1"), ("onnx", None, "1.19.0"),
        ("scikit-image", None, "0.25.0"), ("diffusers", "0.29.0", "0.36.0"), ("pillow-heif", None, "1.1.1"),
    }
    assert "onnxruntime" not in fake.installed
    insightface_call = [call for call in fake.calls if any(a.startswith("insightface") for a in call)]
    assert insightface_call == [["install", "-c", insightface_call[0][2], "--no-deps", "insightface>=2.0"]]
    # torch & co. are pinned in every install and never named as a requirement.
    assert all("torch==2.6.0+cu124\ntorchvision==0.21.0+cu124\ntorchaudio==2.6.0+cu124\nnumpy==2.0.2" in c
               for c in fake.constraints)
    named = {Spec(a).name for call in fake.calls for a in call[3:] if call[0] == "install" and not a.startswith("-")}
    assert named.isdisjoint(env.PINNED)
    assert {k: fake.installed[k] for k in env.PINNED} == {k: COLAB[k] for k in env.PINNED}
    assert "diffusers: 0.29.0 -> 0.36.0" in first.render()

    calls_before = len(fake.calls)
    second = run_install(fake, cuda=True)
    assert second.steps == [] and second.changes == [] and second.ok
    assert len(fake.calls) == calls_before
    assert second.render() == "Nothing to change: every required package is installed and recent enough."


def test_both_onnxruntime_wheels_are_repaired_to_the_gpu_one():
    fake = FakePip({**COLAB, **{name: LATEST[name] for name in ("insightface", "onnx", "scikit-image", "diffusers", "pillow-heif")},
                    "onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"})
    result = run_install(fake, cuda=True)

    assert result.ok, result.render()
    assert fake.calls[0] == ["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"]
    assert fake.calls[1][3:] == ["onnxruntime-gpu>=1.19"]
    assert len(fake.calls) == 2
    assert [n for n in env.ONNXRUNTIME_DISTRIBUTIONS if n in fake.installed] == ["onnxruntime-gpu"]
    assert {(c.distribution, c.before, c.after) for c in result.changes} == {
        ("onnxruntime", "1.22.0", None), ("onnxruntime-gpu", "1.22.0", "1.23.0")}


def test_failed_gpu_install_restores_the_cpu_onnxruntime_and_reports_pips_message():
    fake = FakePip({**COLAB, "onnxruntime": "1.22.0"}, fail=("onnxruntime-gpu",))
    result = run_install(fake, cuda=True)

    assert not result.ok
    assert "ERROR: No matching distribution found for onnxruntime-gpu>=1.19" in result.error
    assert "Restored what this step had removed: onnxruntime==1.22.0" in result.error
    assert fake.installed["onnxruntime"] == "1.22.0" and "onnxruntime-gpu" not in fake.installed
    assert fake.calls[-1][-2:] == ["--no-deps", "onnxruntime==1.22.0"]
    assert result.changes == []  # stopped at the first failing step, everything as it was
    assert "FAILED:" in result.render()


def test_cpu_machine_keeps_an_installed_onnxruntime_gpu():
    fake = FakePip({**COLAB, **{n: LATEST[n] for n in ("insightface", "onnx", "scikit-image", "diffusers", "pillow-heif")},
                    "onnxruntime-gpu": "1.22.0"})
    result = run_install(fake, cuda=False)
    assert result.steps == [] and fake.calls == []


def test_no_torch_means_no_pip_call_and_a_pointer_to_pytorch():
    fake = FakePip({name: v for name, v in COLAB.items() if name != "torch"})
    result = run_install(fake, cuda=False)
    assert fake.calls == []
    assert result.error.startswith("torch is not installed") and "pytorch.org" in result.error


def test_dry_run_lists_commands_and_runs_none():
    fake = FakePip(COLAB)
    result = run_install(fake, cuda=True, dry_run=True)
    assert fake.calls == []
    assert [c[0] for c in result.commands] == ["install", "install", "install"]
    assert result.commands[0][3:] == ["onnxruntime-gpu>=1.19"]
    assert "Dry run" in result.render()


def test_verification_problems_are_reported():
    fake = FakePip(COLAB)
    result = env.install(fake, cuda=True, versions=lambda: dict(fake.installed),
                         verify=lambda cuda: Verification(dict(fake.installed), {"insightface": "ImportError: x"}, False))
    assert not result.ok
    assert any("`import insightface` fails" in p for p in result.problems)
    assert any("CUDAExecutionProvider does not run" in p for p in result.problems)


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


def test_verification_in_a_fresh_interpreter_imports_every_module_here():
    seen = env.verify_in_subprocess(cuda=False)
    assert seen.import_errors == {}
    assert seen.versions["torch"] == importlib.metadata.version("torch")
    assert seen.cuda_provider_works is None


class PullsNumpy(FakePip):
    """pip resolving a dependency on numpy: absent -> installed, or an installed one upgraded."""

    def __call__(self, args):
        result = super().__call__(args)
        if args[0] == "install":
            self.installed["numpy"] = "2.4.6"
        return result


def test_numpy_new_on_a_bare_machine_is_fine_but_a_changed_numpy_needs_a_restart():
    bare = PullsNumpy({"torch": "2.13.0+cpu"})
    result = run_install(bare, cuda=False)
    assert ("numpy", None, "2.4.6") in {(c.distribution, c.before, c.after) for c in result.changes}
    assert result.ok and not any("numpy" in problem for problem in result.problems), result.render()

    colab = PullsNumpy(COLAB)
    result = run_install(colab, cuda=False)
    assert "numpy changed from 2.0.2 to 2.4.6; restart the runtime." in result.problems
    assert not result.ok


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
