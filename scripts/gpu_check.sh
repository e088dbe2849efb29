#!/usr/bin/env bash
# The first run on a GPU machine, in one command, under a time limit, into one JSON file.
#
#   scripts/gpu_check.sh                      # writes $OUT/gpu_check.json (or ./gpu_check.json)
#   scripts/gpu_check.sh /path/result.json
#
# 1. The GPU-relevant tests (networks incl. bfloat16 compute, the benchmark's FLOP counting and
#    timing, the samplers), `pytest -x -q` under TEST_LIMIT seconds, at full float32 matmul
#    precision (JAX_DEFAULT_MATMUL_PRECISION=highest, not TensorFloat-32).
# 2. scripts/benchmark.py --dtype bfloat16 on Ho et al.'s 35.7M-parameter CIFAR-10 UNet
#    (size `ddpm`) at batch 128, under BENCH_LIMIT seconds: the train step's images/s and
#    model FLOPs utilisation against the chip's dense bf16 peak, the sampler step vs one
#    forward (DDIM and ancestral), and the exact ELBO's images/s.
# The JSON holds both (the tests' exit status, summary line and seconds; the benchmark's own
# JSON), the GPU's name from nvidia-smi and the settings. The defaults fit in about 4 minutes on
# an H100/H200 (most of it compiling). Environment overrides, e.g. for a smoke run on a CPU:
#   SIZE=small BATCH=4 DTYPE=float32 SAMPLE_STEPS=2 ELBO_CHUNK=250 TESTS=tests/test_benchmark.py \
#   TEST_LIMIT=120 BENCH_LIMIT=400 scripts/gpu_check.sh /tmp/gpu_check.json
set -u
cd "$(dirname "$0")/.."
RESULT="${1:-${OUT:-.}/gpu_check.json}"
PY="${PYTHON:-python}"
SIZE="${SIZE:-ddpm}"
BATCH="${BATCH:-128}"
DTYPE="${DTYPE:-bfloat16}"
SAMPLE_STEPS="${SAMPLE_STEPS:-10}"
ELBO_CHUNK="${ELBO_CHUNK:-100}"
REPEATS="${REPEATS:-3}"
TESTS="${TESTS:-tests/test_models.py tests/test_benchmark.py tests/test_samplers.py}"
TEST_LIMIT="${TEST_LIMIT:-110}"
BENCH_LIMIT="${BENCH_LIMIT:-170}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$RESULT")"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$TMP/smi.txt" 2>/dev/null || true

start=$(date +%s)
# The tests check float32 identities to float32 rounding; GPUs would run their float32 matmuls
# and convolutions in TensorFloat-32 by default, so the tests ask for full float32 precision.
# shellcheck disable=SC2086
JAX_DEFAULT_MATMUL_PRECISION=highest PYTHONPATH="$PWD" timeout "$TEST_LIMIT" "$PY" -m pytest -x -q -p no:cacheprovider $TESTS > "$TMP/tests.txt" 2>&1
test_rc=$?
test_s=$(( $(date +%s) - start ))

start=$(date +%s)
PYTHONPATH="$PWD" timeout "$BENCH_LIMIT" "$PY" scripts/benchmark.py --dtype "$DTYPE" --only train,sample,elbo \
    --sizes "$SIZE" --elbo-sizes "$SIZE" --train-batch "$BATCH" --samplers ddim,ancestral \
    --sample-steps "$SAMPLE_STEPS" --compile-steps 100 --elbo-batch 1 --elbo-chunk "$ELBO_CHUNK" \
    --repeats "$REPEATS" --json "$TMP/bench.json" > "$TMP/bench.txt" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

export SIZE BATCH DTYPE SAMPLE_STEPS ELBO_CHUNK REPEATS TESTS TEST_LIMIT BENCH_LIMIT
"$PY" - "$TMP" "$RESULT" "$test_rc" "$test_s" "$bench_rc" "$bench_s" <<'EOF'
import json, os, sys
tmp, result, test_rc, test_s, bench_rc, bench_s = sys.argv[1:]
read = lambda name: open(os.path.join(tmp, name)).read() if os.path.exists(os.path.join(tmp, name)) else ""
tests = read("tests.txt").strip().splitlines()
bench_json = os.path.join(tmp, "bench.json")
doc = {
    "gpu": read("smi.txt").strip(),
    "settings": {k: os.environ.get(k) for k in ("SIZE", "BATCH", "DTYPE", "SAMPLE_STEPS", "ELBO_CHUNK",
                                                 "REPEATS", "TESTS", "TEST_LIMIT", "BENCH_LIMIT")},
    "tests": {"returncode": int(test_rc), "timed_out": int(test_rc) == 124, "seconds": int(test_s),
              "summary": tests[-1] if tests else "", "tail": tests[-30:]},
    "benchmark": {"returncode": int(bench_rc), "timed_out": int(bench_rc) == 124, "seconds": int(bench_s),
                  "table": read("bench.txt").strip().splitlines()[-40:],
                  "results": json.load(open(bench_json)) if os.path.exists(bench_json) else None},
}
with open(result, "w") as f:
    json.dump(doc, f, indent=1)
print(f"tests: rc {test_rc} in {test_s} s ({doc['tests']['summary']}); benchmark: rc {bench_rc} in {bench_s} s")
print("\n".join(doc["benchmark"]["table"]))
print(f"wrote {result}")
EOF
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
