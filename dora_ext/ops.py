"""The op layer over torch.ops.dora_ext: per op a thin wrapper, a fake (shape) kernel and, where differentiable, an
autograd registration, so eager mode, torch.compile(fullgraph=True) and torch.library.opcheck all work. In eager
mode the dora_linear and dora_rescale wrappers run that registration's setup_context and backward through
eager_autograd.call (a torch.autograd.Function around the op: less host time per call than torch.library's wrapper).

Shapes: x[..., in], weight[out, in], bias[out], lora_A[r, in], lora_B[out, r], magnitude[out].
The weight norm ‖W + s·B·A‖_row is a constant for autograd (DoRA, Liu et al. 2024, §4.3; PEFT detaches it too).

Autocast has one rule, here: inside an autocast region dora_linear runs in the region's dtype, as F.linear would
(x, W and the bias are cast to it; adapters, norm and gains keep their dtypes), and every op's own GEMMs then run
with autocast off, so dispatch never re-casts what the kernels chose.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Callable

import torch
from torch import Tensor

from . import eager_autograd, torch_private
from .numerics import NORM_EPS, accum_dtype
from .activation_policy import (  # noqa: F401  (the activation-memory API, re-exported here)
    ACTIVATION_MODES, activation_memory, current_mode, enter_call, exit_call, keep_for_magnitude, magnitude_operand,
    set_activation_memory,
)

__all__ = ["weight_norm", "weight_norm_4bit", "weight_norm_int8", "dora_linear", "dora_rescale", "dora_mixed", "merge_", "unmerge_", "NORM_EPS", "accum_dtype",
           "set_activation_memory", "activation_memory", "current_mode", "ACTIVATION_MODES"]

_ops = torch.ops.dora_ext

#: op name -> its fake (shape) kernel, recorded by @_fake_kernel where each fake is defined; register_namespace
#: registers them
_FAKES: dict[str, Callable] = {}
#: op name -> (setup_context, backward, takes_ns), recorded by @_autograd where each backward is defined. takes_ns:
#: the backward calls its namespace's backward op (given as `_ns`), and eager_autograd.call runs the same pair
_AUTOGRAD: dict[str, tuple[Callable, Callable, bool]] = {}


def _fake_kernel(name: str):
    """Record the decorated function as the fake kernel of op `name`."""
    def record(fake: Callable) -> Callable:
        _FAKES[name] = fake
        return fake
    return record


def _autograd(*names: str, setup: Callable, takes_ns: bool = False):
    """Record the decorated backward, with `setup` as its setup_context, as the autograd of ops `names`."""
    def record(backward: Callable) -> Callable:
        for name in names:
            _AUTOGRAD[name] = (setup, backward, takes_ns)
        return backward
    return record


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype an enclosing autocast region would run a linear in, or None outside autocast."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def autocast_off(t: Tensor):
    """The ATen GEMMs inside the ops would otherwise be re-cast by an enclosing autocast region (dispatch reaches
    the kernels with autocast still on), mixing dtypes the kernels did not choose."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- weight_norm
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Row norms ‖W + s·B·A‖₂ → [out], float32 (float64 if weight or lora_A is float64).

    Computed in one streaming pass over W without materialising the [out, in] sum; never differentiated.
    """
    with autocast_off(weight):
        return eager_autograd.constant(_ops.weight_norm, weight, lora_A, lora_B, float(scaling))


@_fake_kernel("weight_norm")
def _weight_norm_fake(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=accum_dtype(weight, lora_A))


def _weight_norm_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output)
    ctx.n_inputs = len(inputs)


@_autograd("weight_norm", "weight_norm_4bit", "weight_norm_int8", setup=_weight_norm_setup)
def _weight_norm_backward(ctx, grad):
    return (None,) * ctx.n_inputs  # a constant by definition (DoRA §4.3)


def weight_norm_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int],
                     dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                     absmax_code: Tensor | None = None, absmax_scale: Tensor | None = None,
                     absmax_offset: Tensor | None = None, absmax_blocksize: int = 0, row_group: int = 0) -> Tensor:
    """Row norms ‖dequant(W) + s·B·A‖₂ → [out] of a bitsandbytes 4-bit weight of `shape` [out, in], read from its
    packed storage (uint8, two codes per byte) in row blocks: the dequantized [out, in] weight never exists.
    absmax/code/blocksize and the nested absmax_* tensors are the QuantState's; every dequantized value is rounded to
    `dtype` (the QuantState's dtype) first, as bitsandbytes' dequantize_4bit does. float32 (float64 adapters: float64).
    row_group=32: the codes are in bitsandbytes' CPU layout (csrc/quantized_weights.h), absmax in the standard order.
    dora_ext.quantized.weight_norm takes the bitsandbytes layer itself."""
    with autocast_off(packed):
        return eager_autograd.constant(_ops.weight_norm_4bit, packed, absmax, code, int(blocksize), absmax_code,
                                       absmax_scale, absmax_offset, int(absmax_blocksize), int(shape[0]),
                                       int(shape[1]), dtype, lora_A, lora_B, float(scaling), int(row_group))


def weight_norm_int8(weight: Tensor, row_scale: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """Row norms ‖W + s·B·A‖₂ → [out] of a bitsandbytes LLM.int8 weight W = CB · SCB / 127 (weight: CB int8
    [out, in], row_scale: SCB float32 [out]), without a dequantized copy."""
    with autocast_off(weight):
        return eager_autograd.constant(_ops.weight_norm_int8, weight, row_scale, lora_A, lora_B, float(scaling))


@_fake_kernel("weight_norm_4bit")
def _weight_norm_4bit_fake(packed, absmax, code, blocksize, absmax_code, absmax_scale, absmax_offset,
                           absmax_blocksize, out_features, in_features, dtype, lora_A, lora_B, scaling, row_group=0):
    return packed.new_empty((out_features,), dtype=accum_dtype(lora_A))


@_fake_kernel("weight_norm_int8")
def _weight_norm_int8_fake(weight, row_scale, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=accum_dtype(lora_A))


# ---------------------------------------------------------------------------------------------------- dora_linear
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
    weight_norm: Tensor | None = None,
    activation_memory: str | None = None,
) -> Tensor:
    """Fused DoRA linear with PEFT 0.21 semantics; returns [..., out] in x's dtype.

    Without x_drop: y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias.
    With x_drop = dropout(x) (training, p > 0): y = x Wᵀ + bias + (g-1) ⊙ (x_drop Wᵀ) + g ⊙ s·(x_drop Aᵀ) Bᵀ.
    g = magnitude / max(weight_norm, NORM_EPS); weight_norm is computed when not given (pass a cached one to skip
    that pass). Gradients flow to x, x_drop, lora_A, lora_B, magnitude and bias; the weight must be frozen.
    activation_memory: what this call keeps for the magnitude gradient ("fast", "balanced", "min_memory", "acc":
    dora_ext.activation_policy); None: the context's mode (an enclosing `with activation_memory(mode):`, else
    "fast"). Every mode gives the same gradients.
    """
    dt = autocast_dtype(x)
    if dt is not None:  # the module docstring's autocast rule: what F.linear does under autocast
        x, weight = x.to(dt), weight.to(dt)
        x_drop = None if x_drop is None else x_drop.to(dt)
        bias = None if bias is None else bias.to(dt)
    token = enter_call(activation_memory, "dora_ext.ops.dora_linear")
    try:
        with autocast_off(x):
            if weight_norm is None:
                weight_norm = eager_autograd.constant(_ops.weight_norm, weight, lora_A, lora_B, float(scaling))
            out, _, _ = eager_autograd.call(*_EAGER[_ops.name]["dora_linear"], x, x_drop, weight, bias, lora_A,
                                            lora_B, magnitude, weight_norm, float(scaling))
    finally:
        exit_call(token)
    return out


@_fake_kernel("dora_linear")
def _dora_linear_fake(x, x_drop, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling):
    torch._check(
        x.shape[-1] == weight.shape[1],
        lambda: f"dora_ext::dora_linear: expected x of shape [..., {weight.shape[1]}], got {tuple(x.shape)}",
    )
    tokens = math.prod(x.shape[:-1])
    out_features, rank = weight.shape[0], lora_A.shape[0]
    return (
        x.new_empty((*x.shape[:-1], out_features)),
        x.new_empty((tokens, out_features)),
        x.new_empty((tokens, rank)),
    )


def _dora_linear_setup(ctx, inputs, output):
    x, x_drop, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling = inputs
    _, acc, lora_u = output
    ctx.mark_non_differentiable(acc, lora_u)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero [T, out] gradient for `acc` in backward
    need = ctx.needs_input_grad
    if need[2]:  # checked here, not in the wrapper, so direct torch.ops callers get it too
        raise ValueError(
            "dora_ext::dora_linear: expected a frozen weight (requires_grad=False); DoRA trains lora_A, lora_B and "
            "magnitude, got a weight that requires grad"
        )
    ctx.scaling = scaling
    ctx.dropout = x_drop is not None
    # (x, x_drop, lora_A, lora_B, magnitude, bias), the order of dora_linear_backward's output_mask.
    ctx.mask = [need[0], need[1], need[4], need[5], need[6], need[3]]
    x_src = x_drop if ctx.dropout else x
    # The magnitude gradient Σ_t δ ⊙ acc / n needs the pre-scale sum acc [T, out]. Without bias and dropout the
    # output is g ⊙ acc, so the output itself serves (Σ δ ⊙ out / m), and the output usually stays alive anyway (the
    # next op saves it: SiLU, the gate product, attention's v): the forward then keeps no [T, out] tensor of its own.
    # It is held as a detached alias (same storage and version counter, no reference to the graph, so no cycle); if
    # the caller modifies the output in place (ReLU(inplace=True), y += r) the version moves and backward recomputes
    # acc with one GEMM instead of failing, as where a row has m = 0 (out = 0 there carries no acc;
    # activation_policy._ZeroFlag). What the mode keeps: dora_ext.activation_policy. Backward recomputes
    # acc = x_src Wᵀ + s·u Bᵀ from what lora_A's gradient keeps anyway (x_src).
    recomputable = need[4] and _is_real(magnitude)
    acc_slot = keep_for_magnitude(ctx, need[6], output[0], acc, x.shape[-1], magnitude, recomputable=recomputable,
                                  serves=recomputable and bias is None and not ctx.dropout)
    # Save only what the requested gradients read: x_src for lora_A, lora_u for lora_B, acc for the magnitude.
    ctx.save_for_backward(
        x_src if need[4] else None,
        weight,
        lora_A,
        lora_B,
        magnitude,
        weight_norm,
        acc_slot,
        lora_u if need[5] else None,
    )


@_autograd("dora_linear", setup=_dora_linear_setup, takes_ns=True)
def _dora_linear_backward(ctx, grad_out, _grad_acc, _grad_u, *, _ns):
    if grad_out is None:  # only reachable if the output was unused (grads are not materialised)
        return None, None, None, None, None, None, None, None, None
    x_src, weight, lora_A, lora_B, magnitude, weight_norm, acc, lora_u = ctx.saved_tensors
    acc_is_output = False
    if ctx.kept_output:
        acc, acc_is_output = magnitude_operand(ctx, acc, x_src, weight, lora_A, lora_B, lora_u, x_src.dtype)
    with autocast_off(grad_out):  # backward() called inside an autocast region must not re-cast our GEMMs
        gx, gxd, gA, gB, gm, gb = _ns.dora_linear_backward(
            grad_out, x_src, weight, lora_A, lora_B, magnitude, weight_norm, acc, lora_u, ctx.scaling, ctx.dropout,
            ctx.mask, acc_is_output,
        )
    return gx, gxd, None, gb, gA, gB, gm, None, None


def _is_real(t: Tensor) -> bool:
    """A tensor with data (not traced by torch.compile / AOT dispatch, where data-dependent checks and aliases on
    ctx do not apply: there the saved acc is used)."""
    if torch.compiler.is_compiling():
        return False
    if eager_autograd.is_plain(t):  # decided without is_fake, which costs ~3 µs a call
        return True
    return not torch_private.is_fake(t)


@_fake_kernel("dora_linear_backward")
def _dora_linear_backward_fake(grad_out, x_src, weight, lora_A, lora_B, magnitude, weight_norm, acc, lora_u, scaling,
                               dropout, output_mask, acc_is_output=False):
    need_x, need_xd, need_A, need_B, need_m, need_bias = output_mask
    x_shape = (*grad_out.shape[:-1], weight.shape[1])
    return (
        grad_out.new_empty(x_shape) if need_x else None,
        grad_out.new_empty(x_shape) if need_xd else None,
        torch.empty_like(lora_A) if need_A else None,
        torch.empty_like(lora_B) if need_B else None,
        torch.empty_like(magnitude) if need_m else None,
        grad_out.new_empty((weight.shape[0],)) if need_bias else None,
    )


# --------------------------------------------------------------------------------------------------- dora_rescale
def dora_rescale(result: Tensor, lora_u: Tensor, lora_B: Tensor, magnitude: Tensor, weight_norm: Tensor,
                 scaling: float, *, bias: Tensor | None = None, base: Tensor | None = None, x: Tensor | None = None,
                 weight: Tensor | None = None, base_fn: Callable[[], Tensor] | None = None,
                 activation_memory: str | None = None) -> Tensor:
    """The DoRA update of a base layer's output computed elsewhere (what a PEFT LoRA variant receives); returns a
    new tensor of result's shape and dtype, g = magnitude / max(weight_norm, NORM_EPS), lora_u = x Aᵀ [..., r]:

    base None:     g ⊙ (result − bias + s·lora_u Bᵀ) + bias       (eval, or no dropout; bias: the base layer's)
    base = x_d Wᵀ: result + (g−1) ⊙ base + g ⊙ s·lora_u Bᵀ         (training with dropout; bias must be None)

    Gradients flow to result, base, bias, lora_u, lora_B and magnitude; the GEMMs producing result, base and
    lora_u stay the caller's (and autograd's). x and weight: the base layer's input and [out, in] weight
    (result − bias = x Wᵀ); given, the magnitude gradient is taken from the output (no [T, out] activation kept,
    as in dora_linear), and acc is recomputed from them where backward needs it (activation_memory: as for
    dora_linear). A base layer without a dense weight (bitsandbytes) gives x and base_fn instead of weight:
    base_fn() returns result − bias again (its own product of x), called in backward only for that recompute."""
    if base_fn is not None:
        if x is None or weight is not None or base is not None:
            raise ValueError("dora_ext.ops.dora_rescale: expected base_fn with x and without weight or base (it "
                             f"recomputes result − bias = x Wᵀ), got x={x is not None}, weight={weight is not None}, "
                             f"base={base is not None}")
        _pending.base_fn, _pending.in_features, x = base_fn, x.shape[-1], None
    token = enter_call(activation_memory, "dora_ext.ops.dora_rescale")
    try:
        with autocast_off(result):
            out, _ = eager_autograd.call(*_EAGER[_ops.name]["dora_rescale"], result, base, bias, lora_u, lora_B,
                                         magnitude, weight_norm, float(scaling), x, weight)
    finally:
        _pending.base_fn = None
        exit_call(token)
    return out


#: dora_rescale's base_fn, handed from the wrapper to setup_context (which sees only the op's tensors) on this
#: thread, for the one op call in between.
_pending = threading.local()


@_fake_kernel("dora_rescale")
def _dora_rescale_fake(result, base, bias, lora_u, lora_B, magnitude, weight_norm, scaling, x=None, weight=None):
    torch._check(
        result.shape[-1] == lora_B.shape[0],
        lambda: f"dora_ext::dora_rescale: expected result of shape [..., {lora_B.shape[0]}], got {tuple(result.shape)}",
    )
    return torch.empty_like(result, memory_format=torch.contiguous_format), \
        result.new_empty((math.prod(result.shape[:-1]), lora_B.shape[0]))


def _dora_rescale_setup(ctx, inputs, output):
    result, base, bias, lora_u, lora_B, magnitude, weight_norm, scaling, x, weight = inputs
    _, acc = output
    ctx.mark_non_differentiable(acc)
    ctx.set_materialize_grads(False)
    need = ctx.needs_input_grad
    # A trainable bias (or one FSDP(use_orig_params=True) reports as such: a view of a flat parameter that requires
    # grad) gets its gradient in backward from grad_out, magnitude and weight_norm, which are saved anyway.
    ctx.need_bias = need[2]
    ctx.scaling = scaling
    ctx.has_base = base is not None
    # (result, base, lora_u, lora_B, magnitude), the order of dora_rescale_backward's output_mask
    ctx.mask = [need[0], need[1], need[3], need[4], need[5]]
    # As in dora_linear: without base and bias, out = g ⊙ acc, so the output serves the magnitude gradient (held as a
    # detached alias, version-checked); x and W (or the wrapper's base_fn) recompute acc = x Wᵀ + s·u Bᵀ where the
    # output was freed or modified in place. base_fn's closure holds x outside saved-tensor hooks, so under hooks
    # (checkpointing) that route keeps acc, which goes through them.
    base_fn = getattr(_pending, "base_fn", None)
    recomputable = base is None and (x is not None or base_fn is not None) and _is_real(magnitude)
    acc_slot = keep_for_magnitude(
        ctx, need[5], output[0], acc, x.shape[-1] if x is not None else getattr(_pending, "in_features", 0),
        magnitude, serves=recomputable and bias is None, recomputable=recomputable, closure=x is None)
    rebuild = ctx.kept_output  # backward may rebuild acc: it then needs lora_u and x, W (or base_fn)
    ctx.base_fn = base_fn if rebuild else None
    ctx.save_for_backward(lora_u if need[4] or rebuild else None, lora_B, magnitude, weight_norm, acc_slot,
                          x if rebuild else None, weight if rebuild else None)


@_autograd("dora_rescale", setup=_dora_rescale_setup, takes_ns=True)
def _dora_rescale_backward(ctx, grad_out, _grad_acc, *, _ns):
    if grad_out is None:
        return (None,) * 10
    lora_u, lora_B, magnitude, weight_norm, acc, x, weight = ctx.saved_tensors
    if lora_u is not None:
        lora_u = lora_u.reshape(-1, lora_u.shape[-1])  # [T, r], as the op's acc
    acc_is_output = False
    if ctx.kept_output:  # (result had no bias on this path: result − bias = x Wᵀ)
        acc, acc_is_output = magnitude_operand(ctx, acc, x, weight, None, lora_B, lora_u, grad_out.dtype)
    need_result, need_base, need_u, need_B, need_m = ctx.mask
    # With base, d out / d result is the identity: result's gradient is grad_out itself, no kernel needed.
    mask = [need_result and not ctx.has_base, need_base, need_u, need_B, need_m]
    g_result = g_base = g_u = g_B = g_m = None
    if any(mask):
        with autocast_off(grad_out):
            g_result, g_base, g_u, g_B, g_m = _ns.dora_rescale_backward(
                grad_out, lora_u, lora_B, magnitude, weight_norm, acc, ctx.scaling, ctx.has_base, mask, acc_is_output)
    if need_result and ctx.has_base:
        g_result = grad_out
    g_bias = None
    if ctx.need_bias:
        # out = result + (g−1) ⊙ (result − bias) + g ⊙ s·u Bᵀ, so d out / d bias = 1 − g: the bias gradient is
        # −(g−1) ⊙ Σ_t δ, reduced in the kernels' accumulation dtype with g−1 = (m − n) / n as they compute it.
        acc_t = accum_dtype(grad_out)
        n = weight_norm.reshape(-1).to(acc_t).clamp_min(NORM_EPS)
        gm1 = (magnitude.reshape(-1).to(acc_t) - n) / n
        rows = grad_out.reshape(math.prod(grad_out.shape[:-1]), grad_out.shape[-1])  # (-1 is ambiguous for 0)
        g_bias = (rows.sum(0, dtype=acc_t) * gm1).neg_().to(grad_out.dtype)
    return g_result, g_base, g_bias, g_u, g_B, g_m, None, None, None, None


@_fake_kernel("dora_rescale_backward")
def _dora_rescale_backward_fake(grad_out, lora_u, lora_B, magnitude, weight_norm, acc, scaling, has_base, output_mask,
                                acc_is_output=False):
    need_result, need_base, need_u, need_B, need_m = output_mask
    return (
        torch.empty_like(grad_out) if need_result else None,
        torch.empty_like(grad_out) if need_base else None,
        grad_out.new_empty((*grad_out.shape[:-1], lora_B.shape[1])) if need_u else None,
        torch.empty_like(lora_B) if need_B else None,
        torch.empty_like(magnitude) if need_m else None,
    )


# ----------------------------------------------------------------------------------------------------- serving
def dora_mixed(result: Tensor, x: Tensor, adapters, adapter_index: Tensor, *, bias: Tensor | None = None) -> Tensor:
    """Serving: every token through its own adapter over one base output (inference only, no gradients).

    result: the base layer's output [..., out] for all tokens (bias included); x: its input [..., in];
    adapters: a list of (lora_A [r, in], lora_B [out, r], scaling, magnitude [out] or None for plain LoRA,
    weight_norm [out] or None), e.g. cached norms; adapter_index: [T] int64, the adapter of each token, or
    len(adapters) for none (the base output, bit for bit). Returns result + (g−1) ⊙ (result − bias) + g ⊙ s·x AᵀBᵀ
    per token (PEFT's eval form; g = 1 for plain LoRA), a new tensor of result's shape and dtype."""
    acc = accum_dtype(result, *(a[3] for a in adapters), *(a[4] for a in adapters))
    ones = result.new_ones((result.shape[-1],), dtype=acc)
    mags = [ones if m is None else m.reshape(-1).to(acc) for _, _, _, m, _ in adapters]
    norms = [ones if n is None else n.reshape(-1).to(acc) for _, _, _, _, n in adapters]
    with autocast_off(result):
        return _ops.dora_mixed(result, bias, x, [a[0] for a in adapters], [a[1] for a in adapters],
                               [float(a[2]) for a in adapters], torch.stack(mags), torch.stack(norms), adapter_index)


@_fake_kernel("dora_mixed")
def _dora_mixed_fake(result, bias, x, lora_A, lora_B, scaling, magnitude, weight_norm, adapter_index):
    return torch.empty_like(result, memory_format=torch.contiguous_format)


def _dora_mixed_setup(ctx, inputs, output):
    pass


@_autograd("dora_mixed", setup=_dora_mixed_setup)
def _dora_mixed_backward(ctx, grad):
    raise RuntimeError("dora_ext::dora_mixed: mixed-adapter batches are for inference; it has no backward (train "
                       "each adapter with its own batches)")


# ---------------------------------------------------------------------------------------------------- merging
def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, weight_norm: Tensor, scaling: float):
    """In place: weight ← g ⊙ (weight + s·B·A), g = m / max(weight_norm, eps), weight_norm of the unmerged weight.

    Keep weight_norm: unmerge_ needs the same one. No [out, in] temporary is allocated.
    """
    with autocast_off(weight):
        _ops.merge_(weight, lora_A, lora_B, magnitude, weight_norm, float(scaling))


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, weight_norm: Tensor, scaling: float):
    """In place inverse of merge_ with the weight_norm cached at merge time: weight ← weight / g − s·B·A."""
    with autocast_off(weight):
        _ops.unmerge_(weight, lora_A, lora_B, magnitude, weight_norm, float(scaling))


# ------------------------------------------------------------------------------------------- registration
def register_namespace(ns: str) -> None:
    """Fake kernels and autograd for every op of namespace `ns`: "dora_ext", and the CUDA-emulation test library's
    "dora_ext_emu", which has the same schemas (_FAKES and _AUTOGRAD: what each op's definition recorded). Each
    namespace's backward calls its own backward op."""
    ops_ns = getattr(torch.ops, ns)
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"{ns}::{name}", fake)
    _EAGER[ns] = {}
    for name, (setup, backward, takes_ns) in _AUTOGRAD.items():
        if takes_ns:
            backward = functools.partial(backward, _ns=ops_ns)
            _EAGER[ns][name] = (getattr(ops_ns, name).default, setup, backward)  # eager_autograd.call: the same
        torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup)


#: per namespace and differentiable op: (op overload, setup_context, backward) for eager_autograd.call
_EAGER: dict[str, dict[str, tuple]] = {}

register_namespace("dora_ext")
