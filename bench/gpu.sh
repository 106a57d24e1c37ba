#!/usr/bin/env bash
# The whole GPU run in one 10-minute device call: install (no network), GPU tests, the sm_90a compile audit and
# the real-size traffic meter (counted work to set beside the times), layer benchmark (bf16), stage
# microbenchmarks if time is left. Everything lands flat in $OUT (8 files, what one device call returns):
#   env.txt          nvidia-smi, python/torch/triton/transformers versions, git commit, pip install -e .
#   pytest.log       python3 -m pytest tests -x -q
#   counted.tar.gz   compile-audit-sm90a.{json,md}: python3 -m bench.compile_audit --archs sm_90a (all configs,
#                    T and dtypes); traffic-real-<layer>.{json,md}: python3 -m bench.traffic --real --tokens 1
#                    --forward-only, one process per layer, those that finish within TRAFFIC_S (default 90 s)
#   <gpu>-<date>.json/.txt   python3 -m bench.run --device cuda --dtype bfloat16 (the .png is left out, to
#                    keep to 8 files: python3 -m bench.plot <gpu>-<date>.json draws it)
#   routing-cuda.json/.txt  python3 -m bench.routing (issue 5's routing-stage table)
#   microbench.txt   python3 -m pytest bench/test_microbench.py (skipped when under 60 s remain)
# Usage (repository root):  OUT=/tmp/out bash bench/gpu.sh   [BENCH_ARGS="--configs Mixtral"]
set -u
OUT=${OUT:-/tmp/moe-bench-out}
mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-570}   # the device call allows 600 s; keep 30 s for copying $OUT back
left() { echo $((TOTAL_S - SECONDS)); }

{
  date -u
  git rev-parse --short HEAD 2>/dev/null && git status --short | head -20
  nvidia-smi || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "numpy", "matplotlib", "tqdm", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", type(error).__name__, error)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1

{
  if [ -f setup.py ] || [ -f pyproject.toml ]; then
    timeout 240 python3 -m pip install --no-build-isolation --no-deps -e . ; echo "pip exit: $?"
  else
    echo "no setup.py / pyproject.toml in this checkout: not installed; running from the source tree"
  fi
  python3 -c "import moe_kernels; print('backends:', moe_kernels.available_backends())"
} >> "$OUT/env.txt" 2>&1

if [ -d tests ]; then
  timeout $(( $(left) / 3 )) python3 -m pytest tests -x -q > "$OUT/pytest.log" 2>&1
  echo "pytest exit: $?" >> "$OUT/pytest.log"
else
  echo "no tests/ in this checkout" > "$OUT/pytest.log"
fi

# Counted work: what the kernels compile to on this GPU's architecture and what they request at the real sizes
# (bench/compile_audit.py, bench/traffic.py). The meter runs the kernels under the interpreter on the CPU, one
# process per layer; a layer that does not finish in TRAFFIC_S leaves no file (the log says so).
counted=$(mktemp -d)
timeout 150 python3 -m bench.compile_audit --archs sm_90a --out "$counted" --name compile-audit-sm90a \
  --jobs "$(nproc)" > "$counted/compile-audit.log" 2>&1
echo "compile_audit exit: $?" >> "$counted/compile-audit.log"
for layer in Mixtral Qwen3 DeepSeek Switch Shazeer; do
  ( timeout "${TRAFFIC_S:-90}" env TRITON_INTERPRET=1 python3 -m bench.traffic --real --configs "$layer" --tokens 1 \
      --forward-only --out "$counted" --name "traffic-real-$layer"
    echo "bench.traffic exit: $? (124: stopped at TRAFFIC_S)" ) > "$counted/traffic-$layer.log" 2>&1 &
done
wait
tar -czf "$OUT/counted.tar.gz" -C "$counted" . && rm -rf "$counted"

# The benchmark stops starting new points at its time budget and writes its JSON after each config.
budget=$(( $(left) - 90 ))
if [ "$budget" -gt 30 ]; then
  timeout $(( budget + 60 )) python3 -m bench.run --device cuda --dtype bfloat16 --time-budget "$budget" \
    --out "$OUT" ${BENCH_ARGS:-} > /dev/null 2> "$OUT/bench-stderr.tmp"
  status=$?
  txt=$(ls "$OUT"/*.txt 2>/dev/null | grep -v -e env.txt -e microbench.txt | head -1)
  { echo; echo "# bench.run exit: $status; its last stderr lines:"; tail -n 15 "$OUT/bench-stderr.tmp" | tr '\r' '\n' | tail -n 15; } >> "${txt:-$OUT/bench-failed.txt}"
  rm -f "$OUT/bench-stderr.tmp" "$OUT"/*.png
fi

if [ "$(left)" -gt 90 ]; then
  timeout 60 python3 -m bench.routing --device cuda --out "$OUT" > /dev/null 2>&1
fi

if [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 20 )) python3 -m pytest bench/test_microbench.py -q -p no:cacheprovider \
    --benchmark-columns=median,iqr,min,rounds --benchmark-max-time=0.2 > "$OUT/microbench.txt" 2>&1
fi
ls -la "$OUT"
