#!/usr/bin/env bash
# Sets everything up, then runs the test suite (Triton kernels under the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
