"""What is installed, what is missing or too old, and what the project needs (the one table of floors).

The installer that acts on it is `installer.py`; this module only reads metadata, so `doctor` and the installer
run on the standard library and `packaging` before anything else is installed.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PackagingRequirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

INSTALL_HINT = "python -m instantid_colab install"


@dataclass(frozen=True)
class Requirement:
    """One row of the minimum-version table."""

    distribution: str  # pip name, canonical form
    module: str  # import name
    minimum: str
    role: str  # "preinstalled": checked, never installed | "install" | "install-no-deps" | "onnxruntime"
    why: str
    alternatives: tuple[str, ...] = ()  # other distributions that provide the same module


# The one table of minimum versions. Floors, not pins: Colab runtimes from torch 2.6 (2025.07) on
# ship newer versions of most rows, and the installer leaves anything recent enough alone.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "2.6", "preinstalled", "Colab's build matches its CUDA driver"),
    Requirement("numpy", "numpy", "1.26", "preinstalled", "compiled packages are built against it"),
    Requirement("diffusers", "diffusers", "0.31", "install",
                "SDXL ControlNet pipeline, IP-Adapter loading (0.30 fails to load an adapter without an image encoder)"),
    Requirement("transformers", "transformers", "4.48.0", "install", "SDXL text encoders, ViTPose and Depth Anything annotators"),
    Requirement("accelerate", "accelerate", "0.31", "install", "low-memory loading and offload hooks"),
    Requirement("huggingface-hub", "huggingface_hub", "0.28.1", "install", "weight downloads (gradio 5.22 needs 0.28.1)"),
    Requirement("safetensors", "safetensors", "0.4.3", "install", "weights loaded straight to the GPU"),
    Requirement("psutil", "psutil", "5.9.4", "install", "memory measurements"),
    Requirement("packaging", "packaging", "22.0", "install", "version checks"),
    Requirement("pillow", "PIL", "9.5", "install", "images (pillow-heif 0.16 needs 9.5)"),
    Requirement("pillow-heif", "pillow_heif", "0.16", "install", "HEIC/HEIF photos from phones"),
    Requirement("gradio", "gradio", "5.22", "install", "the app (older 5.x crash at launch with pydantic >= 2.11)"),
    Requirement("peft", "peft", "0.6.2", "install", "LoRAs and LCM-LoRA (diffusers wants peft newer than 0.6.0)"),
    Requirement(
        "onnxruntime", "onnxruntime", "1.19", "onnxruntime",
        "face analysis; >=1.19 wheels are built for CUDA 12 + cuDNN 9 like Colab's torch",
        alternatives=("onnxruntime-gpu",),
    ),
    Requirement(
        "insightface", "insightface", "2.0", "install-no-deps",
        "face detection and ArcFace embedding; 0.7.3 is sdist-only and compiles C++ on install",
    ),
    # insightface's own requirements, installed by us because insightface goes in with --no-deps:
    # it declares the CPU `onnxruntime`, which would land beside onnxruntime-gpu on a CUDA machine.
    Requirement("onnx", "onnx", "1.13", "install", "required by insightface"),
    Requirement(
        "opencv-python", "cv2", "4.5.5.64", "install", "required by insightface; keypoint drawing; SFace, the identity benchmark's judge",
        alternatives=("opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"),
    ),
    Requirement("scikit-image", "skimage", "0.20", "install", "required by insightface (face alignment)"),
    Requirement("scipy", "scipy", "1.11.2", "install", "required by insightface (older ones refuse numpy 1.26); the identity benchmark's intervals"),
    Requirement("tqdm", "tqdm", "4.63", "install", "progress bars; 4.63 falls back to text bars in a notebook without ipywidgets"),
    Requirement("requests", "requests", "2.25", "install", "required by insightface"),
    Requirement("matplotlib", "matplotlib", "3.7", "install", "the ConvNeXtPose benchmark's plot (notebook 04)"),
)

# Optional extras: never installed by `install` (nor on Colab), reported by `doctor`; a feature that needs one says how
# to get it (`pip install "instantid-colab[EXTRA]"`, pyproject.toml's extras).
OPTIONAL: tuple[Requirement, ...] = (
    Requirement("ray", "ray", "2.50", "optional",
                "batch/bench --ray: rows on a Ray cluster, one worker per GPU (extra `ray`); 2.50 has Python 3.13 wheels"),
)

# The newest versions the whole test suite passed with (.ci/run's `tests` stage on 2026-11-24). The
# oldest are the floors above (its `floors` stage), except torch: CI reaches only torch 2.13.0 on the
# CPU; the GPU benchmarks ran torch 2.11. Raise these when CI has passed with newer releases.
TESTED_NEWEST: dict[str, str] = {
    "torch": "2.13.0", "numpy": "2.4.6", "diffusers": "0.42.1", "transformers": "5.23.0", "accelerate": "1.15.0",
    "huggingface-hub": "2.4.0", "safetensors": "0.8.0", "psutil": "7.2.2", "packaging": "26.2", "pillow": "12.3.0",
    "pillow-heif": "1.8.1", "gradio": "6.31.0", "peft": "0.21.2", "onnxruntime": "1.32.0", "insightface": "2.1",
    "onnx": "1.23.2", "opencv-python": "5.0.0.93", "scikit-image": "0.26.0", "scipy": "1.17.1", "tqdm": "4.70.1",
    "requests": "2.34.2", "matplotlib": "3.11.2",
}
TESTED_OLDEST_TORCH = "2.11"


def in_colab() -> bool:
    """True inside a Google Colab kernel (its `google.colab` module is only installed there)."""
    if "google.colab" in sys.modules:
        return True
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def tested_range(row: Requirement) -> tuple[str, str]:
    """(oldest, newest) version of `row` the project has run with."""
    return (TESTED_OLDEST_TORCH if row.distribution == "torch" else row.minimum), TESTED_NEWEST[row.distribution]


def _release(version: str) -> tuple[int, ...]:
    try:
        return Version(version).release
    except InvalidVersion:
        return ()


# Never changed by the installer, not even on request (`install --upgrade`): Colab's builds match its CUDA driver,
# and its compiled packages are built against its numpy.
PINNED: tuple[str, ...] = ("torch", "torchvision", "torchaudio", "numpy")

ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")

# Which onnxruntime-gpu releases are built for which CUDA major version, from the wheels' own `cuda` extra on PyPI
# (read 2026-12-06): up to 1.26.0 it asks for nvidia-cuda-runtime-cu12 ~=12.0, from 1.27.0 for ~=13.0. A build for
# another CUDA than torch's finds no CUDA libraries, and face analysis falls back to the CPU.
ONNXRUNTIME_GPU_FOR_CUDA: dict[str, str] = {"12": "<1.27", "13": ">=1.27"}


def onnxruntime_gpu_specifier(torch_cuda: str | None) -> str:
    """The onnxruntime-gpu releases that fit torch's CUDA version (e.g. "12.8"): our floor, and the CUDA bound."""
    bound = ONNXRUNTIME_GPU_FOR_CUDA.get((torch_cuda or "").split(".")[0])
    return ",".join(filter(None, (f">={requirement('onnxruntime').minimum}", bound)))


def requirement(distribution: str) -> Requirement:
    """The table row for `distribution`."""
    name = canonicalize_name(distribution)
    for row in REQUIREMENTS:
        if row.distribution == name:
            return row
    raise KeyError(f"{distribution} is not in environment.REQUIREMENTS")


def installed_versions() -> dict[str, str]:
    """Canonical distribution name -> version of everything installed (metadata only, no imports)."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonicalize_name(name), dist.version)
    return versions


def version_at_least(version: str, minimum: str) -> bool:
    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return True  # an unparsable local build: do not touch it


def installed_version(row: Requirement, versions: Mapping[str, str]) -> tuple[str, str] | None:
    """(distribution, version) that satisfies `row` best, or None when none of its names is installed."""
    found = [(name, versions[name]) for name in (row.distribution, *row.alternatives) if name in versions]
    if not found:
        return None
    return max(found, key=lambda item: version_at_least(item[1], row.minimum))


# ---------------------------------------------------------------------------------------------
# Report and check


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    total_gib: float


@dataclass(frozen=True)
class EnvironmentReport:
    python: str
    platform: str
    packages: dict[str, str | None]  # table rows and pinned packages -> installed version or None
    onnxruntime_distributions: tuple[str, ...]  # installed onnxruntime wheels (more than one is broken)
    onnxruntime_providers: tuple[str, ...] | None
    onnxruntime_error: str | None
    torch_cuda: str | None  # CUDA version torch was built with
    cudnn: int | None
    cuda_available: bool
    gpus: tuple[GpuInfo, ...]
    torch_error: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [f"Python {self.python} on {self.platform}"]
        if self.torch_error:
            lines.append(f"torch: cannot import ({self.torch_error})")
        else:
            lines.append(
                f"torch {self.packages.get('torch')}, CUDA build {self.torch_cuda or 'none'}, "
                f"cuDNN {self.cudnn or 'none'}, CUDA available: {'yes' if self.cuda_available else 'no'}"
            )
        for index, gpu in enumerate(self.gpus):
            major, minor = gpu.compute_capability
            lines.append(f"GPU {index}: {gpu.name}, compute capability {major}.{minor}, {gpu.total_gib:.1f} GiB")
        lines.append(f"  {'package':<16} {'installed':<16} {'floor':<10} tested")
        for row in REQUIREMENTS:
            oldest, newest = tested_range(row)
            version = self.packages.get(row.distribution) or "not installed"
            lines.append(f"  {row.distribution:<16} {version:<16} {row.minimum:<10} {oldest} to {newest}")
        for row in OPTIONAL:
            version = self.packages.get(row.distribution)
            how = "" if version else f'; pip install "instantid-colab[{row.distribution}]"'
            lines.append(f"  {row.distribution:<16} {version or 'not installed':<16} {row.minimum:<10} optional: "
                         f"{row.why}{how}")
        if self.onnxruntime_providers is not None:
            lines.append(f"onnxruntime providers: {', '.join(self.onnxruntime_providers)}")
        elif self.onnxruntime_error:
            lines.append(f"onnxruntime: cannot import ({self.onnxruntime_error})")
        return "\n".join(lines)


def _torch_facts() -> dict:
    try:
        import torch
    except Exception as error:  # broken installs raise more than ImportError
        return {"torch_error": f"{type(error).__name__}: {error}"}
    facts: dict = {"torch_cuda": torch.version.cuda, "cudnn": None, "cuda_available": False, "gpus": ()}
    if torch.cuda.is_available():
        facts["cuda_available"] = True
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["gpus"] = tuple(
            GpuInfo(props.name, (props.major, props.minor), round(props.total_memory / 2**30, 2))
            for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
        )
    return facts


def _onnxruntime_facts() -> dict:
    try:
        import onnxruntime
    except Exception as error:
        return {"onnxruntime_error": f"{type(error).__name__}: {error}"}
    return {"onnxruntime_providers": tuple(onnxruntime.get_available_providers())}


def report() -> EnvironmentReport:
    """Versions from package metadata; torch and onnxruntime are imported for CUDA and providers."""
    versions = installed_versions()
    packages: dict[str, str | None] = {}
    for row in (*REQUIREMENTS, *OPTIONAL):
        found = installed_version(row, versions)
        packages[row.distribution] = found[1] if found else None
    for name in PINNED:
        packages.setdefault(name, versions.get(name))
    facts = {
        "onnxruntime_providers": None, "onnxruntime_error": None, "torch_cuda": None, "cudnn": None,
        "cuda_available": False, "gpus": (), "torch_error": None,
    }
    facts.update(_torch_facts())
    facts.update(_onnxruntime_facts())
    return EnvironmentReport(
        python=platform.python_version(),
        platform=platform.platform(),
        packages=packages,
        onnxruntime_distributions=tuple(name for name in ONNXRUNTIME_DISTRIBUTIONS if name in versions),
        **facts,
    )


@dataclass(frozen=True)
class Problem:
    severity: str  # "error": a feature will not work | "warning": works, but slowly or with less | "note": FYI
    package: str
    message: str
    fix: str

    def render(self) -> str:
        return f"[{self.severity}] {self.package}: {self.message} Fix: {self.fix}"


def check(env: EnvironmentReport) -> list[Problem]:
    """Everything in `env` that is missing, too old or inconsistent, each with the next step."""
    problems: list[Problem] = []
    for row in REQUIREMENTS:
        version = env.packages.get(row.distribution)
        if row.role == "onnxruntime":
            continue
        if row.role == "preinstalled":
            fix = (
                "choose a Colab runtime with a newer PyTorch (Runtime > Change runtime type > Runtime version); "
                "the installer never changes it"
                if row.distribution == "torch"
                else "use the runtime's own numpy; the installer never changes it"
            )
        else:
            fix = INSTALL_HINT
        if version is None:
            problems.append(Problem("error", row.distribution, f"not installed ({row.why}).", fix))
        elif not version_at_least(version, row.minimum):
            problems.append(Problem("error", row.distribution, f"{version} is older than {row.minimum}.", fix))
    problems.extend(_onnxruntime_problems(env))
    if env.torch_error is None and not env.cuda_available:
        problems.append(Problem(
            "warning", "cuda", "no CUDA GPU: SDXL runs on the CPU, many minutes per image.",
            "in Colab: Runtime > Change runtime type > T4 GPU.",
        ))
    return problems


def untested(env: EnvironmentReport) -> list[Problem]:
    """Notes for installed versions outside the range the test suite has run with (to the precision the
    newest is written in: insightface "2.1" covers 2.1.x): not problems, newer releases usually work,
    but the first thing to look at when something breaks."""
    notes = []
    for row in REQUIREMENTS:
        version, (oldest, newest) = env.packages.get(row.distribution), tested_range(row)
        if version and version_at_least(version, row.minimum) and not (
                _release(oldest) <= _release(version)[:len(_release(newest))] <= _release(newest)):
            notes.append(Problem(
                "note", row.distribution, f"{version} is outside the tested range {oldest} to {newest}: it should "
                "work, this combination has just not been run here.",
                f"if something fails, pip install '{row.distribution}=={newest}'"
                if row.role != "preinstalled" else "report what fails, with `python -m instantid_colab doctor --json`"))
    return notes


def _onnxruntime_problems(env: EnvironmentReport) -> list[Problem]:
    row = requirement("onnxruntime")
    wanted = "onnxruntime-gpu" if env.cuda_available else "onnxruntime"
    if len(env.onnxruntime_distributions) > 1:
        return [Problem(
            "error", "onnxruntime",
            "both onnxruntime and onnxruntime-gpu are installed; they ship the same module and overwrite "
            "each other's files, so face analysis may load the wrong one or fail.",
            f"{INSTALL_HINT} (keeps only {wanted})",
        )]
    if not env.onnxruntime_distributions:
        return [Problem("error", "onnxruntime", f"not installed ({row.why}).", f"{INSTALL_HINT} (installs {wanted})")]
    version = env.packages.get("onnxruntime")
    if version and not version_at_least(version, row.minimum):
        return [Problem("error", "onnxruntime", f"{version} is older than {row.minimum}.", INSTALL_HINT)]
    if env.onnxruntime_error:
        return [Problem("error", "onnxruntime", f"installed but cannot be imported: {env.onnxruntime_error}.",
                        f"{INSTALL_HINT}, then restart the runtime")]
    if env.cuda_available and env.onnxruntime_distributions == ("onnxruntime",):
        return [Problem("warning", "onnxruntime", "the CPU build is installed on a CUDA machine: face analysis runs on the CPU.",
                        f"{INSTALL_HINT} (swaps in onnxruntime-gpu)")]
    providers = env.onnxruntime_providers or ()
    if env.cuda_available and "CUDAExecutionProvider" not in providers:
        return [Problem("warning", "onnxruntime", "onnxruntime-gpu has no CUDAExecutionProvider: face analysis runs on the CPU.",
                        "install an onnxruntime-gpu built for this CUDA (>=1.19 for CUDA 12), then restart the runtime")]
    return []


def dev_requirements() -> list[str]:
    """The `dev` extra of this package's installed metadata (pyproject.toml is the one source)."""
    try:
        declared = importlib.metadata.requires("instantid-colab") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("instantid-colab is not installed as a package: run `pip install --no-deps -e .` first") from None
    specs = []
    for line in declared:
        try:
            parsed = PackagingRequirement(line)
        except InvalidRequirement:
            continue
        if parsed.marker is not None and parsed.marker.evaluate({"extra": "dev"}) and not parsed.marker.evaluate({"extra": ""}):
            specs.append(f"{parsed.name}{parsed.specifier}")
    return specs


# ---------------------------------------------------------------------------------------------
# The floors, as CI installs them


def floor_pins() -> list[str]:
    """`name==floor` for every row but torch (CI keeps the torch it has: no CPU wheel of the torch floor
    is reachable there), with the CPU onnxruntime. `.ci/run`'s floors stage installs exactly these."""
    return [f"{row.distribution}=={row.minimum}" for row in REQUIREMENTS if row.distribution != "torch"]


if __name__ == "__main__":  # for setup_colab.sh and .ci/run: one requirement per line
    if sys.argv[1:] in (["--floors"], ["--dev"]):
        print("\n".join(floor_pins() if sys.argv[1] == "--floors" else dev_requirements()))
    elif len(sys.argv) == 3 and sys.argv[1] == "--onnxruntime-gpu":
        print(f"onnxruntime-gpu{onnxruntime_gpu_specifier(sys.argv[2])}")
    elif len(sys.argv) == 3 and sys.argv[1] == "--requirement":
        try:
            row = requirement(sys.argv[2])
        except KeyError as error:
            sys.exit(error.args[0])
        print(f"{row.distribution}>={row.minimum}")
    else:
        sys.exit("usage: python3 -m instantid_colab.environment --floors | --dev | --requirement NAME | "
                 "--onnxruntime-gpu CUDA_VERSION")
