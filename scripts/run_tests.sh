#!/usr/bin/env bash
# Set up, then the whole test suite (CUDA tests run automatically when a GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q tests "$@"
