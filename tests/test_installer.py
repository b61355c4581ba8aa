"""The installer against a recorded fake pip: what it adds, what it holds, the lock, upgrades on request, and pip's
refusals in a sentence. The real pip against a local index of tomorrow: test_installer_registry.py."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement as Spec
from packaging.utils import canonicalize_name

from instantid_colab import colab_image, installer
from instantid_colab.environment import PINNED
from instantid_colab.installer import PipResult, Verification

# What the fake index resolves an unpinned install to.
LATEST = {"onnxruntime-gpu": "1.26.0", "onnxruntime": "1.23.0", "insightface": "2.1", "onnx": "1.19.0",
          "diffusers": "0.36.0", "scikit-image": "0.25.0", "pillow-heif": "1.1.1", "protobuf": "6.0.0"}

COLAB = {
    "torch": "2.6.0+cu124", "torchvision": "0.21.0+cu124", "torchaudio": "2.6.0+cu124", "numpy": "2.0.2",
    "diffusers": "0.39.0", "transformers": "4.53.0", "accelerate": "1.8.0", "huggingface-hub": "0.33.0",
    "safetensors": "0.5.3", "psutil": "5.9.5", "packaging": "24.2", "pillow": "11.2.1", "gradio": "5.31.0",
    "opencv-python": "4.11.0.86", "scipy": "1.15.3", "tqdm": "4.67.1", "requests": "2.32.3", "peft": "0.15.2",
    "matplotlib": "3.10.0", "tensorflow": "2.19.0",
}
ADDED = {"onnxruntime-gpu", "insightface", "onnx", "scikit-image", "pillow-heif"}
LOCK = colab_image.ColabImage("googlecolab/backend-info a724079, 2026-08-19", "3.13.15",
                              {"insightface": "2.1", "onnx": "1.18.0", "onnxruntime": "1.22.0", "pillow-heif": "1.0.0",
                               "onnxruntime-gpu": "1.22.0", "scikit-image": "0.24.0", "protobuf": "5.29.0"})


class FakePip:
    """A site-packages as a dict, changed by pip-like commands, recording each call and its constraints. An
    addition pulls its dependency `protobuf` (at the constraint's version when there is one)."""

    def __init__(self, installed: dict[str, str], fail: tuple[str, ...] = (), output: str = "") -> None:
        self.installed = dict(installed)
        self.fail, self.output = fail, output
        self.calls: list[list[str]] = []
        self.constraints: list[dict[str, str]] = []

    def __call__(self, args):
        args = list(args)
        self.calls.append(args)
        if args[0] == "uninstall":
            for name in args[2:]:
                self.installed.pop(name, None)
            return PipResult(0, "Successfully uninstalled")
        assert args[0] == "install" and args[1] == "-c", args
        held = dict(line.split("==") for line in Path(args[2]).read_text().split())
        self.constraints.append(held)
        specs = [Spec(arg) for arg in args[3:] if not arg.startswith("-")]
        for spec in specs:
            if str(spec) in self.fail or canonicalize_name(spec.name) in self.fail:
                return PipResult(1, self.output or f"Collecting stuff\nERROR: No matching distribution found for {spec}\n")
        for spec in specs:
            name = canonicalize_name(spec.name)
            pinned = [s.version for s in spec.specifier if s.operator == "=="]
            assert not (pinned and name in held and held[name] != pinned[0]), (spec, held[name])  # pip would refuse
            self.installed[name] = pinned[0] if pinned else held.get(name, LATEST.get(name, "9.9"))
        if "--no-deps" not in args and "protobuf" not in self.installed:
            self.installed["protobuf"] = held.get("protobuf", LATEST["protobuf"])
        return PipResult(0, "Successfully installed")

    def verify(self, cuda: bool, modules) -> Verification:
        self.verified = list(modules)
        return Verification(dict(self.installed), {}, ("onnxruntime-gpu" in self.installed) if cuda else None)


def run_install(fake: FakePip, cuda: bool, lock=None, python="3.11.7", **kwargs):
    return installer.install(fake, cuda=cuda, versions=lambda: dict(fake.installed), verify=fake.verify,
                             lock=lock or colab_image.ColabImage("", "", {}), python=python, **kwargs)


def test_additions_are_resolved_with_every_installed_package_held_and_a_second_run_changes_nothing():
    fake = FakePip(COLAB)
    first = run_install(fake, cuda=True, torch_cuda="12.4")

    assert first.ok, first.render()
    assert {c.distribution for c in first.changes} == ADDED | {"protobuf"}
    assert all(c.before is None for c in first.changes)  # added, nothing moved
    assert fake.calls[0][3:] == ["pillow-heif>=0.16", "onnxruntime-gpu>=1.19,<1.27", "onnx>=1.13", "scikit-image>=0.20"]
    assert fake.calls[1][3:] == ["--no-deps", "insightface>=2.0"]
    assert len(fake.calls) == 2  # one resolution for every addition, then insightface alone
    for held in fake.constraints:  # every installed distribution, not only torch & co., at its version
        assert {name: held[name] for name in COLAB} == COLAB
    assert first.route == "resolved" and "there is no lock" in first.route_note
    lines = first.render().splitlines()
    assert lines[0] == "Added 6 (resolved by pip within our floors; the lock was not used: there is no lock):"
    assert "  onnxruntime-gpu 1.26.0       resolved" in lines
    assert lines[-1] == f"Kept as they were: {len(COLAB)} of the {len(COLAB)} packages that were installed."
    assert set(fake.verified) == {"onnxruntime", "insightface", "onnx", "skimage", "pillow_heif"}

    calls_before = len(fake.calls)
    second = run_install(fake, cuda=True, torch_cuda="12.4")
    assert second.steps == [] and second.changes == [] and second.ok
    assert len(fake.calls) == calls_before
    assert second.render() == "Nothing to add: every required package is installed and recent enough."


def test_a_package_older_than_our_floor_is_kept_and_named_with_the_command_that_upgrades_it():
    fake = FakePip({**COLAB, "diffusers": "0.29.0"})
    kept = run_install(fake, cuda=False)

    assert fake.installed["diffusers"] == "0.29.0" and all(held["diffusers"] == "0.29.0" for held in fake.constraints)
    assert not kept.ok
    assert ("NOT UPGRADED: diffusers 0.29.0 is older than our floor 0.31 (SDXL ControlNet pipeline, IP-Adapter "
            "loading (0.30 fails to load an adapter without an image encoder)); kept as installed. To upgrade it: "
            "`python -m instantid_colab install --upgrade diffusers`, then restart the runtime (Runtime > Restart "
            "session).") in kept.render().splitlines()

    asked = run_install(fake, cuda=False, upgrade=["Diffusers"])
    assert asked.ok, asked.render()
    assert fake.calls[-1][3:] == ["--upgrade", "diffusers>=0.31"] and "diffusers" not in fake.constraints[-1]
    assert fake.installed["diffusers"] == "0.36.0" and fake.installed["pillow"] == COLAB["pillow"]
    assert "Changed: diffusers 0.29.0 -> 0.36.0" in asked.render()


def test_upgrades_of_torch_and_co_and_of_what_is_not_installed_are_refused_before_pip_runs():
    assert installer.refusals(["numpy", "insightface", "pillow"], COLAB) == [
        "--upgrade numpy: the installer never changes numpy (Colab's build matches its CUDA driver and its compiled "
        "packages); choose a runtime that has the version you need",
        "--upgrade insightface: insightface is not installed, so there is nothing to upgrade (`install` adds what "
        "is missing by itself)"]
    assert set(PINNED) <= {refusal.split()[1].rstrip(":") for refusal in installer.refusals(PINNED, COLAB)}


def test_the_lock_gives_the_versions_when_it_fits_and_its_dependencies_as_constraints():
    fake = FakePip(COLAB)
    result = run_install(fake, cuda=True, lock=LOCK, python="3.13.0", torch_cuda="12.4")

    assert result.ok and result.route == "lock", result.render()
    assert fake.calls[0][3:] == ["pillow-heif==1.0.0", "onnxruntime-gpu==1.22.0", "onnx==1.18.0", "scikit-image==0.24.0"]
    assert fake.calls[1][3:] == ["--no-deps", "insightface==2.1"]
    assert fake.constraints[0]["protobuf"] == "5.29.0"  # a dependency of an addition, not named: the lock's
    assert fake.installed["protobuf"] == "5.29.0"
    lines = result.render().splitlines()
    assert lines[0] == ("Added 6 (versions from the lock proven on Colab's image, googlecolab/backend-info a724079, "
                        "2026-08-19):")
    assert "  insightface     2.1          lock" in lines


@pytest.mark.parametrize("python, installed, why", [
    ("3.12.4", {}, "this is Python 3.12.4, the lock was proven on Python 3.13.15"),
    ("3.13.0", {"protobuf": "4.25.0"}, "this machine has other versions of what the lock adds: protobuf 4.25.0 (lock: 5.29.0)"),
])
def test_another_python_or_image_resolves_within_the_floors_and_says_why(python, installed, why):
    fake = FakePip({**COLAB, **installed})
    result = run_install(fake, cuda=False, lock=LOCK, python=python)
    assert result.route == "resolved" and result.route_note == f"the lock was not used: {why}"
    assert fake.calls[0][3:] == ["pillow-heif>=0.16", "onnxruntime>=1.19", "onnx>=1.13", "scikit-image>=0.20"]
    assert "protobuf" not in fake.constraints[0] or installed


def test_a_lock_version_the_index_no_longer_has_falls_back_to_resolution_and_says_so():
    fake = FakePip(COLAB, fail=("pillow-heif==1.0.0",))
    result = run_install(fake, cuda=False, lock=LOCK, python="3.13.0")

    assert result.ok, result.render()
    assert [call[3:] for call in fake.calls[:2]] == [
        ["pillow-heif==1.0.0", "onnxruntime==1.22.0", "onnx==1.18.0", "scikit-image==0.24.0"],
        ["pillow-heif>=0.16", "onnxruntime>=1.19", "onnx>=1.13", "scikit-image>=0.20"]]
    assert "protobuf" not in fake.constraints[1]  # the lock's versions are gone from the second try
    assert result.route == "resolved" and result.route_note == (
        "the lock was not used: pip could not install it here (No matching distribution found for pillow-heif==1.0.0)")
    assert fake.installed["pillow-heif"] == LATEST["pillow-heif"]


CONFLICT = """Collecting pillow-heif>=0.16
INFO: pip is looking at multiple versions of pillow-heif to determine which version is compatible with other requirements.
ERROR: Cannot install pillow-heif==1.8.1 and pillow-heif==1.9.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested pillow-heif>=0.16
    pillow-heif 1.9.0 depends on pillow>=13.0.0
    pillow-heif 1.8.1 depends on pillow>=12.0.0
    The user requested (constraint) pillow==11.3.0

To fix this you could try to:
1. loosen the range of package versions you've specified

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_no_release_that_fits_is_one_sentence_naming_both_packages_and_the_next_step():
    fake = FakePip(COLAB, fail=("pillow-heif",), output=CONFLICT)
    result = run_install(fake, cuda=False)

    assert not result.ok and len(fake.calls) == 1
    assert result.error == (
        "No release of pillow-heif fits the installed pillow 11.3.0 (pillow-heif 1.9.0 needs pillow>=13.0.0), and "
        "the installer changes nothing that is installed, so nothing was changed. Next: if changing pillow is "
        "acceptable here, `python -m instantid_colab install --upgrade pillow`, then restart the runtime (Runtime > "
        "Restart session).")
    assert fake.installed == COLAB
    torch_held = FakePip(COLAB, fail=("pillow-heif",), output=CONFLICT.replace("pillow", "torch").replace(
        "torch-heif", "pillow-heif").replace("torch==11.3.0", "torch==2.6.0+cu124"))
    assert "Next: the installer never changes torch: choose a runtime with a newer one." in run_install(
        torch_held, cuda=False).error


def test_onnxruntime_gpu_is_the_build_for_torchs_cuda_and_a_build_for_another_one_is_replaced():
    fake = FakePip({**COLAB, **{name: LATEST[name] for name in ADDED - {"onnxruntime-gpu"}}, "protobuf": "6.0.0",
                    "onnxruntime-gpu": "1.31.1"})
    result = run_install(fake, cuda=True, torch_cuda="12.8")
    assert result.ok, result.render()
    assert fake.calls[:2] == [["uninstall", "-y", "onnxruntime-gpu"],
                              ["install", "-c", fake.calls[1][2], "onnxruntime-gpu>=1.19,<1.27"]]
    assert "onnxruntime-gpu 1.31.1 is built for another CUDA than torch's (it needs >=1.19,<1.27)" in result.steps[0].reason
    assert fake.installed["onnxruntime-gpu"] == "1.26.0"
    cuda13 = FakePip(COLAB)
    run_install(cuda13, cuda=True, torch_cuda="13.0")
    assert cuda13.calls[0][4] == "onnxruntime-gpu>=1.19,>=1.27"


def test_both_onnxruntime_wheels_are_repaired_to_the_gpu_one():
    fake = FakePip({**COLAB, **{name: LATEST[name] for name in ADDED - {"onnxruntime-gpu"}},
                    "protobuf": "6.0.0", "onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"})
    result = run_install(fake, cuda=True)

    assert result.ok, result.render()
    assert fake.calls[0] == ["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"]
    assert fake.calls[1][3:] == ["onnxruntime-gpu>=1.19"] and len(fake.calls) == 2
    assert "onnxruntime" not in fake.constraints[0] and "onnxruntime-gpu" not in fake.constraints[0]
    assert {(c.distribution, c.before, c.after) for c in result.changes} == {
        ("onnxruntime", "1.22.0", None), ("onnxruntime-gpu", "1.22.0", "1.26.0")}


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
    fake = FakePip({**COLAB, **{n: LATEST[n] for n in ADDED - {"onnxruntime-gpu"}}, "onnxruntime-gpu": "1.22.0"})
    result = run_install(fake, cuda=False)
    assert result.steps == [] and fake.calls == []


def test_no_torch_means_no_pip_call_and_a_pointer_to_pytorch():
    fake = FakePip({name: v for name, v in COLAB.items() if name != "torch"})
    result = run_install(fake, cuda=False)
    assert fake.calls == []
    assert result.error.startswith("torch is not installed") and "pytorch.org" in result.error


def test_dry_run_lists_commands_and_the_route_and_runs_none():
    fake = FakePip(COLAB)
    result = run_install(fake, cuda=True, dry_run=True, lock=LOCK, python="3.13.1")
    assert fake.calls == []
    assert [c[3:] for c in result.commands] == [
        ["pillow-heif==1.0.0", "onnxruntime-gpu==1.22.0", "onnx==1.18.0", "scikit-image==0.24.0"],
        ["--no-deps", "insightface==2.1"]]
    assert result.render().startswith("Dry run (versions from the lock proven on Colab's image, googlecolab/")


def test_verification_problems_and_a_held_package_that_moved_are_reported():
    fake = FakePip(COLAB)
    moved = {**COLAB, "pillow": "13.0.0"}
    result = installer.install(fake, cuda=True, versions=lambda: dict(fake.installed), python="3.11.7",
                               verify=lambda cuda, modules: Verification(moved, {"insightface": "ImportError: x"}, False))
    assert not result.ok
    assert ("pillow changed from 11.2.1 to 13.0.0 although nothing asked for it; then restart the runtime "
            "(Runtime > Restart session).") in result.problems
    assert any("`import insightface` fails" in p for p in result.problems)
    assert any("CUDAExecutionProvider does not run" in p for p in result.problems)


def test_a_fresh_interpreter_imports_what_the_install_could_have_affected():
    here = installer.installed_versions()
    if "insightface" not in here:
        pytest.skip("insightface is not installed here")
    without_onnx = {name: version for name, version in here.items() if name != "onnx"}
    # insightface requires onnx: both are imported again; torch and gradio did not move
    assert {"onnx", "insightface"} <= set(installer.affected_modules(without_onnx, here))
    assert not {"torch", "gradio", "diffusers"} & set(installer.affected_modules(without_onnx, here))
    assert installer.affected_modules(here, here) == []
    seen = installer.verify_in_subprocess(cuda=False)
    assert seen.import_errors == {} and seen.versions["torch"] == here["torch"] and seen.cuda_provider_works is None


class PullsNumpy(FakePip):
    """pip resolving a dependency on numpy: absent -> installed, or an installed one upgraded."""

    def __call__(self, args):
        result = super().__call__(args)
        if args[0] == "install":
            self.installed["numpy"] = "2.4.6"
        return result


def test_numpy_new_on_a_bare_machine_is_fine_but_a_changed_numpy_is_a_problem():
    bare = PullsNumpy({"torch": "2.13.0+cpu"})
    result = run_install(bare, cuda=False)
    assert ("numpy", None, "2.4.6") in {(c.distribution, c.before, c.after) for c in result.changes}
    assert result.ok and not any("numpy" in problem for problem in result.problems), result.render()

    colab = PullsNumpy(COLAB)
    result = run_install(colab, cuda=False)
    assert any(problem.startswith("numpy changed from 2.0.2 to 2.4.6 although nothing asked for it")
               for problem in result.problems)
    assert not result.ok
