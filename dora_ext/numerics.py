"""The numeric rules every op and the float64 oracle share (csrc/host_common.h and csrc/dora_ext.h hold the same in
C++): the accumulation dtype of reductions and the clamp of the norm before g = m / n. Needs only torch."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NORM_EPS", "accum_dtype"]

#: Norms are clamped to this before g = m / n (csrc/dora_ext.h: kNormEps). PEFT has no clamp and yields NaN for
#: an all-zero row of W + s·B·A; here such a row gets g = m / 1e-6 (0 for the usual m = ‖W_row‖ = 0).
NORM_EPS = 1e-6


def accum_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The one rule for reductions (norms, gains, magnitude gradients): float64 if any of the given inputs is
    float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
