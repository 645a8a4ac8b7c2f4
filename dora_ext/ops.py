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
import weakref
from typing import Callable

import torch
from torch import Tensor

from . import eager_autograd

__all__ = ["weight_norm", "weight_norm_4bit", "weight_norm_int8", "dora_linear", "dora_rescale", "dora_mixed", "merge_", "unmerge_", "NORM_EPS", "accum_dtype",
           "set_activation_memory", "activation_memory", "ACTIVATION_MODES"]

_ops = torch.ops.dora_ext

#: Norms are clamped to this before g = m / n (csrc/dora_ext.h: kNormEps). PEFT has no clamp and yields NaN for
#: an all-zero row of W + s·B·A; here such a row gets g = m / 1e-6 (0 for the usual m = ‖W_row‖ = 0).
NORM_EPS = 1e-6


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


def accum_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The one rule for reductions (norms, gains, magnitude gradients): float64 if any of the given inputs is
    float64, else float32 (csrc/host_common.h: accum_dtype is the same rule in C++)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _weight_norm_fake(weight, lora_A, lora_B, scaling):
    return weight.new_empty((weight.shape[0],), dtype=accum_dtype(weight, lora_A))


def _weight_norm_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output)
    ctx.n_inputs = len(inputs)


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


def _weight_norm_4bit_fake(packed, absmax, code, blocksize, absmax_code, absmax_scale, absmax_offset,
                           absmax_blocksize, out_features, in_features, dtype, lora_A, lora_B, scaling, row_group=0):
    return packed.new_empty((out_features,), dtype=accum_dtype(lora_A))


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
) -> Tensor:
    """Fused DoRA linear with PEFT 0.21 semantics; returns [..., out] in x's dtype.

    Without x_drop: y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias.
    With x_drop = dropout(x) (training, p > 0): y = x Wᵀ + bias + (g-1) ⊙ (x_drop Wᵀ) + g ⊙ s·(x_drop Aᵀ) Bᵀ.
    g = magnitude / max(weight_norm, NORM_EPS); weight_norm is computed when not given (pass a cached one to skip
    that pass). Gradients flow to x, x_drop, lora_A, lora_B, magnitude and bias; the weight must be frozen.
    """
    dt = autocast_dtype(x)
    if dt is not None:  # the module docstring's autocast rule: what F.linear does under autocast
        x, weight = x.to(dt), weight.to(dt)
        x_drop = None if x_drop is None else x_drop.to(dt)
        bias = None if bias is None else bias.to(dt)
    with autocast_off(x):
        if weight_norm is None:
            weight_norm = eager_autograd.constant(_ops.weight_norm, weight, lora_A, lora_B, float(scaling))
        out, _, _ = eager_autograd.call(*_EAGER[_ops.name]["dora_linear"], x, x_drop, weight, bias, lora_A, lora_B,
                                        magnitude, weight_norm, float(scaling))
    return out


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
    # acc with one GEMM instead of failing, as where a row has m = 0 (out = 0 there carries no acc; _ZeroFlag).
    # Backward recomputes acc = x_src Wᵀ + s·u Bᵀ from what lora_A's gradient keeps anyway (x_src).
    recomputable = need[4] and _is_real(magnitude)
    acc_slot = _keep_for_magnitude(ctx, need[6], output[0], acc, x.shape[-1], magnitude, recomputable=recomputable,
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


def _dora_linear_backward(ctx, grad_out, _grad_acc, _grad_u, *, _ns):
    if grad_out is None:  # only reachable if the output was unused (grads are not materialised)
        return None, None, None, None, None, None, None, None, None
    x_src, weight, lora_A, lora_B, magnitude, weight_norm, acc, lora_u = ctx.saved_tensors
    acc_is_output = False
    if ctx.kept_output:
        acc, acc_is_output = _magnitude_operand(ctx, acc, x_src, weight, lora_A, lora_B, lora_u, x_src.dtype)
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
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


#: What the fused ops keep for the magnitude gradient's [T, out] operand (set_activation_memory).
_ACTIVATIONS = "balanced"
ACTIVATION_MODES = ("balanced", "output", "low", "acc")


def set_activation_memory(mode: str) -> str:
    """Choose what dora_linear and dora_rescale keep from forward to backward for the magnitude gradient
    Σ_t δ ⊙ acc / n; returns the previous mode. Where the output can serve (no bias, no dropout: out = g ⊙ acc; a
    zero in m makes backward recompute acc) the op holds its own output, which costs nothing while a later op of the
    forward saves it too (SiLU, the gate product); what differs is an output that dies during the forward (a
    residual add, rotary or a copy consumed it):

    "balanced" (default): it is freed where the recompute is cheap (in_features ≤ out_features: q/k/v/o, gate/up),
        and backward recomputes acc with one [T, in]×[in, out] GEMM; elsewhere (down_proj) it is kept.
        Llama-style stack, CPU fp32: 1.04× PEFT LoRA's peak memory at 1.10× its step time.
    "output": always kept: no recompute; the layer then costs one [T, out] more than LoRA (1.20×, at 0.99×).
    "low": always freed: LoRA's peak memory (1.00×), at 1.18× its step time; and where the output cannot serve
        (dora_linear with a bias or dropout) nothing [T, out] is kept either: acc is recomputed.
    "acc": the pre-scale sum acc itself, one [T, out] per layer (the behaviour before "output").
    Elsewhere acc is kept. Under saved-tensor hooks (non-reentrant activation checkpointing, offloading) the output
    is saved through them instead of being held, in every mode but "acc": checkpointing then drops it like any
    activation. An output modified in place is detected (version counter) and acc recomputed, in every mode."""
    global _ACTIVATIONS
    if mode not in ACTIVATION_MODES:
        raise ValueError(f"dora_ext.ops.set_activation_memory: expected one of {ACTIVATION_MODES}, got {mode!r}")
    previous, _ACTIVATIONS = _ACTIVATIONS, mode
    return previous


@contextlib.contextmanager
def activation_memory(mode: str):
    """set_activation_memory(mode) for the duration of a with-block (forwards inside it decide)."""
    previous = set_activation_memory(mode)
    try:
        yield
    finally:
        set_activation_memory(previous)


class _KeptOutput:
    """The op's output held for backward as a detached alias (same storage and version counter, no reference to the
    graph, so no cycle). Where the mode allows, a finalizer on the output drops the alias when the output dies
    outside a backward pass: then no later op of the forward saved it (a residual add, rotary, a copy consumed it)
    and holding it would be the layer's own [T, out]; backward recomputes acc instead. An output that dies inside
    backward (its consumer's saved tensors being released) stays held: backward is about to read it."""

    __slots__ = ("alias", "version", "__weakref__")

    def __init__(self, out: Tensor, free_when_dead: bool):
        self.alias, self.version = out.detach(), out._version
        if free_when_dead:  # (not at interpreter exit: nothing to free for a backward that never comes)
            weakref.finalize(out, _KeptOutput._output_died, weakref.ref(self)).atexit = False

    @staticmethod
    def _output_died(ref) -> None:
        kept = ref()
        if kept is not None and not _in_backward():
            kept.alias = None

    def get(self) -> Tensor | None:
        """The alias if still held and unmodified, else None."""
        out = self.alias
        return out if out is not None and out._version == self.version else None


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing without reentrancy, the default of
    transformers' gradient_checkpointing_enable; offloading with save_on_cpu): what backward reads must then go
    through them (ctx.save_for_backward), not be held on ctx behind their back, or checkpointing keeps every
    layer's output for the whole step."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _ZeroFlag:
    """Whether the magnitude has a zero entry, computed in the forward without waiting for the device and read in
    backward (a row with m = 0 has out = 0, which carries no acc: acc is then recomputed). bool() in the forward
    would stop the host once per layer until the device caught up, emptying its queue; in backward the answer has
    long been there. CUDA: the count goes to pinned host memory by a non-blocking copy behind an event."""

    __slots__ = ("nonzero", "numel", "event")

    def __init__(self, magnitude: Tensor):
        # The count of non-zero entries, compared on the host in get(): count_nonzero is one op (on the CPU ~1 µs
        # against 4.5 µs for (m == 0).any()); NaN counts as non-zero and -0.0 as zero, as for m == 0.
        nonzero = torch.count_nonzero(magnitude.detach())
        self.numel, self.event = magnitude.numel(), None
        if nonzero.device.type == "cuda":
            host = torch.empty((), dtype=nonzero.dtype, pin_memory=True)
            host.copy_(nonzero, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            nonzero = host
        self.nonzero = nonzero

    def get(self) -> bool:
        """Whether the magnitude has a zero entry."""
        if self.event is not None:
            self.event.synchronize()
        return int(self.nonzero) < self.numel


class _NothingKept:
    """A layer's "low" stand-in for a kept output it cannot use (bias, dropout): backward recomputes acc."""

    @staticmethod
    def get() -> None:
        return None


def _in_backward() -> bool:
    """Whether this thread is running a backward pass (the autograd engine's current graph task)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task() != -1 if task is not None else not torch.is_grad_enabled()


def _free_when_dead(in_features: int, out_features: int) -> bool:
    """Whether the current mode frees a layer's kept output once nothing else holds it (then backward recomputes acc
    with one [T, in]×[in, out] GEMM): "low" always; "balanced" where in_features ≤ out_features (that GEMM costs at
    most 2·out FLOPs per freed element)."""
    return _ACTIVATIONS == "low" or (_ACTIVATIONS == "balanced" and in_features <= out_features)


def _keep_for_magnitude(ctx, needed: bool, out: Tensor, acc: Tensor, in_features: int, magnitude: Tensor, *,
                        serves: bool, recomputable: bool, closure: bool = False) -> Tensor | None:
    """Decide what backward gets for the magnitude gradient (set_activation_memory), if `needed`; returns what the
    op saves in acc's slot. serves: out = g ⊙ acc (no bias, no dropout) where m ≠ 0, which backward learns from
    _ZeroFlag (a row with m = 0 has out = 0: acc is then recomputed); recomputable: backward can rebuild acc;
    closure: it would rebuild it through a Python closure holding x, which saved-tensor hooks cannot see.

    The output serves when the mode allows it, and always under saved-tensor hooks: non-reentrant checkpointing
    re-runs the forward in backward, outside the caller's activation_memory block, and the re-run must save the same
    tensors, so there the choice never reads the mode. Under hooks the output goes into acc's slot (the hooks drop
    or move it like any activation; its version is recorded, so an alias handed back modified in place is not
    used); elsewhere it is held on ctx (_KeptOutput). In "low" a layer whose output cannot serve keeps nothing
    [T, out] either where acc can be rebuilt. ctx.kept_output: backward calls _magnitude_operand."""
    ctx.kept_output, ctx.kept, ctx.out_version, ctx.zero_magnitude = False, None, None, None
    if not needed:
        return None
    hooked = _saved_tensors_hooked()
    recomputable = recomputable and not (closure and hooked)
    if serves and recomputable and (_ACTIVATIONS != "acc" or hooked):
        ctx.kept_output, ctx.zero_magnitude = True, _ZeroFlag(magnitude)
        if hooked:
            ctx.out_version = out._version
            return out.detach()
        ctx.kept = _KeptOutput(out, _free_when_dead(in_features, out.shape[-1]))
        return None
    if recomputable and _ACTIVATIONS == "low" and not hooked:
        ctx.kept_output, ctx.kept = True, _NothingKept
        return None
    return acc


def _magnitude_operand(ctx, saved: Tensor | None, x: Tensor | None, weight: Tensor | None, lora_A: Tensor | None,
                       lora_B: Tensor, lora_u: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """(the [T, out] operand of the magnitude gradient, whether it is the output): the kept output (held on ctx,
    or `saved` through saved-tensor hooks) if it is still there and unmodified and m has no zero, else
    acc = x Wᵀ + s·(x Aᵀ) Bᵀ recomputed in `dtype` as the forward computed it (x Wᵀ by ctx.base_fn where the base
    layer has no dense weight)."""
    out = ctx.kept.get() if ctx.kept is not None else (
        saved if saved is not None and saved._version == ctx.out_version else None)
    if out is not None and not (ctx.zero_magnitude is not None and ctx.zero_magnitude.get()):
        return out.reshape(-1, out.shape[-1]), True
    x2 = None if x is None else x.reshape(-1, x.shape[-1]).to(dtype)
    if weight is None:
        with torch.no_grad():
            base = ctx.base_fn()
        base = base.reshape(-1, base.shape[-1]).to(dtype)
    else:
        base = x2 @ weight.to(dtype).T
    u = lora_u if lora_u is not None else x2 @ lora_A.to(dtype).T
    return torch.addmm(base, u.to(dtype), lora_B.to(dtype).T, alpha=ctx.scaling), False




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
                 weight: Tensor | None = None, base_fn: Callable[[], Tensor] | None = None) -> Tensor:
    """The DoRA update of a base layer's output computed elsewhere (what a PEFT LoRA variant receives); returns a
    new tensor of result's shape and dtype, g = magnitude / max(weight_norm, NORM_EPS), lora_u = x Aᵀ [..., r]:

    base None:     g ⊙ (result − bias + s·lora_u Bᵀ) + bias       (eval, or no dropout; bias: the base layer's)
    base = x_d Wᵀ: result + (g−1) ⊙ base + g ⊙ s·lora_u Bᵀ         (training with dropout; bias must be None)

    Gradients flow to result, base, lora_u, lora_B and magnitude; the GEMMs producing result, base and lora_u stay
    the caller's (and autograd's). x and weight: the base layer's input and [out, in] weight (result − bias =
    x Wᵀ); given, the magnitude gradient is taken from the output (no [T, out] activation kept, as in dora_linear),
    and acc is recomputed from them where backward needs it (set_activation_memory). A base layer without a dense
    weight (bitsandbytes) gives x and base_fn instead of weight: base_fn() returns result − bias again (its own
    product of x), called in backward only for that recompute."""
    if base_fn is not None:
        if x is None or weight is not None or base is not None:
            raise ValueError("dora_ext.ops.dora_rescale: expected base_fn with x and without weight or base (it "
                             f"recomputes result − bias = x Wᵀ), got x={x is not None}, weight={weight is not None}, "
                             f"base={base is not None}")
        _pending.base_fn, _pending.in_features, x = base_fn, x.shape[-1], None
    try:
        with autocast_off(result):
            out, _ = eager_autograd.call(*_EAGER[_ops.name]["dora_rescale"], result, base, bias, lora_u, lora_B,
                                         magnitude, weight_norm, float(scaling), x, weight)
    finally:
        _pending.base_fn = None
    return out


#: dora_rescale's base_fn, handed from the wrapper to setup_context (which sees only the op's tensors) on this
#: thread, for the one op call in between.
_pending = threading.local()


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
    if need[2]:
        raise ValueError("dora_ext::dora_rescale: expected a frozen bias (requires_grad=False), got one that "
                         "requires grad")
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
    acc_slot = _keep_for_magnitude(
        ctx, need[5], output[0], acc, x.shape[-1] if x is not None else getattr(_pending, "in_features", 0),
        magnitude, serves=recomputable and bias is None, recomputable=recomputable, closure=x is None)
    rebuild = ctx.kept_output  # backward may rebuild acc: it then needs lora_u and x, W (or base_fn)
    ctx.base_fn = base_fn if rebuild else None
    ctx.save_for_backward(lora_u if need[4] or rebuild else None, lora_B, magnitude, weight_norm, acc_slot,
                          x if rebuild else None, weight if rebuild else None)


def _dora_rescale_backward(ctx, grad_out, _grad_acc, *, _ns):
    if grad_out is None:
        return (None,) * 10
    lora_u, lora_B, magnitude, weight_norm, acc, x, weight = ctx.saved_tensors
    if lora_u is not None:
        lora_u = lora_u.reshape(-1, lora_u.shape[-1])  # [T, r], as the op's acc
    acc_is_output = False
    if ctx.kept_output:  # (result had no bias on this path: result − bias = x Wᵀ)
        acc, acc_is_output = _magnitude_operand(ctx, acc, x, weight, None, lora_B, lora_u, grad_out.dtype)
    need_result, need_base, need_u, need_B, need_m = ctx.mask
    # With base, d out / d result is the identity: result's gradient is grad_out itself, no kernel needed.
    mask = [need_result and not ctx.has_base, need_base, need_u, need_B, need_m]
    with autocast_off(grad_out):
        g_result, g_base, g_u, g_B, g_m = _ns.dora_rescale_backward(
            grad_out, lora_u, lora_B, magnitude, weight_norm, acc, ctx.scaling, ctx.has_base, mask, acc_is_output)
    if need_result and ctx.has_base:
        g_result = grad_out
    return g_result, g_base, None, g_u, g_B, g_m, None, None, None, None




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


def _dora_mixed_fake(result, bias, x, lora_A, lora_B, scaling, magnitude, weight_norm, adapter_index):
    return torch.empty_like(result, memory_format=torch.contiguous_format)


def _dora_mixed_setup(ctx, inputs, output):
    pass


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
    "dora_ext_emu", which has the same schemas. Each namespace's backward calls its own backward op."""
    ops_ns = getattr(torch.ops, ns)
    for name in ("weight_norm", "weight_norm_4bit", "weight_norm_int8", "dora_linear", "dora_linear_backward",
                 "dora_rescale", "dora_rescale_backward", "dora_mixed"):
        torch.library.register_fake(f"{ns}::{name}", globals()[f"_{name}_fake"])
    for name in ("weight_norm", "weight_norm_4bit", "weight_norm_int8"):  # constants: no gradient to anything
        torch.library.register_autograd(f"{ns}::{name}", _weight_norm_backward, setup_context=_weight_norm_setup)
    _EAGER[ns] = {}
    for name, setup, backward in (("dora_linear", _dora_linear_setup, _dora_linear_backward),
                                  ("dora_rescale", _dora_rescale_setup, _dora_rescale_backward)):
        bound = functools.partial(backward, _ns=ops_ns)
        torch.library.register_autograd(f"{ns}::{name}", bound, setup_context=setup)
        _EAGER[ns][name] = (getattr(ops_ns, name).default, setup, bound)  # eager_autograd.call: the same functions
    torch.library.register_autograd(f"{ns}::dora_mixed", _dora_mixed_backward, setup_context=_dora_mixed_setup)


#: per namespace and differentiable op: (op overload, setup_context, backward) for eager_autograd.call
_EAGER: dict[str, dict[str, tuple]] = {}

register_namespace("dora_ext")
