"""Plain-PyTorch DoRA with PEFT 0.21 semantics: the oracle for tests and the baseline for benchmarks.

Mirrors peft/tuners/lora/dora.py + variants.py (DoraLinearLayer / DoraLinearVariant) in closed form:
  * the norm ‖W + s·B·A‖ per output row is detached (DoRA, Liu et al. 2024, §4.3), so no gradient flows through it;
  * eval / no dropout:  y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b        (bias not scaled by g)
  * dropout in training: y = x Wᵀ + b + (g−1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, with x_d = dropout(x)
  * merge: W ← g ⊙ (W + s·B·A).
Call it with float64 tensors to get an oracle; it materialises B·A on purpose (clarity over speed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import accum_dtype  # the one dtype rule (float64 if any input is float64), shared with the kernels


def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖₂ per output row, in float32 (float64 if any input is float64), detached."""
    dtype = accum_dtype(weight, lora_A, lora_B)
    with torch.no_grad():
        full = weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
        return torch.linalg.vector_norm(full, dim=1)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    *,
    x_drop: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """DoRA forward in x's dtype. eps=None reproduces PEFT exactly (NaN for an all-zero row); pass
    dora_ext.ops.NORM_EPS to reproduce the clamp of the fused kernels."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    if eps is not None:
        norm = norm.clamp_min(eps)
    g = (magnitude / norm.to(magnitude.dtype)).to(x.dtype)
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if x_drop is None:
        y = g * (x @ weight.T + scaling * ((x @ A.T) @ B.T))
    else:
        y = x @ weight.T + (g - 1) * (x_drop @ weight.T) + g * scaling * ((x_drop @ A.T) @ B.T)
    return y if bias is None else y + bias


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """g ⊙ (W + s·B·A) in float32 (float64 for float64 inputs), the weight a merged layer uses."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    full = weight.to(norm.dtype) + scaling * (lora_B.to(norm.dtype) @ lora_A.to(norm.dtype))
    return (magnitude.to(norm.dtype) / norm)[:, None] * full
