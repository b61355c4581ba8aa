"""`python -m instantid_colab doctor|install` on this machine and on machines missing parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instantid_colab import engines, environment
from instantid_colab.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_json_is_one_object_with_the_plan_and_the_controls_outlook():
    done = subprocess.run([sys.executable, "-m", "instantid_colab", "doctor", "--json"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    data = json.loads(done.stdout)
    assert set(data) == {"environment", "memory", "plan", "controls", "identity_methods", "colab_image"}
    assert list(data["identity_methods"]) == list(engines.METHODS)  # every method in the registry, in its order
    assert all(note["severity"] == "note" for note in data["environment"]["notes"])
    assert list(data["controls"]) == ["+pose", "+pose+canny+depth"]
    if not data["environment"]["cuda_available"]:
        assert [p["place"] for p in data["controls"]["+pose+canny+depth"]] == ["cpu", "cpu", "cpu"]
    assert data["environment"]["packages"]["torch"].startswith("2.")
    assert data["memory"]["ram_total_gib"] > 0
    if not data["environment"]["cuda_available"]:
        assert data["plan"]["placement"] == "cpu"
        assert data["identity_methods"]["faceid-plusv2"].startswith("1.39 GiB of layers beside the UNet on the CPU")
        assert {"package": "cuda", "severity": "warning"}.items() <= data["environment"]["problems"][-1].items()
    assert done.returncode == (1 if any(p["severity"] == "error" for p in data["environment"]["problems"]) else 0)


def without(monkeypatch, *distributions):
    real = environment.installed_versions
    monkeypatch.setattr(environment, "installed_versions",
                        lambda: {k: v for k, v in real().items() if k not in distributions})


def test_doctor_without_insightface_and_onnxruntime_says_what_to_run(monkeypatch, capsys):
    without(monkeypatch, "insightface", "onnxruntime", "onnxruntime-gpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if absent
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[error] insightface: not installed" in out
    assert "[error] onnxruntime: not installed" in out
    assert "Fix: python -m instantid_colab install" in out
    assert "placement " in out and "why: " in out


def test_doctor_with_both_onnxruntime_packages(monkeypatch, capsys):
    real = environment.installed_versions
    monkeypatch.setattr(environment, "installed_versions", lambda: {**real(), "onnxruntime": "1.22.0", "onnxruntime-gpu": "1.22.0"})
    assert main(["doctor", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["environment"]["problems"]
    assert [p["package"] for p in problems if p["severity"] == "error"] == ["onnxruntime"]
    assert "both onnxruntime and onnxruntime-gpu" in problems[0]["message"]


def test_doctor_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    without(monkeypatch, "torch")
    assert main(["doctor", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["environment"]["torch_error"].startswith("ModuleNotFoundError")
    assert data["plan"]["placement"] == "cpu" and data["memory"]["gpus"] == []


def test_install_dry_run_here_changes_nothing(capsys):
    if any(p.severity == "error" for p in environment.check(environment.report())):
        pytest.skip("this machine lacks a package; the statement below is about a complete one")
    assert main(["install", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == "Nothing to add: every required package is installed and recent enough."


def test_doctor_shows_floor_and_tested_range_and_notes_an_untested_version(monkeypatch, capsys):
    real = environment.installed_versions
    monkeypatch.setattr(environment, "installed_versions", lambda: {**real(), "diffusers": "9.0.0"})
    main(["doctor"])
    out = capsys.readouterr().out
    assert "package          installed        floor      tested" in out
    assert f"diffusers        9.0.0            0.31       0.31 to {environment.TESTED_NEWEST['diffusers']}" in out
    assert "[note] diffusers: 9.0.0 is outside the tested range" in out
    assert "[error] diffusers" not in out
