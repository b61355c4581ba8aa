"""Adds what this runtime lacks and changes nothing it already has.

Colab sessions die at install time two ways: a pip call that replaces something preinstalled (PyTorch built for
Colab's CUDA driver, numpy, or pillow under matplotlib and torchvision, held in memory by the running kernel), and a
second onnxruntime package beside the first (the CPU and GPU wheels ship the same module). Here every installed
distribution is a pip constraint at its installed version, so pip picks the releases of the additions that fit what
is there, whatever the package index serves on the day; a package older than our floor is upgraded only when the
user asks (`install --upgrade NAME`). The additions come from the lock that CI proved on Colab's image
(`colab_lock.txt`) when it fits this machine, otherwise pip resolves them within our floors under the same
constraints; the report says which. The result is verified in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement as PackagingRequirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from instantid_colab import colab_image
from instantid_colab.colab_image import ColabImage
from instantid_colab.environment import (
    INSTALL_HINT, ONNXRUNTIME_DISTRIBUTIONS, PINNED, REQUIREMENTS, dev_requirements, installed_version,
    installed_versions, onnxruntime_gpu_specifier, requirement,
)

RESTART = "then restart the runtime (Runtime > Restart session)"


@dataclass(frozen=True)
class PipResult:
    returncode: int
    output: str  # pip's stdout and stderr together


PipRunner = Callable[[Sequence[str]], PipResult]


def pip_runner(args: Sequence[str]) -> PipResult:
    """Run `python -m pip ARGS` in this interpreter's environment and capture what pip says."""
    command = [sys.executable, "-m", "pip", *args]
    print("$ pip " + " ".join(args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    return PipResult(done.returncode, done.stdout + done.stderr)


@dataclass(frozen=True)
class Verification:
    """What a fresh interpreter sees after installing (this process may hold stale modules)."""

    versions: dict[str, str]
    import_errors: dict[str, str]
    cuda_provider_works: bool | None  # None when CUDA was not asked for


_VERIFY_SCRIPT = r"""
import importlib, importlib.metadata, json, sys
from packaging.utils import canonicalize_name
modules, want_cuda = json.loads(sys.argv[1]), sys.argv[2] == "1"
errors = {}
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as error:
        errors[module] = f"{type(error).__name__}: {error}"
cuda_ok = None
if want_cuda and "onnxruntime" in modules and "onnxruntime" not in errors:
    import onnxruntime, onnx
    from onnx import TensorProto, helper
    if hasattr(onnxruntime, "preload_dlls"):
        onnxruntime.preload_dlls()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        cuda_ok = "CUDAExecutionProvider" in session.get_providers()
    except Exception as error:
        errors["onnxruntime (CUDA session)"] = f"{type(error).__name__}: {error}"
        cuda_ok = False
versions = {}
for dist in importlib.metadata.distributions():
    if dist.metadata["Name"]:
        versions.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
print(json.dumps({"versions": versions, "import_errors": errors, "cuda_provider_works": cuda_ok}))
"""


def verify_in_subprocess(cuda: bool, modules: Sequence[str] | None = None) -> Verification:
    """Import `modules` (default: every table module) in a new interpreter; with CUDA and onnxruntime among them,
    run a one-node ONNX graph on the GPU."""
    modules = [row.module for row in REQUIREMENTS] if modules is None else list(modules)
    done = subprocess.run(
        [sys.executable, "-c", _VERIFY_SCRIPT, json.dumps(modules), "1" if cuda else "0"],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        return Verification(installed_versions(), {"verification": done.stderr.strip()[-2000:]}, None)
    return Verification(**json.loads(done.stdout.strip().splitlines()[-1]))


def affected_modules(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """The table's modules an install could have broken: those of the distributions it added, changed or removed,
    and of every installed distribution that depends on one of them. Nothing else moved, so a fresh interpreter
    imports only these (every module of the table costs ~9 s on Colab's image; these ~1.5 s)."""
    changed = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    modules = []
    for row in REQUIREMENTS:
        names = (row.distribution, *row.alternatives)
        if changed & set(names) or any(changed & _dependencies(name) for name in names if name in after):
            modules.append(row.module)
    return modules


def _dependencies(distribution: str) -> set[str]:
    """What `distribution` requires when installed without extras (canonical names; empty when unknown)."""
    try:
        declared = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    found = set()
    for line in declared:
        parsed = PackagingRequirement(line)
        if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
            found.add(canonicalize_name(parsed.name))
    return found


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Step:
    """One pip transaction: remove `remove` (name, version) pairs, then install `install` (canonical name -> its
    specifier at our floor; the lock's `==VERSION` replaces it for an addition when the lock is the route)."""

    reason: str
    install: dict[str, str]
    remove: tuple[tuple[str, str], ...] = ()
    no_deps: bool = False
    upgrade: tuple[str, ...] = ()  # names that are installed and asked to move (pip's --upgrade)


@dataclass(frozen=True)
class Outdated:
    """A package we need, installed older than our floor, and kept: upgraded only when asked."""

    distribution: str
    version: str
    minimum: str
    why: str

    def render(self) -> str:
        return (f"{self.distribution} {self.version} is older than our floor {self.minimum} ({self.why}); kept as "
                f"installed. To upgrade it: `{INSTALL_HINT} --upgrade {self.distribution}`, {RESTART}.")


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    outdated: list[Outdated]
    kept: frozenset[str]  # installed distributions held at their versions (the constraints)


def plan(versions: Mapping[str, str], cuda: bool, dev_specs: Sequence[str] = (), upgrade: Sequence[str] = (),
         torch_cuda: str | None = None) -> Plan:
    """The pip transactions that add what `versions` lacks and upgrade exactly the names in `upgrade`: first a
    second or wrong onnxruntime wheel replaced, then every addition and upgrade in one resolution, then
    insightface alone, without its declared dependencies. What is older than our floor and not in `upgrade` stays.
    `torch_cuda` (torch's CUDA version) chooses the onnxruntime-gpu releases built for it."""
    upgrade = tuple(dict.fromkeys(canonicalize_name(name) for name in upgrade))
    gpu = onnxruntime_gpu_specifier(torch_cuda)
    repair = _onnxruntime_repair(versions, cuda, gpu)
    resolved: dict[str, str] = {}
    alone: dict[str, str] = {}
    outdated = []
    for name, specifier, why, no_deps in _needs(versions, cuda, gpu, dev_specs, skip_onnxruntime=repair is not None):
        found = _installed(name, versions)
        target = alone if no_deps else resolved
        if found is None:
            target[name] = specifier
        elif found[0] in upgrade:
            target[found[0]] = specifier
        elif not _holds(specifier, found[1]):
            outdated.append(Outdated(found[0], found[1], specifier.removeprefix(">="), why))
    resolved.update({name: "" for name in upgrade if name not in resolved and name not in alone})
    steps = [repair] if repair else []
    if resolved:
        missing = [name + specifier for name, specifier in resolved.items() if name not in upgrade]
        asked = tuple(name for name in resolved if name in upgrade)
        reasons = ([f"missing: {', '.join(missing)}"] if missing else []) + (
            [f"upgrade asked for: {', '.join(asked)}"] if asked else [])
        steps.append(Step("; ".join(reasons), resolved, upgrade=asked))
    for name, specifier in alone.items():
        steps.append(Step(f"{name} without its declared dependencies (its CPU onnxruntime would shadow "
                          "onnxruntime-gpu); its other requirements are rows of the table",
                          {name: specifier}, no_deps=True, upgrade=(name,) if name in upgrade else ()))
    moving = set(upgrade) | {name for step in steps for name, _ in step.remove}
    return Plan(steps, outdated, frozenset(name for name in versions if name not in moving))


def _needs(versions: Mapping[str, str], cuda: bool, gpu: str, dev_specs: Sequence[str],
           skip_onnxruntime: bool) -> list[tuple[str, str, str, bool]]:
    """(distribution, specifier, why, without dependencies) for every table row we install (the onnxruntime row as
    the wheel installed, or the one this machine wants) and each test tool asked for."""
    needs = []
    for row in REQUIREMENTS:
        name = row.distribution
        if row.role == "onnxruntime":
            if skip_onnxruntime:
                continue
            present = [wheel for wheel in ONNXRUNTIME_DISTRIBUTIONS if wheel in versions]
            name = present[0] if present else "onnxruntime-gpu" if cuda else "onnxruntime"
        if row.role != "preinstalled":
            specifier = gpu if name == "onnxruntime-gpu" else f">={row.minimum}"
            needs.append((name, specifier, row.why, row.role == "install-no-deps"))
    for spec in map(PackagingRequirement, dev_specs):
        needs.append((canonicalize_name(spec.name), str(spec.specifier), "a test tool (`--dev`)", False))
    return needs


def _installed(name: str, versions: Mapping[str, str]) -> tuple[str, str] | None:
    """(distribution, version) installed for `name`, or for the alternative that stands in for it
    (opencv-python-headless for opencv-python)."""
    try:
        return installed_version(requirement(name), versions)
    except KeyError:
        return (name, versions[name]) if name in versions else None


def _holds(specifier: str, version: str) -> bool:
    try:
        return PackagingRequirement(f"x{specifier}").specifier.contains(version, prereleases=True)
    except InvalidVersion:
        return True  # an unparsable local build: do not touch it


def _onnxruntime_repair(versions: Mapping[str, str], cuda: bool, gpu: str) -> Step | None:
    """Replacing a second or wrong onnxruntime wheel (face analysis broken, or on the CPU beside a GPU: `doctor`
    reports both); None when there is none to replace."""
    wanted = {"onnxruntime-gpu": gpu} if cuda else {"onnxruntime": f">={requirement('onnxruntime').minimum}"}
    present = tuple((name, versions[name]) for name in ONNXRUNTIME_DISTRIBUTIONS if name in versions)
    if len(present) > 1:
        return Step(f"both onnxruntime wheels were installed and shadow each other; keeping only {next(iter(wanted))}",
                    wanted, remove=present)
    if cuda and present and present[0][0] == "onnxruntime":
        return Step("CUDA is available: replacing the CPU onnxruntime by onnxruntime-gpu", wanted, remove=present)
    if cuda and present and not _holds(gpu, present[0][1]):
        return Step(f"onnxruntime-gpu {present[0][1]} is built for another CUDA than torch's (it needs {gpu}): "
                    "replacing it", wanted, remove=present)
    return None


def refusals(upgrade: Sequence[str], versions: Mapping[str, str]) -> list[str]:
    """Why a name given to `install --upgrade` cannot be upgraded (empty: all can): torch & co. never move, and
    only what is installed can be upgraded (what is missing is added anyway)."""
    found = []
    for name in map(canonicalize_name, upgrade):
        if name in PINNED:
            found.append(f"--upgrade {name}: the installer never changes {name} (Colab's build matches its CUDA "
                         "driver and its compiled packages); choose a runtime that has the version you need")
        elif name not in versions:
            found.append(f"--upgrade {name}: {name} is not installed, so there is nothing to upgrade "
                         "(`install` adds what is missing by itself)")
    return found


# ---------------------------------------------------------------------------------------------
# The lock


def lock_misfit(lock: ColabImage | None, versions: Mapping[str, str], python: str | None = None) -> str | None:
    """Why the lock proven on Colab's image does not fit this machine, or None when it does: another Python (its
    wheels may not exist), or another version of something the lock would add (another image)."""
    if lock is None or not lock.pins:
        return "there is no lock"
    python = python or platform.python_version()
    if python.split(".")[:2] != lock.python.split(".")[:2]:
        return f"this is Python {python}, the lock was proven on Python {lock.python}"
    clashes = colab_image.lock_differences(lock, dict(versions))
    if clashes:
        return "this machine has other versions of what the lock adds: " + ", ".join(d.render("lock") for d in clashes)
    return None


def _locked(step: Step, pins: Mapping[str, str]) -> Step:
    """`step` with each addition the lock pins at the lock's version (upgrades asked for stay at our floors)."""
    install = {name: f"=={pins[name]}" if name in pins and name not in step.upgrade and _holds(spec, pins[name])
               else spec for name, spec in step.install.items()}
    return Step(step.reason, install, step.remove, step.no_deps, step.upgrade)


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass(frozen=True)
class Change:
    distribution: str
    before: str | None  # None: was not installed
    after: str | None  # None: removed


@dataclass
class InstallReport:
    cuda: bool
    dry_run: bool
    steps: list[Step] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)  # pip arguments, run (or planned when dry_run)
    changes: list[Change] = field(default_factory=list)
    outdated: list[Outdated] = field(default_factory=list)
    kept: frozenset[str] = frozenset()  # installed distributions held at their versions
    route: str = ""  # "lock": the lock's versions | "resolved": pip's, within our floors under the same constraints
    route_note: str = ""  # which lock, or why it was not used
    lock_pins: dict[str, str] = field(default_factory=dict)  # the lock's versions, when it is the route
    error: str | None = None  # what went wrong, in a sentence or with pip's own message
    problems: list[str] = field(default_factory=list)  # what the verification still found wrong
    restart_needed: bool = False  # a changed package was already imported by this process

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems and not self.outdated

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def render(self) -> str:
        if not self.steps:
            lines = ["Nothing to add: every required package is installed" + ("." if self.outdated else " and recent enough.")]
        elif self.dry_run:
            lines = [f"Dry run ({self.route_line()}); would run:", *(f"  pip {' '.join(c)}" for c in self.commands),
                     *(f"  ({step.reason})" for step in self.steps)]
        else:
            lines = self._table()
        lines += [f"NOT UPGRADED: {item.render()}" for item in self.outdated]
        if self.error:
            lines.append(f"FAILED: {self.error}")
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        if self.restart_needed:
            lines.append("Restart the runtime (Runtime > Restart session): this process imported a package that changed.")
        return "\n".join(lines)

    def route_line(self) -> str:
        return ("versions from the lock proven on Colab's image, " if self.route == "lock"
                else "resolved by pip within our floors; ") + self.route_note

    def _table(self) -> list[str]:
        """What was added (and from where), changed on request, and kept: the closing table."""
        added = [change for change in self.changes if change.before is None]
        moved = [change for change in self.changes if change.before is not None]
        lines = [f"Added {len(added)} ({self.route_line()}):" if added else "Added nothing."]
        width = max([len(change.distribution) for change in added] + [8])
        lines += [f"  {c.distribution:<{width}} {c.after:<12} "
                  f"{'lock' if self.lock_pins.get(c.distribution) == c.after else 'resolved'}" for c in added]
        lines += [f"Changed: {c.distribution} {c.before} -> {c.after or 'removed'}" for c in moved]
        held = len(self.kept - {change.distribution for change in moved})
        lines.append(f"Kept as they were: {held} of the {held + len(moved)} packages that were installed.")
        return lines


def install(
    runner: PipRunner = pip_runner,
    *,
    cuda: bool | None = None,
    dry_run: bool = False,
    dev: bool = False,
    upgrade: Sequence[str] = (),
    resolve: bool = False,
    lock: ColabImage | None = None,
    python: str | None = None,
    torch_cuda: str | None = None,
    versions: Callable[[], dict[str, str]] = installed_versions,
    verify: Callable[[bool, Sequence[str]], Verification] = verify_in_subprocess,
) -> InstallReport:
    """Add what the table needs, holding every installed distribution at its version, and upgrade exactly the
    names in `upgrade` (`refusals` says first which cannot be).

    `runner`, `versions` and `verify` are the three contacts with the real environment; tests pass recording fakes.
    `lock` defaults to the one shipped beside this module; `resolve=True` ignores it (how CI makes a new one). A
    failed pip call is reported in a sentence or with pip's message, and a step's removals are reinstalled.
    """
    cuda, torch_cuda = _torch_cuda() if cuda is None else (cuda, torch_cuda)
    before = versions()
    result = InstallReport(cuda=cuda, dry_run=dry_run)
    if "torch" not in before:
        result.error = (
            "torch is not installed. This installer never installs PyTorch (Colab's build matches its driver). "
            "Install the build for your CUDA from https://pytorch.org/get-started/locally/ first, "
            "e.g. `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` for CPU only."
        )
        return result
    planned = plan(before, cuda, dev_requirements() if dev else (), upgrade, torch_cuda)
    result.steps, result.outdated, result.kept = planned.steps, planned.outdated, planned.kept
    if not planned.steps:
        return result
    lock = colab_image.load_lock() if lock is None else lock
    misfit = "asked to resolve anew (--resolve)" if resolve else lock_misfit(lock, before, python)
    if misfit is None:
        result.route, result.route_note, result.lock_pins = "lock", lock.source, dict(lock.pins)
    else:
        result.route, result.route_note = "resolved", f"the lock was not used: {misfit}"
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder, "constraints.txt")
        for step in planned.steps:
            result.error = _run_step(runner, step, constraints, before, result)
            if result.error:
                break
    if dry_run:
        return result
    importlib.invalidate_caches()  # the metadata pip just wrote
    return _verified(result, before, verify(cuda, affected_modules(before, versions())))


def _write_constraints(path: Path, versions: Mapping[str, str], kept: frozenset[str], pins: Mapping[str, str],
                       requested: Mapping[str, str]) -> None:
    """Every kept distribution at its installed version, then the lock's versions of what is neither installed nor
    requested (the additions' own dependencies, which pip would otherwise take at their newest)."""
    lines = [f"{name}=={versions[name]}" for name in sorted(kept) if _readable(versions[name])]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in versions and name not in requested]
    path.write_text("\n".join(lines) + "\n")


def _readable(version: str) -> bool:
    try:
        Version(version)
    except InvalidVersion:
        return False  # a local build pip cannot read as a constraint
    return True


def _commands(step: Step, constraints: Path) -> list[list[str]]:
    commands = [["uninstall", "-y", *(name for name, _ in step.remove)]] if step.remove else []
    flags = ["--no-deps"] * step.no_deps + ["--upgrade"] * bool(step.upgrade)
    commands.append(["install", "-c", str(constraints), *flags, *(name + spec for name, spec in step.install.items())])
    return commands


def _run_step(runner: PipRunner, step: Step, constraints: Path, versions: Mapping[str, str],
              result: InstallReport) -> str | None:
    """Run one step (with the lock's versions when the lock is the route; when pip refuses them here, once more
    resolved within our floors, saying so); on failure undo the step's removals and return what went wrong."""
    attempts = [(_locked(step, result.lock_pins), result.lock_pins)] if result.route == "lock" else []
    attempts.append((step, {}))
    done = None
    for number, (attempt, pins) in enumerate(attempts[:1] if result.dry_run else attempts):
        _write_constraints(constraints, versions, result.kept, pins, attempt.install)
        for command in _commands(attempt, constraints):
            if number and command[0] == "uninstall":
                continue  # done by the first attempt
            result.commands.append(command)
            done = None if result.dry_run else runner(command)
            if done is not None and done.returncode != 0:
                break
        if done is None or done.returncode == 0:
            return None
        if number + 1 < len(attempts):
            result.route, result.lock_pins = "resolved", {}
            result.route_note = f"the lock was not used: pip could not install it here ({_last_error(done.output)})"
    message = _conflict_sentence(done.output) or (
        f"`pip {' '.join(result.commands[-1])}` failed ({step.reason}). pip said:\n{_pip_message(done.output)}")
    return message + (_restore(runner, step, constraints, versions, result) if step.remove else "")


def _restore(runner: PipRunner, step: Step, constraints: Path, versions: Mapping[str, str], result: InstallReport) -> str:
    restore = ["install", "-c", str(constraints), "--no-deps", *(f"{n}=={v}" for n, v in step.remove)]
    _write_constraints(constraints, versions, result.kept, {}, {})
    result.commands.append(restore)
    undone = runner(restore)
    if undone.returncode == 0:
        return "\nRestored what this step had removed: " + ", ".join(f"{n}=={v}" for n, v in step.remove)
    return (f"\nRestoring the removed packages also failed; run `pip {' '.join(restore)}`. pip said:\n"
            + _pip_message(undone.output))


def _last_error(output: str) -> str:
    errors = [line.removeprefix("ERROR: ") for line in output.splitlines() if line.startswith("ERROR")]
    return errors[-1] if errors else (output.strip().splitlines() or ["pip said nothing"])[-1]


def _pip_message(output: str, lines: int = 25) -> str:
    """pip's ERROR lines when there are some, else its last lines."""
    text = output.strip().splitlines()
    errors = [line for line in text if line.startswith("ERROR")]
    return "\n".join(errors or text[-lines:])


_DEPENDS = re.compile(r"^(?P<package>\S+) (?P<version>\S+) depends on (?P<needs>.+)$")
_HELD = re.compile(r"^The user requested \(constraint\) (?P<name>[^=<>!~ ]+)==(?P<version>\S+)$")


def _conflict_sentence(output: str) -> str | None:
    """pip's "conflicting dependencies" in one sentence: which package needs which installed one moved, and the
    next step. None when pip said something else."""
    if "The conflict is caused by:" not in output:
        return None
    cause = output.split("The conflict is caused by:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in cause.splitlines()]
    held = {canonicalize_name(m["name"]): m["version"] for m in map(_HELD.match, lines) if m}
    for match in filter(None, map(_DEPENDS.match, lines)):
        blocker = canonicalize_name(re.split(r"[<>=!~ ;\[(]", match["needs"], maxsplit=1)[0])
        if blocker in held:
            package = canonicalize_name(match["package"])
            fix = (f"the installer never changes {blocker}: choose a runtime with a newer one" if blocker in PINNED
                   else f"if changing {blocker} is acceptable here, `{INSTALL_HINT} --upgrade {blocker}`, {RESTART}")
            return (f"No release of {package} fits the installed {blocker} {held[blocker]} ({package} "
                    f"{match['version']} needs {match['needs']}), and the installer changes nothing that is "
                    f"installed, so nothing was changed. Next: {fix}.")
    return None


def _torch_cuda() -> tuple[bool, str | None]:
    """(a CUDA GPU is usable, the CUDA version torch was built with)."""
    try:
        import torch
    except Exception:
        return False, None
    return bool(torch.cuda.is_available()), torch.version.cuda


def _verified(result: InstallReport, before: Mapping[str, str], seen: Verification) -> InstallReport:
    after = seen.versions
    result.changes = [Change(name, before.get(name), after.get(name))
                      for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    for change in result.changes:
        if change.distribution in result.kept:
            result.problems.append(f"{change.distribution} changed from {change.before} to "
                                   f"{change.after or 'removed'} although nothing asked for it; {RESTART}.")
    for module, error in seen.import_errors.items():
        result.problems.append(f"`import {module}` fails in a fresh interpreter: {error}")
    if seen.cuda_provider_works is False:
        result.problems.append(
            "onnxruntime-gpu is installed but CUDAExecutionProvider does not run (CUDA/cuDNN libraries not found); "
            "face analysis will use the CPU."
        )
    changed = {change.distribution for change in result.changes if change.before is not None}
    result.restart_needed = any(
        (row.distribution in changed or changed & set(row.alternatives)) and row.module in sys.modules
        for row in REQUIREMENTS
    )
    return result
