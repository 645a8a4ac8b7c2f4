"""What the build produced: every op has a CPU kernel, and CUDA kernels whenever the build included CUDA.

This runs without a GPU: it catches a build that silently dropped the CUDA sources (CI builds with
DORA_EXT_CUDA=1 and runs this test with the same variable set).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import dora_ext  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# setup.py's and CMakeLists.txt's sources (the same globs in both), and the define of their CUDA build: the fullest
# product build, every CPU source compiled with it too.
PRODUCT_SOURCES = ("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/cuda/*.cu")
PRODUCT_DEFINES = ["-DDORA_EXT_WITH_CUDA"]

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
    fake = tmp_path / "fake_cuda"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "nvcc").write_text("#!/bin/sh\n")

    def run(mode):
        env = dict(os.environ, CUDA_HOME=str(fake), DORA_EXT_CUDA=mode)
        return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    strict = run("1")
    assert strict.returncode != 0 and "CUDA_HOME" in strict.stderr + strict.stdout and "libcudart" in strict.stderr
    auto = run("auto")
    assert auto.returncode == 0 and "building CPU-only kernels" in auto.stdout


def product_dependencies(root: Path) -> set[Path]:
    """Every existing file the product build reads: its sources and what the preprocessor includes from them with the
    product's defines (the compiler's own -MM, so a conditional include counts only where the product build takes
    it). -MG lets a CPU-only machine list kernels.cu's dependencies without the CUDA toolkit's headers (missing ones
    are left out); .cu is read as C++, which takes the same includes of ours (none of them depends on __CUDACC__)."""
    compiler = os.environ.get("CXX", "c++")
    flags = ["-std=c++20", "-MM", "-MG", "-x", "c++", *PRODUCT_DEFINES, *(f"-I{p}" for p in include_paths())]
    sources = sorted(p for pattern in PRODUCT_SOURCES for p in root.glob(pattern))
    found = set(sources)
    for source in sources:
        done = subprocess.run([compiler, *flags, str(source)], cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{compiler} -MM {source.relative_to(root)} failed:\n{done.stderr}"
        rule = done.stdout.replace("\\\n", " ").split(":", 1)[1]
        found |= {(root / dep).resolve() for dep in rule.split()}
    return {p for p in found if p.is_file()}


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler to list includes")
def test_csrc_holds_only_what_the_product_build_compiles():
    """csrc/ is the product: every file in it is a source of the product build or included by one (the CUDA-emulation
    headers, test-only, live in tests/cuda_emulation), and nothing the product includes lies elsewhere in the
    repository (a product header naming a test file)."""
    deps = product_dependencies(ROOT)
    in_csrc = {p.resolve() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    unused = sorted(str(p.relative_to(ROOT)) for p in in_csrc - deps)
    assert not unused, f"csrc/ holds files the product build (setup.py, CMakeLists.txt) never reads: {unused}"
    torch_headers = [Path(p).resolve() for p in include_paths()]  # inside the repository when its .venv is
    outside = sorted(str(p.relative_to(ROOT)) for p in deps - in_csrc
                     if p.is_relative_to(ROOT) and not any(p.is_relative_to(inc) for inc in torch_headers))
    assert not outside, f"the product build includes files outside csrc/: {outside}"
