"""The Colab image this release was tested on, and how the machine at hand differs from it.

`colab_image.txt` beside this module records Colab's GPU runtime as googlecolab/backend-info publishes it (the
Python version, and Colab's versions of what the project, its notebooks and its tests import; `.ci/colab_image.py`
rewrites it from a newer freeze). CI's `colab` stage installs exactly those versions on that Python and runs the
notebooks and the tests there. `doctor` lists where this machine differs, so a bug report says at once whether
the runtime moved.

`colab_lock.txt` records what `python -m instantid_colab install --dev` added on that image, at the versions CI's
`colab` stage installed and ran the tests on (written by `.ci/colab_image.py`, in the record's format). The installer
adds those versions when the lock fits the machine; `doctor` says where the additions here differ from it.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

RECORD = Path(__file__).with_name("colab_image.txt")
LOCK = Path(__file__).with_name("colab_lock.txt")


@dataclass(frozen=True)
class ColabImage:
    source: str  # "googlecolab/backend-info a724079, 2026-08-19"
    python: str
    pins: dict[str, str] = field(default_factory=dict)  # canonical name -> Colab's version (local label kept)

    @property
    def date(self) -> str:
        return self.source.rsplit(", ", 1)[-1]

    def describe(self) -> str:
        return (f"Colab's GPU image of {self.date} ({self.source.rsplit(',', 1)[0]}): Python {self.python}, "
                f"torch {self.pins.get('torch', 'none')}")


@dataclass(frozen=True)
class Difference:
    name: str
    here: str | None  # None: not installed here
    image: str

    def render(self, against: str = "image") -> str:
        return f"{self.name} {self.here or 'not installed'} ({against}: {self.image})"


def load(path: Path = RECORD) -> ColabImage:
    """The record: `# Colab's GPU runtime image: SOURCE`, `# python X.Y.Z`, then one pin a line (other comments,
    such as what the image lacks, are for people)."""
    source = python = ""
    pins: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# Colab's GPU runtime image: "):
            source = line.split(": ", 1)[1]
        elif line.startswith("# python "):
            python = line.split()[-1]
        elif "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return ColabImage(source, python, pins)


def load_lock(path: Path = LOCK) -> ColabImage | None:
    """The additions proven on the image (same format as the record); None when the file is missing."""
    return load(path) if path.is_file() else None


def same_release(here: str, image: str) -> bool:
    """Equal as released versions: Colab's torch 2.11.0+cu128 is PyPI's 2.11.0 (+cu130) for our purposes."""
    try:
        return Version(here).public == Version(image).public
    except InvalidVersion:
        return here == image


def differences(image: ColabImage, versions: dict[str, str], python: str | None = None) -> list[Difference]:
    """Where `versions` (canonical name -> version installed here) and this Python differ from the image's pins
    (what the image lacks is what `install` adds: not a difference)."""
    found = []
    python = python or platform.python_version()
    if re.match(r"\d+\.\d+", python).group() != re.match(r"\d+\.\d+", image.python).group():
        found.append(Difference("python", python, image.python))
    for name, pinned in sorted(image.pins.items()):
        here = versions.get(name)
        if here is None or not same_release(here, pinned):
            found.append(Difference(name, here, pinned))
    return found


def lock_differences(lock: ColabImage | None, versions: dict[str, str]) -> list[Difference]:
    """The additions installed here at other versions than the lock's (what is missing, `install` adds)."""
    if lock is None:
        return []
    return [Difference(name, versions[name], pinned) for name, pinned in sorted(lock.pins.items())
            if name in versions and not same_release(versions[name], pinned)]
