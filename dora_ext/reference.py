"""Plain-PyTorch DoRA with PEFT 0.21 semantics: a float64 oracle of every op in dora_ext.ops, for tests and as the
benchmarks' baseline. It needs only torch (not the compiled extension), so it can judge a broken build.

Mirrors peft/tuners/lora/dora.py + variants.py (DoraLinearLayer / DoraLinearVariant) in closed form:
  * the norm ‖W + s·B·A‖ per output row is detached (DoRA, Liu et al. 2024, §4.3), so no gradient flows through it;
  * eval / no dropout:  y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b        (bias not scaled by g)
  * dropout in training: y = x Wᵀ + b + (g−1) ⊙ (x_d Wᵀ) + g ⊙ s·(x_d Aᵀ) Bᵀ, with x_d = dropout(x)
  * merge: W ← g ⊙ (W + s·B·A).
Call it with float64 tensors to get an oracle; it materialises B·A and dequantized weights on purpose (clarity over
speed). One function per op:

  ops.weight_norm        weight_norm            ops.dora_linear   dora_linear
  ops.weight_norm_4bit   weight_norm_4bit       ops.dora_rescale  dora_rescale
  ops.weight_norm_int8   weight_norm_int8       ops.dora_mixed    dora_mixed
  ops.merge_             merged_weight          ops.unmerge_      unmerged_weight

and the input-axis variant (norm_axis "in", LyCORIS's wd_on_out=False; lycoris/functional/general.py
_weight_decompose in closed form): input_norm, input_axis_weight (W_eff, also merged), input_axis_linear,
input_axis_conv.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import NORM_EPS, accum_dtype  # the shared rules (torch only)


def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖₂ per output row, in float32 (float64 if any input is float64), detached."""
    dtype = accum_dtype(weight, lora_A, lora_B)
    with torch.no_grad():
        full = weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
        return torch.linalg.vector_norm(full, dim=1)


def _gain(magnitude: Tensor, norm: Tensor, eps: float | None) -> Tensor:
    return magnitude / (norm if eps is None else norm.clamp_min(eps)).to(magnitude.dtype)


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
    """DoRA forward in x's dtype. eps=None reproduces PEFT exactly (NaN for an all-zero row); pass NORM_EPS to
    reproduce the clamp of the fused kernels."""
    g = _gain(magnitude, weight_norm(weight, lora_A, lora_B, scaling), eps).to(x.dtype)
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if x_drop is None:
        y = g * (x @ weight.T + scaling * ((x @ A.T) @ B.T))
    else:
        y = x @ weight.T + (g - 1) * (x_drop @ weight.T) + g * scaling * ((x_drop @ A.T) @ B.T)
    return y if bias is None else y + bias


def dora_rescale(result: Tensor, lora_u: Tensor, lora_B: Tensor, magnitude: Tensor, norm: Tensor, scaling: float,
                 *, bias: Tensor | None = None, base: Tensor | None = None, eps: float | None = NORM_EPS) -> Tensor:
    """The DoRA update of a base output computed elsewhere (ops.dora_rescale), in the accumulation dtype:
    base None: g ⊙ (result − bias + s·lora_u Bᵀ) + bias; base = x_d Wᵀ: result + (g−1) ⊙ base + g ⊙ s·lora_u Bᵀ."""
    dtype = accum_dtype(result, lora_u, lora_B, magnitude, norm)
    g = _gain(magnitude.to(dtype), norm.to(dtype), eps)
    lora = scaling * (lora_u.to(dtype) @ lora_B.to(dtype).T)
    result = result.to(dtype)
    if base is not None:
        return result + (g - 1) * base.to(dtype) + g * lora
    b = 0 if bias is None else bias.to(dtype)
    return g * (result - b + lora) + b


def dora_mixed(result: Tensor, x: Tensor, adapters: Sequence[tuple], adapter_index: Tensor, *,
               bias: Tensor | None = None, eps: float | None = NORM_EPS) -> Tensor:
    """Every token through its own adapter (ops.dora_mixed): adapters as (lora_A, lora_B, scaling, magnitude or None,
    norm or None); adapter_index [T] per token, len(adapters) for the base output. In the accumulation dtype."""
    x2, r2 = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
    dtype = accum_dtype(result, x, *(a[3] for a in adapters))
    out = r2.to(dtype).clone()
    for k, (A, B, s, m, n) in enumerate(adapters):
        rows = adapter_index == k
        u = x2[rows].to(dtype) @ A.to(dtype).T
        if m is None:  # plain LoRA: g = 1
            out[rows] = out[rows] + s * (u @ B.to(dtype).T)
        else:
            out[rows] = dora_rescale(r2[rows], u, B, m.reshape(-1), n, s, bias=bias, eps=eps).to(dtype)
    return out.reshape(result.shape)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float) -> Tensor:
    """g ⊙ (W + s·B·A) in float32 (float64 for float64 inputs), the weight a merged layer uses (ops.merge_)."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    full = weight.to(norm.dtype) + scaling * (lora_B.to(norm.dtype) @ lora_A.to(norm.dtype))
    return (magnitude.to(norm.dtype) / norm)[:, None] * full


def unmerged_weight(merged: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, norm: Tensor,
                    scaling: float) -> Tensor:
    """merged / g − s·B·A with the norm kept at merge time (ops.unmerge_), in the accumulation dtype."""
    dtype = accum_dtype(merged, lora_A, lora_B, magnitude, norm)
    g = magnitude.to(dtype) / norm.to(dtype)
    return merged.to(dtype) / g[:, None] - scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


# ---------------------------------------------------------------------------------------------- input axis
def _delta(weight: Tensor, lora_A: Tensor, lora_B: Tensor, dtype: torch.dtype) -> Tensor:
    """B·A in W's shape: [out, in], or a convolution's [out, C_in, k…] from lora_A [r, C_in, k…], lora_B [out, r, 1…]."""
    r = lora_A.shape[0]
    return (lora_B.reshape(-1, r).to(dtype) @ lora_A.reshape(r, -1).to(dtype)).reshape(weight.shape)


def input_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *, detach: bool = True) -> Tensor:
    """‖W + s·B·A‖ per input column (a convolution: per input channel, over (out, k…)) → [in], in the accumulation
    dtype, dense. detach=False keeps it differentiable (LyCORIS backpropagates through its norm)."""
    dtype = accum_dtype(weight, lora_A, lora_B)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        full = weight.to(dtype) + scaling * _delta(weight, lora_A, lora_B, dtype)
        return torch.linalg.vector_norm(full.transpose(0, 1).reshape(full.shape[1], -1), dim=1)


def input_axis_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, scaling: float, *,
                      eps: float | None = NORM_EPS, detach: bool = True) -> Tensor:
    """W_eff = (W + s·B·A)·diag(m / ‖W + s·B·A‖_col), the weight an input-axis adapter acts as (and what merging
    writes), in the accumulation dtype. eps: the clamp of the norm (None: none); detach: as input_norm."""
    dtype = accum_dtype(weight, lora_A, lora_B, magnitude)
    full = weight.to(dtype) + scaling * _delta(weight, lora_A, lora_B, dtype)
    g = _gain(magnitude.reshape(-1).to(dtype), input_norm(weight, lora_A, lora_B, scaling, detach=detach), eps)
    return full * g.reshape((1, -1) + (1,) * (weight.dim() - 2))


def input_axis_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                      magnitude: Tensor, scaling: float, **kw) -> Tensor:
    """x W_effᵀ + b (input_axis_weight; kw: eps, detach)."""
    return F.linear(x, input_axis_weight(weight, lora_A, lora_B, magnitude, scaling, **kw).to(x.dtype), bias)


def input_axis_conv(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, scaling: float, stride=1, padding=0, **kw) -> Tensor:
    """conv(x, W_eff) + b for a Conv1d/2d/3d weight with groups 1 and dilation 1 (input_axis_weight)."""
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    W_eff = input_axis_weight(weight, lora_A, lora_B, magnitude, scaling, **kw).to(x.dtype)
    return conv(x, W_eff, bias, stride, padding)


# ------------------------------------------------------------------------------------------- quantized bases
def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int],
                    dtype: torch.dtype, *, absmax_code: Tensor | None = None, absmax_scale: Tensor | None = None,
                    absmax_offset: Tensor | None = None, absmax_blocksize: int = 0, row_group: int = 0) -> Tensor:
    """A bitsandbytes 4-bit weight [out, in] from its packed storage, each value rounded to `dtype` (what
    bitsandbytes' dequantize_4bit returns): flat blocks of the row-major weight, two codes per byte, the first
    element in the high nibble; nested absmax = absmax_code[q] · absmax_scale[block / absmax_blocksize] + offset.
    row_group=32: bitsandbytes' CPU layout (csrc/quantized_weights.h), absmax in the standard order."""
    out_f, in_f = shape
    b = packed.reshape(-1).view(torch.uint8).long()
    if row_group:
        # group g of 32 rows, column pair kp: 32 bytes, byte p = (row p/2 low nibble, row 16 + p/2 high nibble),
        # column 2·kp + p % 2
        by = b.reshape(-1, in_f // 2, 32)
        p = torch.arange(32)
        codes = torch.empty(by.shape[0], 32, in_f, dtype=torch.long)
        cols = 2 * torch.arange(in_f // 2)[:, None] + p % 2  # [pairs, 32]
        codes[:, (p // 2)[None, :].expand_as(cols), cols] = by & 15
        codes[:, (16 + p // 2)[None, :].expand_as(cols), cols] = by >> 4
        codes = codes.reshape(-1)[: out_f * in_f]
    else:
        codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[: out_f * in_f]
    if absmax_code is not None:
        q = absmax.reshape(-1).long()
        scale = absmax_scale.reshape(-1).repeat_interleave(absmax_blocksize)[: q.numel()]
        absmax = absmax_code[q] * scale + absmax_offset.reshape(-1)[0]
    flat = torch.arange(out_f * in_f)
    values = code.float()[codes] * absmax.float().reshape(-1)[flat // blocksize]
    return values.to(dtype).reshape(out_f, in_f)


def dequantize_int8(weight: Tensor, row_scale: Tensor) -> Tensor:
    """LLM.int8's weight CB · SCB / 127 in float32, as bitsandbytes' int8_vectorwise_dequant computes it."""
    return (weight.float() * row_scale.float().view(-1, 1)) * (1.0 / 127)


def weight_norm_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int],
                     dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, scaling: float, **nested) -> Tensor:
    """ops.weight_norm_4bit: ‖dequantize_4bit(...) + s·B·A‖ per row (float64 adapters: float64)."""
    return weight_norm(dequantize_4bit(packed, absmax, code, blocksize, shape, dtype, **nested).to(
        accum_dtype(lora_A, lora_B)), lora_A, lora_B, scaling)


def weight_norm_int8(weight: Tensor, row_scale: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """ops.weight_norm_int8: ‖dequantize_int8(W) + s·B·A‖ per row."""
    return weight_norm(dequantize_int8(weight, row_scale).to(accum_dtype(lora_A, lora_B)), lora_A, lora_B, scaling)
