#!/usr/bin/env bash
# The main job: set up, then fine-tune all-MiniLM-L6-v2 (offline) on Python docstring topics with LoRA, DoRA, EDoRA,
# dynamic-rank DoRA and DoRA + LoRA+ under one budget; table, loss curves and the best adapter land in demo_out/.
# Extra arguments go to demo/finetune_minilm.py (e.g. --steps 600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python demo/finetune_minilm.py "$@"
