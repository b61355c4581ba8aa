#!/usr/bin/env bash
# Set up instantid-colab on Colab or a plain Linux machine. Safe to run again: a second run
# changes nothing. Usage: bash setup_colab.sh [--dev]   (--dev adds the test tools)
#
# What to install lives in one place, instantid_colab/environment.py; this script only makes
# sure torch, packaging and numpy exist, installs the package itself, and calls
# `python3 -m instantid_colab install`, which runs on the standard library and packaging alone.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

dev=""
for arg in "$@"; do
    case "$arg" in
        --dev) dev="--dev" ;;
        *) echo "usage: bash setup_colab.sh [--dev]" >&2; exit 2 ;;
    esac
done

# 0. Debian's and Ubuntu's own Python refuses pip installs (PEP 668): say how to get a venv instead of
#    pip's long error. Colab's Python and any venv are not "externally managed".
managed='import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
if [ "$("$PYTHON" -c "$managed")" = "True" ]; then
    echo "This Python ($("$PYTHON" -c 'import sys; print(sys.executable)')) is managed by the system and refuses" >&2
    echo "pip installs. Make a virtual environment first, then run this script again inside it:" >&2
    echo "  python3 -m venv .venv && . .venv/bin/activate    (Debian/Ubuntu: apt install python3-venv)" >&2
    exit 1
fi

# 1. torch. On Colab it is preinstalled and built for the runtime's CUDA driver: never touch it.
#    On a machine without it, install an explicit version: a bare `pip install torch` resolves to
#    the CUDA build and downloads several GB of CUDA libraries. Set TORCH_INDEX_URL (e.g.
#    https://download.pytorch.org/whl/cpu or .../cu126) to choose the build.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "torch is not installed: installing torch==${TORCH_VERSION:-2.13.0}"
    "$PYTHON" -m pip install "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

# 2. packaging: the installer reads versions with it (pip vendors its own copy, which is not importable).
if ! "$PYTHON" -c "import packaging" 2>/dev/null; then
    "$PYTHON" -m pip install "packaging>=22.0"
fi

# 3. The package itself, editable and without dependencies (step 5 handles those), skipped when
#    this checkout is already the installed one.
check_here='import pathlib, sys, instantid_colab; print(pathlib.Path(instantid_colab.__file__).resolve().parents[1] == pathlib.Path(sys.argv[1]).resolve())'
here="$PWD"
installed_here=$(cd / && "$PYTHON" -c "$check_here" "$here" 2>/dev/null || true)
if [ "$installed_here" != "True" ]; then
    # With setuptools at hand, build with it; a venv of Python >= 3.12 has none, and pip fetches it.
    isolation=$("$PYTHON" -c "import setuptools" 2>/dev/null && echo --no-build-isolation || true)
    "$PYTHON" -m pip install --no-deps $isolation -e .
fi

# 4. numpy: an installed one (Colab's, built against by its compiled packages) is never changed; a
#    machine without one (torch's wheel does not bring it) gets the floor from environment.py.
if ! "$PYTHON" -c "import numpy" 2>/dev/null; then
    "$PYTHON" -m pip install "$("$PYTHON" -m instantid_colab.environment --requirement numpy)"
fi

# 5. Everything else, without changing torch/torchvision/torchaudio/numpy and with exactly one
#    onnxruntime (onnxruntime-gpu when CUDA is available).
"$PYTHON" -m instantid_colab install $dev
