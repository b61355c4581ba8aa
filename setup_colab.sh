#!/usr/bin/env bash
# Set up instantid-colab on Colab or a plain Linux machine. Safe to run again: a second run
# changes nothing. Usage: bash setup_colab.sh [--dev]   (--dev adds the test tools)
#
# What to install lives in one place, instantid_colab/environment.py; this script only makes
# sure torch exists, installs the package itself, and calls `python -m instantid_colab install`.
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

# 1. torch. On Colab it is preinstalled and built for the runtime's CUDA driver: never touch it.
#    On a machine without it, install an explicit version: a bare `pip install torch` resolves to
#    the CUDA build and downloads several GB of CUDA libraries. Set TORCH_INDEX_URL (e.g.
#    https://download.pytorch.org/whl/cpu or .../cu126) to choose the build.
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "torch is not installed: installing torch==${TORCH_VERSION:-2.13.0}"
    "$PYTHON" -m pip install "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

# 2. The package itself, editable and without dependencies (step 3 handles those), skipped when
#    this checkout is already the installed one.
check_here='import pathlib, sys, instantid_colab; print(pathlib.Path(instantid_colab.__file__).resolve().parents[1] == pathlib.Path(sys.argv[1]).resolve())'
here="$PWD"
installed_here=$(cd / && "$PYTHON" -c "$check_here" "$here" 2>/dev/null || true)
if [ "$installed_here" != "True" ]; then
    "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi

# The installer reads versions with `packaging` (pip vendors its own copy, which is not importable).
if ! "$PYTHON" -c "import packaging" 2>/dev/null; then
    "$PYTHON" -m pip install "packaging>=23"
fi

# 3. Everything else, without changing torch/torchvision/torchaudio/numpy and with exactly one
#    onnxruntime (onnxruntime-gpu when CUDA is available).
"$PYTHON" -m instantid_colab install $dev
