#!/usr/bin/env bash
# The pinned wheels the device check installs on the GPU machine (which has no network and its own, different peft):
# peft 0.21.2 (pure Python) and bitsandbytes 0.50.2 (43 MB, its CUDA kernels inside; for the QDoRA benchmark),
# downloaded here into .whl/ (git-ignored through .git/info/exclude), carried with `carry: [".whl"]` (64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "peft==0.21.2" "bitsandbytes==0.50.2"
ls -la .whl
