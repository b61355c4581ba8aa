"""Tomorrow's package index, today: the real pip and the real installer in a venv that stands for Colab's image, over a
local index of tiny stand-in wheels built here (a wheel is a zip whose METADATA names its Requires-Dist).

The index has moved on as PyPI does: the newest pillow-heif needs a newer pillow than the image has. The installer
must add what is missing with the image unchanged, say in one sentence when nothing fits, and fall back from a lock
whose version the index no longer has.
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from instantid_colab.environment import PINNED, REQUIREMENTS

ROOT = Path(__file__).resolve().parents[1]
# The image: every table row installed except what Colab lacks, pillow at Colab's 11.3.0, scipy older than our floor.
LACKING = {"onnxruntime", "insightface", "onnx", "pillow-heif"}
IMAGE = {name: "1.0.0" for name in PINNED} | {
    row.distribution: "99.0" for row in REQUIREMENTS if row.distribution not in LACKING and row.role != "preinstalled"
} | {"pillow": "11.3.0", "scipy": "1.0.0", "packaging": None}  # packaging: the real one, the installer imports it
INDEX = {  # (name, version): requirements
    ("pillow", "13.0.0"): (), ("pillow-heif", "1.0.0"): ("pillow>=11",), ("pillow-heif", "2.0.0"): ("pillow>=13",),
    ("onnx", "1.20.0"): ("protobuf>=4",), ("protobuf", "5.0.0"): (), ("protobuf", "6.0.0"): (),
    ("onnxruntime", "1.25.0"): (), ("insightface", "2.1"): ("onnxruntime",), ("scipy", "1.12.0"): (),
}
MODULES = {row.distribution: row.module for row in REQUIREMENTS} | {
    "torchvision": "torchvision", "torchaudio": "torchaudio", "protobuf": "google_protobuf_stand_in"}


TORCH = "class cuda:\n    is_available = staticmethod(lambda: False)\n\n\nclass version:\n    cuda = None\n"


def wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel of `name` with one empty module, its import name as in our table."""
    dist = name.replace("-", "_")
    files = {
        f"{MODULES.get(name, dist)}/__init__.py": f"__version__ = {version!r}\n" + TORCH * (name == "torch"),
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                                + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{dist}-{version}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_zip, text in files.items():
            archive.writestr(name_in_zip, text)
    return path


def pip_environment(index: Path) -> dict[str, str]:
    """pip reads only the local index: no config files (a machine's own constraints or indexes), no network."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    return environ | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
                      "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, Path]:
    """(a venv with the stand-in image, the index folder): built once, copied for each scenario."""
    base = tmp_path_factory.mktemp("registry")
    index, venv = base / "index", base / "image"
    index.mkdir()
    for (name, version), requires in INDEX.items():
        wheel(index, name, version, requires)
    stand_ins = [str(wheel(index, name, version)) for name, version in IMAGE.items() if version]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", *stand_ins], check=True,
                   env=pip_environment(index))
    import packaging  # the real one: the installer runs on it

    site = next((venv / "lib").glob("python3*/site-packages"))
    source = Path(packaging.__file__).parent
    shutil.copytree(source, site / "packaging")
    for info in source.parent.glob("packaging-*.dist-info"):
        shutil.copytree(info, site / info.name)
    return venv, index


def scenario(image, tmp_path: Path, drop: tuple[str, ...] = ()) -> tuple[Path, dict[str, str]]:
    """A copy of the image venv and the pip environment over the index (without the wheels named in `drop`)."""
    venv, index = image
    copy, own_index = tmp_path / "venv", tmp_path / "index"
    shutil.copytree(venv, copy, symlinks=True)
    shutil.copytree(index, own_index, ignore=shutil.ignore_patterns(*drop))
    return copy, pip_environment(own_index)


def freeze(venv: Path, environ: dict[str, str]) -> dict[str, str]:
    lines = subprocess.run([venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"], env=environ,
                           capture_output=True, text=True, check=True).stdout.split()
    return dict(line.lower().split("==") for line in lines if "==" in line)


def run(venv: Path, environ: dict[str, str], *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = ["-c", code, *args] if code else ["-m", "instantid_colab", "install", *args]
    return subprocess.run([venv / "bin" / "python", *command], env=environ, capture_output=True, text=True, cwd=venv)


def test_a_newer_release_that_needs_a_newer_preinstalled_package_gives_way_to_one_that_fits(image, tmp_path):
    venv, environ = scenario(image, tmp_path)
    before = freeze(venv, environ)
    done = run(venv, environ, "--resolve", "--upgrade", "scipy")

    after = freeze(venv, environ)
    assert done.returncode == 0, done.stdout + done.stderr
    assert after["pillow-heif"] == "1.0.0"  # 2.0.0 is newer, but needs pillow 13
    assert {name: after[name] for name in before if name != "scipy"} == {n: v for n, v in before.items() if n != "scipy"}
    assert after["scipy"] == "1.12.0"  # asked for by name
    assert {name for name in after if name not in before} == {"pillow-heif", "onnx", "protobuf", "onnxruntime", "insightface"}
    assert "Changed: scipy 1.0.0 -> 1.12.0" in done.stdout
    assert f"Kept as they were: {len(before) - 1} of the {len(before)} packages that were installed." in done.stdout


def test_a_package_older_than_our_floor_is_not_upgraded_unless_asked(image, tmp_path):
    venv, environ = scenario(image, tmp_path)
    done = run(venv, environ, "--resolve")
    assert done.returncode == 1 and freeze(venv, environ)["scipy"] == "1.0.0"
    assert ("NOT UPGRADED: scipy 1.0.0 is older than our floor 1.11.2 (required by insightface (older ones refuse numpy "
            "1.26); the identity benchmark's intervals); kept as installed. To upgrade it: `python -m instantid_colab "
            "install --upgrade scipy`, then restart the runtime (Runtime > Restart session).") in done.stdout
    refused = run(venv, environ, "--upgrade", "numpy,scipy")
    assert refused.returncode == 2 and "--upgrade numpy: the installer never changes numpy" in refused.stderr


def test_when_no_release_fits_one_sentence_names_both_packages_and_nothing_changes(image, tmp_path):
    venv, environ = scenario(image, tmp_path, drop=("pillow_heif-1.0.0-*",))
    before = freeze(venv, environ)
    done = run(venv, environ, "--resolve", "--upgrade", "scipy")

    assert done.returncode == 1
    assert ("FAILED: No release of pillow-heif fits the installed pillow 11.3.0 (pillow-heif 2.0.0 needs pillow>=13), "
            "and the installer changes nothing that is installed, so nothing was changed. Next: if changing pillow is "
            "acceptable here, `python -m instantid_colab install --upgrade pillow`, then restart the runtime (Runtime > "
            "Restart session).") in done.stdout
    assert freeze(venv, environ) == before


LOCKED = """\
# Colab's GPU runtime image: googlecolab/backend-info 0000000, 2026-12-06
# python {python}
onnx==1.20.0
onnxruntime==1.25.0
insightface==2.1
pillow-heif=={pillow_heif}
protobuf==5.0.0
"""
INSTALL_WITH_LOCK = """
import sys
from instantid_colab import colab_image, installer
report = installer.install(lock=colab_image.load(__import__("pathlib").Path(sys.argv[1])), upgrade=["scipy"])
print(report.render())
sys.exit(0 if report.ok else 1)
"""


@pytest.mark.parametrize("pillow_heif, route", [("1.0.0", "lock"), ("1.5.0", "resolved")])
def test_the_lock_is_used_when_the_index_has_it_and_resolution_takes_over_when_it_was_yanked(
        image, tmp_path, pillow_heif, route):
    venv, environ = scenario(image, tmp_path)
    lock = tmp_path / "lock.txt"
    lock.write_text(LOCKED.format(python=platform.python_version(), pillow_heif=pillow_heif))
    done = run(venv, environ, str(lock), code=INSTALL_WITH_LOCK)

    assert done.returncode == 0, done.stdout + done.stderr
    after = freeze(venv, environ)
    assert (after["pillow-heif"], after["pillow"]) == ("1.0.0", "11.3.0")
    if route == "lock":
        assert after["protobuf"] == "5.0.0"  # the lock's, not the index's newest (6.0.0)
        assert done.stdout.startswith("$ pip install") and "  protobuf    5.0.0        lock" in done.stdout
        assert "Added 5 (versions from the lock proven on Colab's image, googlecolab/backend-info 0000000" in done.stdout
    else:
        assert after["protobuf"] == "6.0.0"
        assert ("Added 5 (resolved by pip within our floors; the lock was not used: pip could not install it here "
                "(No matching distribution found for pillow-heif==1.5.0))") in done.stdout
