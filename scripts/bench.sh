#!/usr/bin/env bash
# The main job: installs what it needs, builds the native extension in place, then races every contender
# (the naive loop, ours, transformers' experts implementations) on the CPU layers of bench/configs.py and
# prints a short summary first, then where the full table, the JSON and the plot went.
#   bash scripts/bench.sh [bench.run arguments]     (default: 1 thread, uniform routing, T = 1, 16, 256)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --in-place >&2
exec "${PYTHON:-python3}" -m bench.run --routings uniform "$@"
