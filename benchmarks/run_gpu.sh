#!/usr/bin/env bash
# The one script a GPU machine runs, end to end, within 570 seconds (a GPU machine runs one command for at most 600):
#   environment (nvidia-smi, versions) -> carried wheels + CUDA extension build -> GPU tests -> memcheck of a subset
#   of them (compute-sanitizer) -> the benchmark suite (benchmarks/run.py) with the time that is left.
#
#   bash benchmarks/run_gpu.sh [run.py arguments, e.g. --quick, --ops poly_gate, --part 1/3]
#
# The full suite takes longer than one call: run.py records every benchmark test in
# benchmarks/results/partial/<device>-<commit>.jsonl and a later run of the same command resumes that record (the
# tests already in it are not run again), so the suite is finished by calling this again, e.g. with
#   RUN_GPU_TESTS_S=0 RUN_GPU_MEMCHECK_S=0 bash benchmarks/run_gpu.sh
# On a machine that stayed warm the record is still there (the folder is ignored by git); on a fresh one, send it
# along with the tree (benchmarks/README.md). Each call writes a complete report of the record so far, naming what is still missing.
#
# The GPU machine has torch, triton, pybind11, cmake, ninja, pytest and pytest-benchmark preinstalled and no
# network, so pip never resolves anything there (--no-deps --no-build-isolation --no-index); what it lacks comes as
# wheels carried in .whl/ (pybind11; fla-core and einops for the fla benchmark provider; see benchmarks/README.md).
# A failed stage does not stop the run: the next stages still run and the results record every outcome.
# Writes benchmarks/results/<device>-<UTC time>-<commit>.json, .md, .svg, -sweeps.svg and the record. When $OUT is
# set, env.txt, build.log, tests.log and memcheck.log are written there as the run goes (so a run cut short still
# returns them), then the report, the record and the pytest-benchmark JSON.
# Budget (seconds): RUN_GPU_BUDGET_S for the whole script, default 570; the build stops at 180, the tests at
# RUN_GPU_TESTS_S (default 150; the tests run as RUN_GPU_TEST_SHARDS parallel processes, default 6), memcheck at
# RUN_GPU_MEMCHECK_S (default 60); 0 skips either stage. The benchmarks get the rest and start no test in the last
# 60 s.
set -uo pipefail  # not -e: every stage runs whatever the previous one returned

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${RUN_GPU_BUDGET_S:-570}
BUILD_LIMIT_S=180
TESTS_LIMIT_S=${RUN_GPU_TESTS_S:-150}
MEMCHECK_LIMIT_S=${RUN_GPU_MEMCHECK_S:-60}
SHARDS=${RUN_GPU_TEST_SHARDS:-6}
RESULTS=benchmarks/results
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$RESULTS" "$LOGS"

section() { printf '\n=== %s (t=%ss)\n' "$*" "$SECONDS"; }

section "environment"
{
  nvidia-smi
  "$PY" -c 'import platform, torch, triton; print("python", platform.python_version(), "| torch", torch.__version__,
"| triton", triton.__version__, "| torch CUDA", torch.version.cuda, "| device", torch.cuda.get_device_name(0))'
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  git log -1 --format='commit %H %s' 2>/dev/null
} 2>&1 | tee "$LOGS/env.txt"

section "carried wheels, build the CUDA extension"
# The GPU image has no network: what it lacks is installed from wheels carried in .whl/ (ignored by git; see
# benchmarks/README.md). install_carried MODULE PATTERN...: installs the wheels matching the patterns when MODULE
# does not import (all of them, or none).
install_carried() {
  local module=$1 wheels=() pattern
  shift
  "$PY" -c "import $module" 2>/dev/null && return 0
  for pattern in "$@"; do
    compgen -G "$pattern" >/dev/null || { echo "$module is missing and no $pattern was carried"; return 1; }
    wheels+=($pattern)
  done
  "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}"
}
install_carried pybind11 '.whl/pybind11-*.whl' || echo "  -> the CUDA build will fail"
# flash-linear-attention's ops (package fla-core; it imports einops), the fla benchmark provider.
install_carried einops '.whl/einops-*.whl'
install_carried fla.ops.linear_attn '.whl/fla_core-*.whl' || echo "  -> the fla benchmark rows will be skipped"
archs=${HADAMARD_KERNELS_CUDA_ARCHS:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '. ')}
[ "$archs" = 90 ] && archs=90a  # Hopper: the arch-specific target
HADAMARD_KERNELS_CUDA=1 HADAMARD_KERNELS_CUDA_ARCHS=$archs timeout "$BUILD_LIMIT_S" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$LOGS/build.log" 2>&1
build_rc=$?
tail -n 15 "$LOGS/build.log"
echo "build exit status $build_rc (archs $archs)"
"$PY" -c 'import hadamard_kernels as hk; print("backends on cuda:", hk.available_backends("cuda"))'
stage_args=(--build-rc "$build_rc")  # what run.py records of the stages

section "GPU tests"
if [ "$TESTS_LIMIT_S" -le 0 ]; then
  echo "GPU tests skipped (RUN_GPU_TESTS_S=$TESTS_LIMIT_S)"
else
  # A GPU test spends most of its time compiling Triton kernels on one CPU core, so SHARDS pytest processes share
  # the GPU; each takes the test files in turn (--shard, tests/conftest.py), so a stage cut short has covered every
  # family. SIGINT, not SIGTERM: an interrupted pytest still prints its summary of what ran.
  pids=()
  for k in $(seq 1 "$SHARDS"); do
    timeout -s INT -k 20 "$TESTS_LIMIT_S" "$PY" -m pytest -q -m cuda tests -rfE --durations=5 --shard "$k/$SHARDS" \
      >"$LOGS/tests-$k.log" 2>&1 &
    pids+=($!)
  done
  tests_rc=0
  for pid in "${pids[@]}"; do
    wait "$pid"
    rc=$?
    # The stage's status: 1 (a test failed) over 124 (the time limit) over any other failure.
    if [ "$rc" -eq 1 ] || { [ "$rc" -ne 0 ] && [ "$tests_rc" -ne 1 ] && [ "$tests_rc" -ne 124 ]; }; then
      tests_rc=$rc
    fi
  done
  for k in $(seq 1 "$SHARDS"); do  # the "=== shard" lines are what benchmarks/report.py splits the log at
    echo "=== shard $k/$SHARDS"
    cat "$LOGS/tests-$k.log"
  done >"$LOGS/tests.log"
  rm -f "$LOGS"/tests-*.log
  grep -E "^(FAILED|ERROR) |^=== shard | in [0-9.]+s" "$LOGS/tests.log"
  echo "tests exit status $tests_rc (124: stopped at the ${TESTS_LIMIT_S}s limit; $SHARDS shards)"
  stage_args+=(--tests-log "$LOGS/tests.log" --tests-rc "$tests_rc")
fi

section "memcheck (compute-sanitizer)"
# Out-of-bounds loads and stores of every kernel (Triton and CUDA) that the gpu_shapes tests launch, with ragged
# tiles. PyTorch's caching allocator is off, so each tensor is its own cudaMalloc and an overrun past a tensor
# leaves its allocation (with caching it lands in the same cached block, which memcheck does not see).
# Runs after the tests stage, whose compiled Triton kernels are in the cache. Its log: $LOGS/memcheck.log.
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer \
  || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
if [ "$MEMCHECK_LIMIT_S" -le 0 ]; then
  echo "memcheck skipped (RUN_GPU_MEMCHECK_S=$MEMCHECK_LIMIT_S)"
elif [ ! -x "$SANITIZER" ]; then
  echo "memcheck skipped: compute-sanitizer not found (PATH, then $SANITIZER)"
  stage_args+=(--memcheck-rc "not found")
else
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 20 "$MEMCHECK_LIMIT_S" \
    "$SANITIZER" --tool memcheck --error-exitcode 99 \
    "$PY" -m pytest -q -m cuda tests/test_poly_chain.py tests/test_poly_ncp.py tests/test_linear_attention.py \
    tests/test_poly_sa.py tests/test_lrnn.py tests/test_poly_gate.py \
    -k "gpu_shapes or gpu_alpha_forms or (gpu_wgmma_forward and (passes or odd))" -rfE 2>&1 \
    | tee "$LOGS/memcheck.log" | tail -n 40
  memcheck_rc=${PIPESTATUS[0]}
  echo "memcheck exit status $memcheck_rc (99: memcheck found errors; 1: a test failed;" \
    "124/137: stopped at the ${MEMCHECK_LIMIT_S}s limit)"
  stage_args+=(--memcheck-rc "$memcheck_rc")
fi

section "benchmarks"
left=$((BUDGET_S - SECONDS))
suite_budget=$((left - 60))  # the test in flight when the budget ends, and writing the results, fit in the rest
[ "$suite_budget" -lt 30 ] && suite_budget=30
timeout -s INT -k 20 "$((left > 60 ? left - 15 : 45))" "$PY" benchmarks/run.py --time-budget "$suite_budget" \
  "${stage_args[@]}" ${OUT:+--copy-to "$OUT"} "$@"
bench_rc=$?

section "done"
echo "build $build_rc, tests ${tests_rc:-skipped}, memcheck ${memcheck_rc:-skipped}, benchmarks $bench_rc;" \
  "results in $RESULTS${OUT:+ and $OUT}"
