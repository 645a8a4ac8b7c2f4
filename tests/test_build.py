"""What the build produced: every op has a CPU kernel, and CUDA kernels whenever the build included CUDA.

This runs without a GPU: it catches a build that silently dropped the CUDA sources (CI builds with
DORA_EXT_CUDA=1 and runs this test with the same variable set).
"""

import os
import subprocess
import sys

import pytest
import torch

import dora_ext  # noqa: F401

# every op of the library, from the dispatcher (so a new op cannot be missed here)
OPS = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("dora_ext::"))


def test_every_op_is_listed():
    assert {"weight_norm", "weight_norm_4bit", "weight_norm_int8", "dora_linear", "dora_linear_backward",
            "dora_rescale", "dora_rescale_backward", "dora_mixed", "merge_", "unmerge_"} <= set(OPS)


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI's environment: scripts/setup.sh installs bitsandbytes")
def test_ci_has_bitsandbytes_so_the_qdora_tests_run():
    import bitsandbytes  # noqa: F401  (tests/test_qdora.py skips without it, so CI must have it)


def has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dora_ext::{op}", key)


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    assert has_kernel(op, "CPU")


def test_cuda_kernels_all_or_none():
    assert len({has_kernel(op, "CUDA") for op in OPS}) == 1


@pytest.mark.skipif(os.environ.get("DORA_EXT_CUDA") != "1" and not torch.cuda.is_available(),
                    reason="built without DORA_EXT_CUDA=1 and no GPU present")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert has_kernel(op, "CUDA"), f"dora_ext::{op} has no CUDA kernel: the extension was built CPU-only"


def test_import_in_a_fresh_interpreter():
    """`import dora_ext` as the first import (no torch loaded yet) must work: _C links against libtorch."""
    code = "import dora_ext; print(sorted(n for n in dir(dora_ext.ops) if not n.startswith('_')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "dora_linear" in result.stdout


def test_setup_checks_the_cuda_toolkit_before_compiling(tmp_path):
    """A CUDA_HOME without libcudart (what torch infers from an nvcc wrapper in /usr/local/bin) must stop at once
    with a message naming CUDA_HOME, not after compiling; `auto` falls back to a CPU-only build instead."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "fake_cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "nvcc").write_text("#!/bin/sh\n")
    root = Path(__file__).resolve().parents[1]

    def run(mode):
        env = dict(os.environ, CUDA_HOME=str(fake), DORA_EXT_CUDA=mode)
        return subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=120)

    strict = run("1")
    assert strict.returncode != 0 and "CUDA_HOME" in strict.stderr + strict.stdout and "libcudart" in strict.stderr
    auto = run("auto")
    assert auto.returncode == 0 and "building CPU-only kernels" in auto.stdout
