#!/usr/bin/env bash
# One GPU check: the Triton kernel tests, then the attention benchmark; the benchmark table is printed last.
#   bash benchmarks/gpu_check.sh [results.jsonl]     (default: $OUT/bench_attention.jsonl, else /tmp/...)
# Works offline (GPU machine: Python 3.12, torch 2.11, triton 3.6, transformers 5.17: older than the 5.24 that
# pyproject.toml asks for, which is why the install below takes no dependencies; the kernel tests and the BERT and
# GPT-2 benchmarks run the same there). Installs the project in editable mode when it is not importable, or falls
# back to a symlinked package tree on PYTHONPATH.
# More benchmarks: add them below the attention benchmark, before the final table.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${1:-${OUT:-/tmp}/bench_attention.jsonl}

if ! "$PYTHON" -c "import fastbertology.kernels" 2>/dev/null; then
  echo "== installing fastbertology (editable, no deps, no build isolation)"
  if ! "$PYTHON" -m pip install --no-deps --no-build-isolation -e . >/tmp/fastbertology_install.log 2>&1; then
    echo "   pip install failed (see /tmp/fastbertology_install.log); using a symlinked tree on PYTHONPATH"
    tree=$(mktemp -d)
    mkdir "$tree/fastbertology"
    for f in fastbertology/*; do ln -s "$PWD/$f" "$tree/fastbertology/"; done
    ln -s "$PWD/fastbertology_kernels" "$tree/fastbertology/kernels"
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    # keep the repo root (whose fastbertology/ lacks kernels/: they are fastbertology_kernels/) off sys.path
    export PYTHONSAFEPATH=1
  fi
  "$PYTHON" -c "import fastbertology.kernels" || { echo "cannot import fastbertology.kernels"; exit 1; }
fi

echo "== kernel tests on the GPU"
# GPU_CHECK_ALL=1 also runs the small interpreter-sized cases of tests/test_triton_kernels.py on the GPU (more
# kernel variants to compile: a few more minutes)
# pytest-xdist (when installed) compiles the kernel variants in parallel worker processes; each phase has its own
# time limit so that a slow phase cannot starve the benchmarks
workers=$("$PYTHON" -c "import xdist" 2>/dev/null && echo "-n ${GPU_CHECK_WORKERS:-8}")
start=$SECONDS
timeout "${TESTS_TIMEOUT:-130}" "$PYTHON" -m pytest tests/test_triton_gpu.py tests/test_packed_attention.py \
  ${GPU_CHECK_ALL:+tests/test_triton_kernels.py} -q $workers -p no:cacheprovider
tests_rc=$?
echo "   kernel tests: rc=$tests_rc in $((SECONDS - start)) s"

echo "== attention benchmark (fwd+bwd)"
table=$(mktemp)
start=$SECONDS
timeout "${ATTENTION_TIMEOUT:-100}" "$PYTHON" benchmarks/bench_attention.py --out "$RESULTS" | tee "$table"
bench_rc=${PIPESTATUS[0]}
echo "   attention benchmark: rc=$bench_rc in $((SECONDS - start)) s"

echo "== kernel time vs host time per attention call, and a profiled model pass"
start=$SECONDS
timeout "${PROFILE_TIMEOUT:-90}" "$PYTHON" benchmarks/gpu_profile.py --out "$(dirname "$RESULTS")" \
  > "$(dirname "$RESULTS")/gpu_profile.log" 2>&1
profile_rc=$?
grep "^|" "$(dirname "$RESULTS")/gpu_profile.log" >> "$table"
echo "   profile: rc=$profile_rc in $((SECONDS - start)) s (log: $(dirname "$RESULTS")/gpu_profile.log)"

echo "== end-to-end benchmark (run_bertology reference loop vs SDPA vs fastbertology: CUDA graphs, eager (the A/B), padded)"
# Rows are appended to $E2E_RESULTS as each mode finishes; no case starts after E2E_BUDGET seconds (its rows say
# "skipped"), and the step is killed after E2E_TIMEOUT seconds: with the default limits (130 + 100 + 90 + 150 s; the
# kernel tests grew by the CUDA-graph cases)
# the whole script stays under 8 minutes (run 1 on an H200, before the profile step: 305 s).
E2E_RESULTS=${E2E_RESULTS:-$(dirname "$RESULTS")/bench_e2e.jsonl}
e2e_table=$(mktemp)
timeout "${E2E_TIMEOUT:-150}" "$PYTHON" -m fastbertology.bench --time-budget "${E2E_BUDGET:-120}" \
  --out "$E2E_RESULTS" | tee "$e2e_table"
e2e_rc=${PIPESTATUS[0]}
echo "   end-to-end benchmark: rc=$e2e_rc"
{ echo; echo "end-to-end benchmark rc=$e2e_rc, JSON lines in $E2E_RESULTS"; cat "$e2e_table"; } >> "$table"
bench_rc=$(( bench_rc != 0 || e2e_rc != 0 ))

if [ -n "${LLAMA:-}" ]; then  # opt-in (minutes): issue 20's Llama-3-8B-shaped case and the longest-length search
  echo "== Llama-3-8B-shaped case (bf16, up to 4096 tokens) and the longest sequence each mode survives"
  timeout "${LLAMA_TIMEOUT:-300}" "$PYTHON" -m fastbertology.bench --cases llama3-8b-shaped --out "$E2E_RESULTS" \
    | tee -a "$table"
  timeout "${LONGEST_TIMEOUT:-300}" "$PYTHON" benchmarks/longest_length.py --size llama3-8b | tee -a "$table"
fi

echo
echo "== summary: kernel tests rc=$tests_rc, benchmark rc=$bench_rc, JSON lines in $RESULTS"
cat "$table"
exit $(( tests_rc != 0 || bench_rc != 0 ))
