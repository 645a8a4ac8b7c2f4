#!/usr/bin/env bash
# Set up, then the single-layer benchmark table, the model-level and the trainer-level benchmarks on whatever device
# is present (results in benchmarks/results/<device>.{csv,md}, model-<device>.{csv,md}, trainers-<device>.{csv,md}).
# Extra arguments go to the single-layer benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_dora_linear.py "$@"
.venv/bin/python benchmarks/bench_model.py
.venv/bin/python benchmarks/bench_trainers.py
.venv/bin/python benchmarks/bench_model.py --quantized 4bit
.venv/bin/python benchmarks/bench_model.py --checkpointing
.venv/bin/python benchmarks/bench_qdora.py
.venv/bin/python benchmarks/bench_serving.py
