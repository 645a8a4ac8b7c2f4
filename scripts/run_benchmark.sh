#!/usr/bin/env bash
# The main job: set up, then the single-layer benchmark table on whatever device is present
# (results in benchmarks/results/<device>.{csv,md}). Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/bench_dora_linear.py "$@"
