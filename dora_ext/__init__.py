"""dora_ext: fused DoRA (weight-decomposed low-rank adaptation) for PyTorch, CPU and CUDA.

    layer = dora_ext.DoRALinear.from_linear(linear, r=16, alpha=32)
    y = layer(x); layer.merge(); layer.unmerge(); plain = layer.to_linear()

Ops live in torch.ops.dora_ext (see dora_ext.ops); dora_ext.reference holds the plain-PyTorch semantics.
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against, before _C itself)

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.dora_ext.*)
except ImportError as exc:  # a half-loaded package would hide a broken build, so fail here with the fix
    raise ImportError(
        "dora_ext's compiled extension (dora_ext._C) is missing or does not match this torch. Rebuild it with\n"
        "    pip install --no-build-isolation -e .      (or: python setup.py build_ext --inplace)\n"
        f"Original error: {exc}"
    ) from exc

from . import ops, reference  # noqa: E402
from .modules import DoRALinear  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DoRALinear", "ops", "reference", "__version__"]
