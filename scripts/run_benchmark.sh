#!/usr/bin/env bash
# The main job: set up, then the single-layer benchmark table and the model-level benchmark on whatever device is
# present (results in benchmarks/results/<device>.{csv,md} and model-<device>.{csv,md}). Extra arguments go to the
# single-layer benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_dora_linear.py "$@"
.venv/bin/python benchmarks/bench_model.py
