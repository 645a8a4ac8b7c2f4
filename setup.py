"""Build of dora_ext: CPU kernels always, CUDA kernels when DORA_EXT_CUDA allows it.

Install with `pip install --no-build-isolation -e .` so the extension is built against the torch already installed
(torch is deliberately not a build requirement: an isolated build would pick whatever torch the index serves).

Environment:
  DORA_EXT_CUDA=auto|1|0   auto (default): build CUDA when torch is a CUDA build and a toolkit is found;
                           1: build CUDA or fail loudly; 0: CPU only.
  TORCH_CUDA_ARCH_LIST     respected; when unset and no GPU is visible, DEFAULT_ARCHS below is used.
  DORA_EXT_DEBUG=1         -O0 -g host code, -G device code.
  MAX_JOBS                 parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit on a machine without torch
    raise SystemExit(
        "dora_ext compiles against an installed PyTorch. Install torch first, then run\n"
        "    pip install --no-build-isolation -e ."
    ) from exc

# A100 and H100/H200 SASS, plus PTX so newer GPUs JIT-compile instead of failing.
DEFAULT_ARCHS = "8.0;9.0+PTX"
HERE = os.path.dirname(os.path.abspath(__file__))


def is_toolkit(path) -> bool:
    """A CUDA toolkit we can compile and link with: nvcc, the runtime headers and libcudart."""
    if not path:
        return False
    libs = [os.path.join(path, d, "libcudart.so") for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    return (os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(os.path.join(path, "include", "cuda_runtime.h"))
            and any(os.path.exists(lib) for lib in libs))


def find_cuda_home():
    """The toolkit to build with. torch infers CUDA_HOME from `nvcc` on PATH; a wrapper script there (e.g.
    /usr/local/bin/nvcc calling /usr/local/cuda-13.0/bin/nvcc) makes it guess /usr/local, which has no libcudart,
    and the link fails only after ~100 s of compiling. So each candidate is checked for nvcc, headers and
    libcudart before anything compiles."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if is_toolkit(explicit) else None
    candidates = [CUDA_HOME, "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if is_toolkit(c)), None)


def cuda_requested() -> bool:
    mode = os.environ.get("DORA_EXT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"DORA_EXT_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    home = find_cuda_home() if torch.version.cuda is not None else None
    if home is None:
        why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else
               f"no usable CUDA toolkit (nvcc, include/cuda_runtime.h and libcudart.so) at CUDA_HOME="
               f"{os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH') or CUDA_HOME!r} or /usr/local/cuda*")
        if mode == "1":
            raise SystemExit(f"DORA_EXT_CUDA=1 but the CUDA kernels cannot be built: {why}. Install a CUDA build of "
                             "torch and set CUDA_HOME to the toolkit (e.g. CUDA_HOME=/usr/local/cuda).")
        print(f"dora_ext: building CPU-only kernels: {why} (set CUDA_HOME, or DORA_EXT_CUDA=0 to silence this)")
        return False
    # torch's build helpers read their module-level CUDA_HOME (nvcc, include and library paths)
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    print(f"dora_ext: CUDA toolkit {home}")
    return True


def nvidia_wheel_includes() -> list[str]:
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes ship in the nvidia-* wheels, not the toolkit."""
    found = []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include"))):
            has_headers = any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h"))
            if has_headers and inc not in found:
                found.append(inc)
    return found


def extensions():
    with_cuda = cuda_requested()
    debug = os.environ.get("DORA_EXT_DEBUG") == "1"
    # csrc/ holds the product's sources and the headers they include, nothing else (tests/test_build.py checks it):
    # the CUDA emulation the tests compile kernels.cuh over is in tests/cuda_emulation.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx.append("-fopenmp")  # at::parallel_for is inlined into our code: without OpenMP it runs serially
    define = []
    kwargs = {}
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
            print(f"dora_ext: no GPU visible, building for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCHS}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define = ["-DDORA_EXT_WITH_CUDA"]
        nvcc = ["-G", "-g"] if debug else ["-O3", "-lineinfo"]
        kwargs["extra_compile_args"] = {"cxx": cxx + define, "nvcc": nvcc + define + ["--expt-relaxed-constexpr"]}
        kwargs["include_dirs"] = nvidia_wheel_includes()
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    print(f"dora_ext: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels against torch {torch.__version__}")
    return [
        ext_cls(
            "dora_ext._C",
            sources,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
            **kwargs,
        )
    ]


setup(
    packages=find_packages(include=["dora_ext", "dora_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
