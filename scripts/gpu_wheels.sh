#!/usr/bin/env bash
# The pinned pure-Python wheels the device check installs on the GPU machine (which has no network and its own,
# different peft): downloaded here into .whl/ (git-ignored through .git/info/exclude), carried with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "peft==0.21.0"
ls -la .whl
