#!/usr/bin/env bash
# Sets everything up, then runs the main job: the benchmark and correctness check against the naive loop.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m bench.run "$@"
