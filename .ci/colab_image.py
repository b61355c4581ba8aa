"""Rewrite the record of Colab's GPU image from a newer freeze of googlecolab/backend-info, and the lock of what
our install adds there.

    python3 .ci/colab_image.py PIP_FREEZE_GPU OS_INFO_GPU --date YYYY-MM-DD --commit SHA [--no-lock]
    python3 .ci/colab_image.py lock VENV_PYTHON IMAGE_FREEZE INSTALLED_FREEZE     (what `.ci/run colab_lock` calls)

Writes, each one line per package, so following Colab is a one-line diff per package in review:
- instantid_colab/colab_image.txt: Colab's versions of what the project, its notebooks and its tests import
  (environment.REQUIREMENTS with every alternative, the preinstalled stack, the `dev` extra and the packages a
  notebook kernel runs on), and which of them the image lacks; `doctor` compares against it;
- .ci/colab-freeze.txt: the whole freeze as pip constraints, so CI's `colab` stage resolves every other package to
  Colab's version too; left out what PyPI cannot give: local labels such as +cu128, packages installed from URLs,
  and the CUDA libraries (nvidia-*, cuda-*: PyPI's torch of the same version is the CUDA 13 build and brings its own);
- instantid_colab/colab_lock.txt (unless --no-lock): `.ci/run colab_lock` builds that image in a venv and lets
  `python -m instantid_colab install --dev --resolve` add what it lacks (the newest releases that fit it); what it
  added is the lock, which the installer then uses and CI's `colab` stage installs and tests.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instantid_colab import environment  # noqa: E402  (after the path: this script runs from a checkout)

# What a notebook kernel runs on besides our own requirements: the kernel, its client and the widgets.
NOTEBOOK_KERNEL = ("ipykernel", "jupyter-client", "ipython", "ipywidgets")
CUDA_LIBRARIES = ("nvidia-", "cuda-")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze_pins(text: str) -> dict[str, str]:
    """`name==version` lines of a pip freeze, by canonical name (URL and editable installs left out)."""
    pins = {}
    for line in text.splitlines():
        name, equals, version = line.strip().partition("==")
        if equals and not line.startswith(("#", "-")) and "@" not in line:
            pins[canonical(name)] = version.strip()
    return pins


def wanted() -> list[str]:
    names = [row.distribution for row in environment.REQUIREMENTS]
    names += [alternative for row in environment.REQUIREMENTS for alternative in row.alternatives]
    names += list(environment.PINNED) + list(NOTEBOOK_KERNEL)
    with open(ROOT / "pyproject.toml", "rb") as handle:
        dev = tomllib.load(handle)["project"]["optional-dependencies"]["dev"]
    names += [re.split(r"[<>=!~ \[;]", item)[0] for item in dev]
    return sorted({canonical(name) for name in names})


def write_lock(python: str, image_freeze: str, installed_freeze: str, record: Path, lock: Path) -> list[str]:
    """The lock: what the install added to the image (the package itself left out), under the record's header,
    and the onnxruntime-gpu pip chooses there for the image's CUDA (CI has no GPU, so its install added the CPU
    wheel; `python` is the image venv's interpreter, asked for a dry run)."""
    before, after = freeze_pins(Path(image_freeze).read_text()), freeze_pins(Path(installed_freeze).read_text())
    added = {name: version for name, version in after.items() if name not in before and name != "instantid-colab"}
    torch = freeze_pins(record.read_text())["torch"]
    cuda = re.search(r"\+cu(\d+)(\d)$", torch)
    gpu = f"onnxruntime-gpu{environment.onnxruntime_gpu_specifier(cuda and f'{cuda[1]}.{cuda[2]}')}"
    with tempfile.TemporaryDirectory() as folder:
        constraints, report = Path(folder, "constraints.txt"), Path(folder, "report.json")
        constraints.write_text("\n".join(f"{name}=={version}" for name, version in after.items()) + "\n")
        subprocess.run([python, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), "-c",
                        str(constraints), gpu], check=True)
        added.update({canonical(item["metadata"]["name"]): item["metadata"]["version"]
                      for item in json.loads(report.read_text())["install"]})
    header = [line for line in record.read_text().splitlines() if line.startswith(("# Colab's GPU", "# python"))]
    header.append("# What `python -m instantid_colab install --dev` adds to that image, at the versions CI's colab stage "
                  f"installs and tests; onnxruntime-gpu as pip chooses it there ({gpu}, for the image's CUDA; CI has "
                  "no GPU). Written by .ci/colab_image.py; do not edit by hand.")
    lines = header + [f"{name}=={version}" for name, version in sorted(added.items())]
    lock.write_text("\n".join(lines) + "\n")
    return lines[len(header):]


def main() -> int:
    if sys.argv[1:2] == ["lock"]:
        _, _, python, image_freeze, installed_freeze = sys.argv
        pins = write_lock(python, image_freeze, installed_freeze, ROOT / "instantid_colab" / "colab_image.txt",
                          ROOT / "instantid_colab" / "colab_lock.txt")
        print(f"instantid_colab/colab_lock.txt: {len(pins)} additions: {', '.join(pins)}")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("freeze")
    parser.add_argument("os_info")
    parser.add_argument("--date", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--record", default=str(ROOT / "instantid_colab" / "colab_image.txt"))
    parser.add_argument("--constraints", default=str(ROOT / ".ci" / "colab-freeze.txt"))
    parser.add_argument("--no-lock", action="store_true", help="rewrite the record only, not the lock")
    args = parser.parse_args()
    pins = freeze_pins(Path(args.freeze).read_text())
    python = re.search(r"^Python (\S+)", Path(args.os_info).read_text(), re.M).group(1)
    names = wanted()
    header = [f"# Colab's GPU runtime image: googlecolab/backend-info {args.commit[:7]}, {args.date}",
              f"# python {python}",
              "# Written by .ci/colab_image.py from pip-freeze.gpu.txt and os-info-gpu.txt; do not edit by hand."]
    lines = header + [f"{name}=={pins[name]}" for name in names if name in pins]
    lines.append("# not in the image: " + ", ".join(name for name in names if name not in pins))
    Path(args.record).write_text("\n".join(lines) + "\n")
    constraints = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())
                   if not name.startswith(CUDA_LIBRARIES)]
    Path(args.constraints).write_text("\n".join(header[:2] + constraints) + "\n")
    print(f"{len(lines) - len(header) - 1} of {len(names)} packages pinned; {len(constraints)} constraints")
    if args.no_lock:
        return 0
    return subprocess.run(["bash", str(ROOT / ".ci" / "run"), "colab_lock"], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
