"""Colab's image as the repo records it (instantid_colab/colab_image.txt), the script that rewrites it from a
newer freeze, and what `doctor` says about a machine that differs from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement as PackagingRequirement

from instantid_colab import cli, colab_image, environment

ROOT = Path(__file__).resolve().parents[1]
FREEZE = """absl-py==1.4.0
diffusers==0.39.0
ipykernel==6.17.1
jupyter_kernel_gateway @ git+https://github.com/googlecolab/kernel_gateway@b134e99
nvidia-cudnn-cu12==9.10.2.21
cuda-toolkit==12.8.1
numpy==2.1.3
torch==2.11.0+cu128
transformers==5.15.0
"""
OS_INFO = "# generated\nUbuntu 22.04.5 LTS\nPython 3.13.15\nR version 4.6.1\n"


def test_the_record_is_colabs_python_313_image_with_its_kernel_packages():
    image = colab_image.load()
    assert image.python.startswith("3.13.") and image.date == "2026-08-19"
    assert image.pins["torch"] == "2.11.0+cu128" and image.pins["transformers"] == "5.15.0"
    assert (image.pins["ipykernel"], image.pins["jupyter-client"]) == ("6.17.1", "7.4.9")
    assert image.describe() == ("Colab's GPU image of 2026-08-19 (googlecolab/backend-info a724079): Python "
                                f"{image.python}, torch 2.11.0+cu128")
    text = colab_image.RECORD.read_text()
    lacking = next(line for line in text.splitlines() if line.startswith("# not in the image: "))
    for row in environment.REQUIREMENTS:  # every requirement is either pinned or named as lacking
        assert row.distribution in image.pins or row.distribution in lacking, row.distribution


def test_installing_on_the_image_changes_none_of_its_packages_because_every_floor_is_at_or_below_it():
    image = colab_image.load()
    for row in environment.REQUIREMENTS:
        if row.distribution in image.pins:
            assert environment.version_at_least(image.pins[row.distribution].split("+")[0], row.minimum), row
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = [line.strip().split('"')[1] for line in pyproject.split("dev = [", 1)[1].split("]", 1)[0].splitlines()
           if line.strip().startswith('"')]
    for spec in map(PackagingRequirement, dev):  # the test tools: Colab's Jupyter packages stay
        if environment.canonicalize_name(spec.name) in image.pins:
            assert spec.specifier.contains(image.pins[environment.canonicalize_name(spec.name)]), spec


def test_differences_compare_released_versions_and_the_python_minor_version():
    image = colab_image.ColabImage("googlecolab/backend-info abc1234, 2026-08-19", "3.13.15",
                                   {"torch": "2.11.0+cu128", "gradio": "6.24.0", "ipywidgets": "7.7.1"})
    found = colab_image.differences(image, {"torch": "2.11.0+cu130", "gradio": "6.31.0"}, python="3.13.0")
    assert [d.render() for d in found] == ["gradio 6.31.0 (image: 6.24.0)", "ipywidgets not installed (image: 7.7.1)"]
    moved = colab_image.differences(image, {"torch": "2.11.0", "gradio": "6.24.0", "ipywidgets": "7.7.1"},
                                    python="3.11.7")
    assert [d.render() for d in moved] == ["python 3.11.7 (image: 3.13.15)"]


def test_doctor_names_the_image_and_lists_what_differs_here(monkeypatch, capsys):
    image = colab_image.load()
    versions = {name: version for name, version in image.pins.items()} | {"transformers": "5.24.0"}
    monkeypatch.setattr(environment, "installed_versions", lambda: versions)
    monkeypatch.setattr(colab_image.platform, "python_version", lambda: image.python)
    cli.main(["doctor"])
    printed = capsys.readouterr().out
    assert f"Tested on {image.describe()}." in printed
    assert "Here 1 differ from it:\n  transformers 5.24.0 (image: 5.15.0)\n" in printed
    cli.main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["colab_image"]["differences"] == [{"name": "transformers", "here": "5.24.0", "image": "5.15.0"}]


def _rewrite(tmp_path: Path, freeze: str) -> tuple[list[str], list[str]]:
    (tmp_path / "freeze.txt").write_text(freeze)
    (tmp_path / "os.txt").write_text(OS_INFO)
    subprocess.run([sys.executable, str(ROOT / ".ci" / "colab_image.py"), str(tmp_path / "freeze.txt"),
                    str(tmp_path / "os.txt"), "--date", "2026-09-30", "--commit", "0123456789abcdef",
                    "--record", str(tmp_path / "record.txt"), "--constraints", str(tmp_path / "constraints.txt"),
                    "--no-lock"],
                   check=True, capture_output=True)
    return (tmp_path / "record.txt").read_text().splitlines(), (tmp_path / "constraints.txt").read_text().splitlines()


def test_the_script_rewrites_the_record_so_a_newer_freeze_is_a_one_line_diff(tmp_path):
    record, constraints = _rewrite(tmp_path, FREEZE)
    assert record[:2] == ["# Colab's GPU runtime image: googlecolab/backend-info 0123456, 2026-09-30",
                          "# python 3.13.15"]
    assert [line for line in record if not line.startswith("#")] == [
        "diffusers==0.39.0", "ipykernel==6.17.1", "numpy==2.1.3", "torch==2.11.0+cu128", "transformers==5.15.0"]
    assert constraints[2:] == ["absl-py==1.4.0", "diffusers==0.39.0", "ipykernel==6.17.1", "numpy==2.1.3",
                               "torch==2.11.0", "transformers==5.15.0"]  # no URLs, CUDA libraries or local labels
    newer, _ = _rewrite(tmp_path, FREEZE.replace("transformers==5.15.0", "transformers==5.16.0"))
    assert [(a, b) for a, b in zip(record, newer) if a != b] == [("transformers==5.15.0", "transformers==5.16.0")]
    loaded = colab_image.load(tmp_path / "record.txt")
    assert (loaded.python, loaded.date, loaded.pins["torch"]) == ("3.13.15", "2026-09-30", "2.11.0+cu128")


def test_the_lock_belongs_to_the_recorded_image_and_adds_only_what_the_image_lacks():
    image, lock = colab_image.load(), colab_image.load_lock()
    assert (lock.source, lock.python) == (image.source, image.python)
    assert lock.pins and not set(lock.pins) & set(image.pins)
    needed = {row.distribution for row in environment.REQUIREMENTS if row.distribution not in image.pins}
    assert needed <= set(lock.pins)  # every table row the image lacks has a tested version
    assert environment.version_at_least(lock.pins["onnxruntime-gpu"], environment.requirement("onnxruntime").minimum)
    cuda = image.pins["torch"].split("+cu")[1]
    assert PackagingRequirement("x" + environment.onnxruntime_gpu_specifier(f"{cuda[:-1]}.{cuda[-1]}")).specifier.contains(
        lock.pins["onnxruntime-gpu"])  # the build for the image's CUDA 12.8


def test_doctor_says_which_added_packages_differ_from_the_lock_and_what_that_risks(monkeypatch, capsys):
    image, lock = colab_image.load(), colab_image.load_lock()
    versions = dict(image.pins) | dict(lock.pins) | {"pillow-heif": "1.9.0"}
    monkeypatch.setattr(environment, "installed_versions", lambda: versions)
    monkeypatch.setattr(colab_image.platform, "python_version", lambda: image.python)
    cli.main(["doctor"])
    printed = capsys.readouterr().out
    assert "This runtime is that image: it has the image's versions of everything we use." in printed
    assert (f"Here 1 of the packages `install` adds differ from the versions tested on that image:\n"
            f"  pillow-heif 1.9.0 (tested: {lock.pins['pillow-heif']})\n  Risk: a combination CI has not run") in printed
    cli.main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)["colab_image"]
    assert report["tested_image"] is True
    assert report["lock_differences"] == [{"name": "pillow-heif", "here": "1.9.0", "image": lock.pins["pillow-heif"]}]
