"""Layer-level DoRA forwards with PEFT 0.21 semantics, built on dora_ext.ops (the layers in layers.py call these).

Linear (nn.Linear, transformers Conv1D): the first active adapter runs the fused op (one GEMM pass, fused epilogue,
fused backward). Conv1d/2d/3d and Embedding: the convolution / gather stays in ATen (the DoRA epilogue is a cheap
elementwise pass next to it); what PEFT makes expensive there is the norm, which materialises the dense [out, in·k]
ΔW and a copy of W every step, and that runs in the fused weight_norm op here.

Several active adapters on one layer compose as PEFT does (peft/tuners/lora/layer.py Linear.forward: each active
adapter's variant.forward updates the running result), every one after the first through plain ATen ops: in eval, or without dropout, multiplicatively, y = g₂ ⊙ (y₁ − b + s₂·B₂A₂x) + b; in training
with dropout p > 0, additively, y = y₁ + (g₂−1) ⊙ W·x_d + g₂ ⊙ s₂·B₂A₂x_d. Embeddings compose multiplicatively always.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["Adapter", "linear", "rescale", "conv", "embedding"]


class Adapter(NamedTuple):
    """One adapter's tensors as a layer holds them. magnitude None: plain LoRA. norm: the cached ‖W + s·B·A‖_row,
    or None to compute it. activation_memory: the fused ops' mode for this adapter (dora_ext.activation_policy),
    None for the context's."""
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor | None
    scaling: float
    dropout: float
    norm: Tensor | None = None
    activation_memory: str | None = None


def _gain(a: Adapter, norm: Tensor) -> Tensor:
    # Same clamp as the fused kernels (ops.NORM_EPS): an all-zero row gets a finite gain, not PEFT's NaN.
    return a.magnitude.reshape(-1) / norm.clamp_min(ops.NORM_EPS).to(a.magnitude.dtype)


def _dropped(x: Tensor, a: Adapter, training: bool) -> Tensor | None:
    return F.dropout(x, a.dropout, training=True) if training and a.dropout > 0 else None


def _dora_update(result: Tensor, lora: Tensor, g: Tensor, bias: Tensor | None, x_drop: Tensor | None,
                 base_of: Callable[[Tensor], Tensor]) -> Tensor:
    """PEFT's per-adapter variant update, result + (g−1)·base_part + g·lora (g already shaped to broadcast):
    without dropout base_part is the running result minus the bias (multiplicative composition); with dropout PEFT
    recomputes it as base_of(x_drop) = W·x_d without bias (additive composition)."""
    if x_drop is None:
        base_part = result if bias is None else result - bias
    else:
        base_part = base_of(x_drop)
    return result + ((g - 1) * base_part + g * lora)


# ------------------------------------------------------------------------------------------------------- linear
def linear(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[Adapter], training: bool) -> Tensor:
    """Adapters over a frozen linear map. weight: [out, in] (a transposed view for fan_in_fan_out layers).
    A DoRA adapter first in line runs the fused op; plain-LoRA adapters (magnitude None) add s·B·A·x_d as PEFT does."""
    first, rest = adapters[0], adapters[1:]
    if first.magnitude is not None:
        result = ops.dora_linear(x, weight, bias, first.lora_A, first.lora_B, first.magnitude, first.scaling,
                                 x_drop=_dropped(x, first, training), weight_norm=first.norm,
                                 activation_memory=first.activation_memory)
    else:
        result, rest = F.linear(x, weight, bias), adapters
    for a in rest:
        out_dtype = result.dtype
        xa = x.to(a.lora_A.dtype)
        x_drop = _dropped(xa, a, training)
        src = xa if x_drop is None else x_drop
        lora = (src @ a.lora_A.T) @ a.lora_B.T * a.scaling
        if a.magnitude is None:  # plain LoRA
            result = (result + lora).to(out_dtype)
            continue
        norm = a.norm if a.norm is not None else ops.weight_norm(weight, a.lora_A, a.lora_B, a.scaling)
        result = _dora_update(result, lora, _gain(a, norm), bias, x_drop,
                              lambda xd: F.linear(xd, weight.to(xd.dtype))).to(out_dtype)
    return result


def rescale(x: Tensor, result: Tensor, bias: Tensor | None, adapters: Sequence[Adapter], training: bool,
            base_of: Callable[[Tensor], Tensor]) -> Tensor:
    """Adapters over a base output computed elsewhere (a quantized layer's own kernel): result = base(x) + bias.
    Each DoRA adapter is one ops.dora_rescale (PEFT's composition: multiplicative, or with dropout additive with
    base_of(x_d) = W·x_d without bias, the base layer's own product again); plain LoRA adds s·B·A·x_d. x is cast to
    the adapters' dtype and the output back to result's (PEFT's rule for quantized layers outside autocast)."""
    out_dtype = result.dtype
    for i, a in enumerate(adapters):
        xa = x.to(a.lora_A.dtype)
        x_drop = _dropped(xa, a, training)
        src = xa if x_drop is None else x_drop
        u = src @ a.lora_A.T
        dtype = torch.promote_types(result.dtype, u.dtype)
        if a.magnitude is None:  # plain LoRA
            result = (result + (u @ a.lora_B.T) * a.scaling).to(out_dtype)
            continue
        base = None if x_drop is None else base_of(x_drop).to(dtype)
        # The first adapter without dropout or bias: its output serves the magnitude gradient, and base_of(x)
        # (result again) recomputes acc where backward needs it; later adapters' result holds earlier updates.
        recover = dict(x=x, base_fn=lambda: base_of(x)) if i == 0 and base is None and bias is None else {}
        result = ops.dora_rescale(result.to(dtype), u.to(dtype), a.lora_B, a.magnitude, a.norm, a.scaling,
                                  bias=None if bias is None or base is not None else bias.to(dtype),
                                  base=base, activation_memory=a.activation_memory, **recover).to(out_dtype)
    return result


# --------------------------------------------------------------------------------------------------------- conv
class ConvSpec(NamedTuple):
    """What the forward needs of the base conv: F.conv{1,2,3}d and its hyper-parameters."""
    conv_fn: Callable
    stride: tuple
    padding: object
    dilation: tuple
    groups: int


def conv(x: Tensor, base_out: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec,
         adapters: Sequence[Adapter], training: bool) -> Tensor:
    """DoRA over a frozen conv (PEFT _DoraConvNdLayer). base_out: the base layer's output (bias included).
    lora_A: [r, C_in, k…] applied with the base kernel, stride and padding (not dilation, as PEFT); lora_B:
    [C_out, r/groups, 1…] with the base groups. Each adapter's norm is per output channel."""
    result, out_dtype = base_out, base_out.dtype
    bias_view = None if bias is None else bias.reshape((1, -1) + (1,) * (result.dim() - 2))
    for a in adapters:
        xa = x.to(a.lora_A.dtype)
        x_drop = _dropped(xa, a, training)
        src = xa if x_drop is None else x_drop
        u = spec.conv_fn(src, a.lora_A, None, spec.stride, spec.padding)
        lora = spec.conv_fn(u, a.lora_B, None, 1, 0, 1, spec.groups) * a.scaling
        g = _gain(a, a.norm).reshape((1, -1) + (1,) * (result.dim() - 2))
        result = _dora_update(result, lora, g, bias_view, x_drop, lambda xd: spec.conv_fn(
            xd, weight.to(xd.dtype), None, spec.stride, spec.padding, spec.dilation, spec.groups)).to(out_dtype)
    return result


# ---------------------------------------------------------------------------------------------------- embedding
def embedding(ids: Tensor, base_out: Tensor, embed: Callable[[Tensor, Tensor], Tensor], embed_scale: Tensor | None,
              adapters: Sequence[Adapter]) -> Tensor:
    """DoRA over a frozen embedding (PEFT DoraEmbeddingLayer): lora_A [r, vocab], lora_B [dim, r]; the norm runs over
    the vocabulary, one gain per embedding dim; no dropout. y = g ⊙ base_out + g ⊙ s·(A_ᵀ[ids] Bᵀ)·embed_scale."""
    result, out_dtype = base_out, base_out.dtype
    for a in adapters:
        g = _gain(a, a.norm)
        lora = g * (embed(ids, a.lora_A.T) @ a.lora_B.T) * a.scaling
        if embed_scale is not None:  # after the norm, as PEFT (huggingface/peft#2839)
            lora = lora * embed_scale.to(lora.dtype)
        result = (g * result + lora).to(out_dtype)
    return result
