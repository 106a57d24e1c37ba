#!/usr/bin/env bash
# Installs what moe_kernels needs into the current python3, then the package itself (editable, with its
# native extension). A torch that is already installed is kept (the GPU machine has its own CUDA build
# and no network); otherwise torch 2.13.0 is pinned so pip never resolves a CUDA build.
#
#   bash scripts/setup.sh [--in-place]
#
# --in-place builds moe_kernels._C inside this checkout instead of installing the package: what the main
# job (scripts/bench.sh, run from the checkout) needs, and it leaves the python's installed packages alone.
# The benchmark's optional contenders and tools (transformers, matplotlib, tqdm) are installed too; the
# package never imports them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    pip_install torch==2.13.0
fi
# Installed only where missing: pip is never asked to re-resolve torch's dependencies.
declare -A requirements=([triton]="triton==3.9.0" [pytest]="pytest" [pytest_benchmark]="pytest-benchmark"
                         [ninja]="ninja" [pybind11]="pybind11" [setuptools]="setuptools"
                         [matplotlib]="matplotlib" [tqdm]="tqdm")
missing=()
for module in "${!requirements[@]}"; do
    "$PYTHON" -c "import $module" 2>/dev/null || missing+=("${requirements[$module]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    pip_install "${missing[@]}"
fi
# transformers, for the tests of moe_kernels.integrations.transformers (moe_kernels never imports it): pinned,
# as the ExpertsInterface it plugs into is young; its requirements do not include torch. Without a network (the
# GPU machine) it stays missing and those tests skip.
TRANSFORMERS_VERSION=5.23.0
if ! "$PYTHON" -c "import sys, transformers; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
    pip_install "transformers==$TRANSFORMERS_VERSION" || echo "transformers==$TRANSFORMERS_VERSION not installed: its tests skip"
fi
if [ "${1:-}" = "--in-place" ]; then
    MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" setup.py --quiet build_ext --inplace
else
    MAX_JOBS=${MAX_JOBS:-2} pip_install --no-build-isolation --no-deps -e .
fi
"$PYTHON" -c "import moe_kernels; print('moe_kernels backends:', ', '.join(moe_kernels.available_backends()))"
