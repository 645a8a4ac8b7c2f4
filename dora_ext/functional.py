"""Every DoRA forward formula, one function per layer kind, with PEFT 0.21 semantics, built on dora_ext.ops. Both
front-ends only map their storage onto these: dora_ext's own layers (layers/) hand over their active adapters as
a list (`linear`, `rescale`, `conv`, `embedding`); PEFT's layers with the fused variants (peft_variants.py) call
the one-adapter forms (`rescale_one`, `conv_one`, `embedding_one`) from the variant's forward, since PEFT's layer
forward loops over the active adapters itself. The norm (`weight_norm`, dense or read from a bitsandbytes layer's
packed weight) and the magnitude at init (`init_magnitude`) are here too, for both.

Linear (nn.Linear, transformers Conv1D): the first active adapter runs the fused op (one GEMM pass, fused epilogue,
fused backward). Conv1d/2d/3d and Embedding: the convolution / gather stays in ATen (the DoRA epilogue is a cheap
elementwise pass next to it); what PEFT makes expensive there is the norm, which materialises the dense [out, in·k]
ΔW and a copy of W every step, and that runs in the fused weight_norm op here.

Several active adapters on one layer compose as PEFT does (peft/tuners/lora/layer.py Linear.forward: each active
adapter's variant.forward updates the running result): in eval, or without dropout, multiplicatively,
y = g₂ ⊙ (y₁ − b + s₂·B₂A₂x) + b; in training with dropout p > 0, additively, y = y₁ + (g₂−1) ⊙ W·x_d +
g₂ ⊙ s₂·B₂A₂x_d. Embeddings compose multiplicatively always.

Input-axis DoRA (norm_axis "in", LyCORIS's wd_on_out=False): g = m / ‖W + s·B·A‖_col, one gain per input column
(a convolution: per input channel, the norm over (out, k…)), W_eff = (W + s·B·A)·diag(g). Since the gain scales
inputs, y = W(g ⊙ x) + s·B·A(g ⊙ x) + b: LoRA over a channel-scaled input (`linear_in`, `conv_in`), no epilogue,
autograd over the one elementwise product (the magnitude gets its gradient through g; the norm is detached, as
for "out"). Its norm runs in the same fused row op over transposed views (`input_axis_blocks`, `input_norm`). An
input-axis adapter is the only active (and the only merged) adapter of its layer: layers refuse mixing the axes.

LyCORIS's DoRA (its LoCon with dora_wd, lycoris_patching.py) differs from DoRA's in its gain only:
G = μ·(m / (‖W + s·B·A‖ + ε) − 1) + 1 with the norm differentiated (`decomposed_gain`); the forward forms above then
take G as the magnitude over a norm of ones.

The dtype rule, PEFT's (peft/tuners/lora/layer.py, bnb.py): x is cast to the adapter's dtype, each adapter's update
is computed in promote(result dtype, adapter dtype) and returned in it, and the layer casts its output back to the
base output's dtype: once, after all adapters, for Linear, Conv1D, Conv and Embedding; after each adapter for
bitsandbytes layers. The one-adapter forms return the promoted dtype (PEFT's layer forward casts back); the list
forms cast back as the matching PEFT layer does. Norms are clamped to numerics.NORM_EPS before g = m / n.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, quantized, tensor_parallel
from .differentiable_norm import with_gradient
from .numerics import NORM_EPS

__all__ = ["Adapter", "weight_norm", "norm_key", "init_magnitude", "layer_product", "linear", "rescale",
           "rescale_one", "ConvSpec", "conv_spec", "conv", "conv_one", "embedding", "embedding_one",
           "input_axis_blocks", "input_norm", "decomposed_gain", "linear_in", "conv_in"]


class Adapter(NamedTuple):
    """One adapter's tensors as a layer holds them. magnitude None: plain LoRA. norm: ‖W + s·B·A‖_row (weight_norm,
    cached or not), which the one-adapter forms need; None only for `linear`, which then computes it. dropout: the
    p to apply in training. activation_memory: the fused ops' mode for this adapter (dora_ext.activation_policy),
    None for the context's. dropout_fn: (x, p) ↦ dropped x where F.dropout's own mask would be wrong (a
    row-parallel layer's input slice takes its slice of the full input's mask: tensor_parallel.sliced_dropout).
    reduce: for rescale_one on a row-parallel layer's input slice, the sum over the shards of a rank's partial
    product (x_d·Wᵀ, x·Aᵀ), after which the update is computed alike on every rank.
    norm_axis: "out" (gain per output row, PEFT) or "in" (gain per input column; norm: input_norm)."""
    lora_A: Tensor
    lora_B: Tensor
    magnitude: Tensor | None
    scaling: float
    dropout: float
    norm: Tensor | None = None
    activation_memory: str | None = None
    dropout_fn: Callable[[Tensor, float], Tensor] | None = None
    reduce: Callable[[Tensor], Tensor] | None = None
    norm_axis: str = "out"


# ------------------------------------------------------------------------------------------ norm and magnitude
def weight_norm(base: Tensor | nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per output row, fused (never the [out, in] sum), float32 (float64 for float64 inputs). base: the
    dense [out, in] weight (a view of the layer's), or a bitsandbytes layer, read from its packed weight
    (dora_ext.quantized). lora_A [r, in], lora_B [out, r]. A base weight sharded by tensor parallelism (a DTensor):
    the norm of the full rows on every rank (tensor_parallel.weight_norm)."""
    if tensor_parallel.is_sharded(base):
        return tensor_parallel.weight_norm(base, lora_A, lora_B, scaling, ops.weight_norm, "dora_ext.weight_norm")
    if isinstance(base, Tensor):
        return ops.weight_norm(base, lora_A, lora_B, scaling)
    return quantized.weight_norm(base, lora_A, lora_B, scaling)


def norm_key(base: Tensor | nn.Module) -> Sequence[Tensor]:
    """The tensors weight_norm(base, ...) reads of the base (the eval norm cache keys on them, with A and B)."""
    return (base,) if isinstance(base, Tensor) else quantized.storage(base)


@torch.no_grad()
def init_magnitude(norm: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """DoRA's magnitude at init, m = ‖W + s·B·A‖_row, as the layer stores it (shape, dtype). `norm` is the norm the
    forward computes (weight_norm), so an untrained adapter has g = 1 exactly and returns the base output bit for
    bit, as PEFT's own init does with its own norm."""
    return norm.detach().reshape(shape).to(dtype)


def input_axis_blocks(weight: Tensor, lora_A: Tensor, lora_B: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor] | tuple[tuple[Tensor, ...], ...]:
    """The operands (W, A, B) of the fused row ops (weight_norm, merge_, unmerge_) whose rows are the *input
    columns* of W + s·B·A, as views of the given tensors (merging writes through them; nothing [out, in] is built):
    (W + s·B·A)ᵀ = Wᵀ + s·Aᵀ·Bᵀ, so a linear weight [out, in] gives (Wᵀ, Bᵀ, Aᵀ). A convolution's weight
    [out, C_in, k…] with lora_A [r, C_in, k…] gives one such triple per kernel tap t, as three tuples
    ((W[:, :, t]ᵀ, …), (Bᵀ, …), (A[:, :, t]ᵀ, …)): a channel's norm over (out, k…) is the root of its taps' summed
    squares and merging scales every tap's column by the same gain. lora_B: [out, r]."""
    if weight.dim() == 2:
        return weight.T, lora_B.T, lora_A.T
    taps = [(slice(None), slice(None), *t) for t in itertools.product(*map(range, weight.shape[2:]))]
    return tuple(weight[t].T for t in taps), (lora_B.T,) * len(taps), tuple(lora_A[t].T for t in taps)


def input_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖W + s·B·A‖ per input column (a convolution: per input channel, over (out, k…)) → [in], float32 (float64
    for float64 inputs), detached: the fused row norm over input_axis_blocks' views, never the [out, in] sum.
    For a k×k kernel that is k² fused passes over strided [C_in, out] views, summed in squares (non-negative
    terms: no cancellation), chosen over a dense fp32 ΔW (LyCORIS's way) and over the factored
    ‖W_c‖² + 2s⟨W_c, ΔW_c⟩ + s²‖ΔW_c‖², which loses every digit where W + s·ΔW nearly cancels (measured)."""
    W, A, B = input_axis_blocks(weight, lora_A, lora_B)
    if isinstance(W, Tensor):
        return ops.weight_norm(W, A, B, scaling)
    squares = [ops.weight_norm(w, a, b, scaling).square() for w, a, b in zip(W, A, B)]
    return torch.stack(squares).sum(0).sqrt()


def decomposed_gain(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, magnitude: Tensor, *,
                    axis: str, eps: float, multiplier: float = 1.0) -> Tensor:
    """LyCORIS's DoRA gain (lycoris/functional/general.py _weight_decompose, on the weight W + s·B·A its LoCon
    forward builds): G = μ·(m / (‖W + s·B·A‖ + ε) − 1) + 1, so W_eff = (W + s·B·A)·G, one gain per output row
    (axis "out") or per input column (axis "in"; a convolution: per input channel, the norm over (out, k…)).
    Unlike DoRA's g (_gain) the norm is *not* a constant here: G is differentiable with respect to lora_A and
    lora_B through it (the fused norm, with the gradient differentiable_norm.with_gradient gives it: LyCORIS's),
    and to m.
    ε is added to the norm, not a clamp (LyCORIS: finfo(dora_scale.dtype).eps); μ (the multiplier) interpolates
    the gain only, so μ = 0 leaves W + s·B·A. weight [out, in] or [out, C_in, k…]; lora_A [r, in] or
    [r, C_in, k…]; lora_B [out, r] or [out, r, 1…]; magnitude: out (or in) elements, any shape.
    Returns the flat gain [out] (or [in]) in float32 (float64 for float64 inputs)."""
    B = lora_B.reshape(lora_B.shape[0], -1)
    W2d, A2d = weight.reshape(weight.shape[0], -1), lora_A.reshape(lora_A.shape[0], -1)
    if axis == "out":
        norm = with_gradient(weight_norm(W2d, A2d, B, scaling), W2d, A2d, B, scaling, axis="row")
    elif axis == "in":  # an input channel's columns are its k… taps, consecutive in W.reshape(out, -1)
        norm = with_gradient(input_norm(weight, lora_A, B, scaling), W2d, A2d, B, scaling, axis="column",
                             group=W2d.shape[1] // weight.shape[1])
    else:
        raise ValueError(f"dora_ext.functional.decomposed_gain: expected axis 'out' or 'in', got {axis!r}")
    gain = magnitude.reshape(-1).to(norm.dtype) / (norm + eps)
    if multiplier != 1:  # (as LyCORIS: at μ = 1 the interpolation is skipped, not computed)
        gain = multiplier * (gain - 1) + 1
    return gain


def _gain(a: Adapter) -> Tensor:
    # Same clamp as the fused kernels: an all-zero row gets a finite gain, not PEFT's NaN.
    return a.magnitude.reshape(-1) / a.norm.clamp_min(NORM_EPS).to(a.magnitude.dtype)


def _dropped(x: Tensor, a: Adapter, training: bool) -> Tensor | None:
    if not (training and a.dropout > 0):
        return None
    return F.dropout(x, a.dropout, training=True) if a.dropout_fn is None else a.dropout_fn(x, a.dropout)


def _lora_input(x: Tensor, a: Adapter, training: bool) -> tuple[Tensor, Tensor | None]:
    """(x in the adapter's dtype, its dropout when training with p > 0, else None)."""
    xa = x.to(a.lora_A.dtype)
    return xa, _dropped(xa, a, training)


def layer_product(layer: nn.Module) -> Callable[[Tensor], Tensor]:
    """x ↦ x Wᵀ without bias through the layer's own forward (a bitsandbytes layer: its own kernel, no dense W)."""
    bias = layer.bias

    def product(x: Tensor) -> Tensor:
        out = layer(x)
        return out if bias is None else out - bias.to(out.dtype)

    return product


# ------------------------------------------------------------------------------------------------------- linear
def linear(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[Adapter], training: bool) -> Tensor:
    """Adapters over a frozen linear map. weight: [out, in] (a transposed view for fan_in_fan_out layers).
    A DoRA adapter first in line runs the fused op (base product included); every other adapter is rescale_one
    over the running output. The output is cast back once, to the base output's dtype (PEFT's Linear).
    A weight sharded by tensor parallelism (a DTensor): this same function over the rank-local tensors, with the
    collectives tensor_parallel.linear adds (x and the result are then rank-local, as the TP styles have them)."""
    if adapters[0].norm_axis == "in":
        return linear_in(x, weight, bias, _only(adapters, "dora_ext.functional.linear"))
    if tensor_parallel.is_sharded(weight):
        return tensor_parallel.linear(x, weight, bias, adapters, training, linear,
                                      lambda a: weight_norm(weight, a.lora_A, a.lora_B, a.scaling),
                                      "dora_ext.functional.linear")
    first, rest = adapters[0], adapters[1:]
    if first.magnitude is not None:
        result = ops.dora_linear(x, weight, bias, first.lora_A, first.lora_B, first.magnitude, first.scaling,
                                 x_drop=_dropped(x, first, training), weight_norm=first.norm,
                                 activation_memory=first.activation_memory)
    else:
        result, rest = F.linear(x, weight, bias), adapters
    out_dtype = result.dtype
    for a in rest:
        if a.magnitude is not None and a.norm is None:
            a = a._replace(norm=weight_norm(weight, a.lora_A, a.lora_B, a.scaling))
        result = rescale_one(x, result, a, bias, training, weight=weight)
    return result.to(out_dtype)


def _only(adapters: Sequence[Adapter], what: str) -> Adapter:
    if len(adapters) != 1:
        raise ValueError(f"{what}: an input-axis adapter (norm_axis='in') runs alone, got "
                         f"{len(adapters)} active adapters with axes {[a.norm_axis for a in adapters]}")
    return adapters[0]


def _scaled_input(x: Tensor, a: Adapter, spatial: int) -> Tensor:
    """g ⊙ x in the adapter's dtype, g per input feature (the last dim of x; `spatial` > 0: per channel, the dim
    before the spatial ones, batched or not)."""
    g = _gain(a).reshape((-1,) + (1,) * spatial)
    return x.to(a.lora_A.dtype) * g


def linear_in(x: Tensor, weight: Tensor, bias: Tensor | None, a: Adapter) -> Tensor:
    """An input-axis DoRA adapter over a frozen linear map: y = W(g ⊙ x) + s·B·A(g ⊙ x) + b, g = m / ‖W + s·B·A‖_col
    (a.norm: input_norm), i.e. x through W_eff = (W + s·B·A)·diag(g), LyCORIS's DoRA with wd_on_out=False at
    multiplier 1. No dropout (LyCORIS ignores it on its DoRA path; layers refuse p > 0). Output in the base
    product's dtype (x's, or the autocast dtype)."""
    if a.norm is None:
        a = a._replace(norm=input_norm(weight, a.lora_A, a.lora_B, a.scaling))
    xg = _scaled_input(x, a, 0)
    base = F.linear(xg.to(x.dtype), weight, bias)
    lora = F.linear(F.linear(xg, a.lora_A), a.lora_B) * a.scaling
    return (base + lora).to(base.dtype)


def conv_in(x: Tensor, base: Callable[[Tensor], Tensor], a: Adapter, spec: "ConvSpec") -> Tensor:
    """An input-axis DoRA adapter over a frozen conv: base(g ⊙ x) + s·B(A(g ⊙ x)), g per input channel
    (norm over (out, k…): input_norm), = conv(x, W_eff) + b with W_eff = (W + s·B·A)·g[c] (zero padding, or any
    per-channel padding mode of the base layer, commutes with a channel scale). base: the base layer itself
    (bias and padding mode its own); lora_A / lora_B as in conv_one. No dropout, as linear_in."""
    xg = _scaled_input(x, a, a.lora_A.dim() - 2)
    result = base(xg.to(x.dtype))
    u = spec.conv_fn(xg, a.lora_A, None, spec.stride, spec.padding)
    lora = spec.conv_fn(u, a.lora_B, None, 1, 0, 1, spec.groups) * a.scaling
    return (result + lora).to(result.dtype)


def rescale(x: Tensor, result: Tensor, bias: Tensor | None, adapters: Sequence[Adapter], training: bool,
            base_of: Callable[[Tensor], Tensor]) -> Tensor:
    """Adapters over a base output computed elsewhere, result = base(x) + bias (a quantized layer's own kernel;
    base_of: its product without bias, layer_product), each by rescale_one, cast back to result's dtype after each
    adapter as PEFT's bitsandbytes layers do."""
    out_dtype = result.dtype
    for i, a in enumerate(adapters):
        result = rescale_one(x, result, a, bias, training, base_of=base_of, first=i == 0).to(out_dtype)
    return result


def rescale_one(x: Tensor, result: Tensor, a: Adapter, bias: Tensor | None, training: bool, *,
                weight: Tensor | None = None, base_of: Callable[[Tensor], Tensor] | None = None,
                first: bool = False) -> Tensor:
    """One adapter's update of `result`, the running output of a linear-kind layer (its base output x Wᵀ + bias,
    plus the updates of the adapters before this one). DoRA: one ops.dora_rescale, PEFT's composition:
    multiplicative, or with dropout additive with W·x_d (no bias) computed again; plain LoRA (magnitude None):
    result + s·B·A·x_d. The base: `weight`, the dense [out, in] weight, or `base_of`, x ↦ x Wᵀ without bias by the
    base layer's own product (layer_product). first: no adapter came before, so result − bias is x Wᵀ; without
    dropout and bias the magnitude gradient then comes from the output (no [T, out] kept) and backward recomputes
    acc from x where it must (ops.dora_rescale). Returns promote(result dtype, adapter dtype)."""
    if tensor_parallel.is_sharded(weight):
        return tensor_parallel.rescale_one(x, result, a, bias, training, weight, first, rescale_one,
                                           "dora_ext.functional.rescale_one")
    reduce = a.reduce or (lambda t: t)
    xa, x_drop = _lora_input(x, a, training)
    u = reduce(F.linear(xa if x_drop is None else x_drop, a.lora_A))
    if a.magnitude is None:  # plain LoRA
        return result + F.linear(u, a.lora_B) * a.scaling
    dtype = torch.promote_types(result.dtype, a.lora_A.dtype)
    if x_drop is not None:
        base = reduce(F.linear(x_drop, weight.to(x_drop.dtype)) if weight is not None else base_of(x_drop))
        kept = {"base": base.to(dtype)}
    elif bias is not None:
        kept = {"bias": bias.to(dtype)}
    elif first:
        kept = {"x": x, "weight": weight} if weight is not None else {"x": x, "base_fn": lambda: base_of(x)}
    else:
        kept = {}
    return ops.dora_rescale(result.to(dtype), u.to(dtype), a.lora_B, a.magnitude, a.norm, a.scaling,
                            activation_memory=a.activation_memory, **kept)


# --------------------------------------------------------------------------------------------------------- conv
class ConvSpec(NamedTuple):
    """What the forward needs of the base conv: F.conv{1,2,3}d and its hyper-parameters."""
    conv_fn: Callable
    stride: tuple
    padding: object
    dilation: tuple
    groups: int


_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the weight's dim


def conv_spec(base: nn.Module) -> ConvSpec:
    """The ConvSpec of an nn.Conv1d/2d/3d."""
    return ConvSpec(_CONV_FN[base.weight.dim()], base.stride, base.padding, base.dilation, base.groups)


def conv(x: Tensor, base_out: Tensor, weight: Tensor, bias: Tensor | None, spec: ConvSpec,
         adapters: Sequence[Adapter], training: bool) -> Tensor:
    """Adapters over a frozen conv (conv_one each), base_out: the base layer's output (bias included); the output
    is cast back once, to base_out's dtype (PEFT's Conv forward)."""
    result = base_out
    for a in adapters:
        result = conv_one(x, result, a, bias, weight, spec, training)
    return result.to(base_out.dtype)


def conv_one(x: Tensor, result: Tensor, a: Adapter, bias: Tensor | None, weight: Tensor, spec: ConvSpec,
             training: bool) -> Tensor:
    """One DoRA adapter's update of a conv's running output (PEFT _DoraConvNdLayer), plain ATen:
    result + (g−1) ⊙ base + g ⊙ s·B(A(x_d)), base = result − bias without dropout (multiplicative composition), or
    W * x_d without bias with it (additive). lora_A: [r, C_in, k…] applied with the base kernel, stride and padding
    (not dilation, as PEFT); lora_B: [C_out, r/groups, 1…] with the base groups. Gain per output channel."""
    xa, x_drop = _lora_input(x, a, training)
    u = spec.conv_fn(xa if x_drop is None else x_drop, a.lora_A, None, spec.stride, spec.padding)
    lora = spec.conv_fn(u, a.lora_B, None, 1, 0, 1, spec.groups)
    view = (1, -1) + (1,) * (result.dim() - 2)
    g = _gain(a).reshape(view)
    if x_drop is not None:
        base = spec.conv_fn(x_drop, weight.to(x_drop.dtype), None, spec.stride, spec.padding, spec.dilation,
                            spec.groups)
    else:
        base = result if bias is None else result - bias.reshape(view)
    return result + ((g - 1) * base + g * lora * a.scaling)


# ---------------------------------------------------------------------------------------------------- embedding
def embedding(ids: Tensor, base_out: Tensor, embed: Callable[[Tensor, Tensor], Tensor], embed_scale: Tensor | None,
              adapters: Sequence[Adapter]) -> Tensor:
    """Adapters over a frozen embedding (embedding_one each); the output is cast back once, to base_out's dtype
    (PEFT's Embedding forward)."""
    result = base_out
    for a in adapters:
        result = embedding_one(ids, result, a, embed, embed_scale)
    return result.to(base_out.dtype)


def embedding_one(ids: Tensor, result: Tensor, a: Adapter, embed: Callable[[Tensor, Tensor], Tensor],
                  embed_scale: Tensor | None) -> Tensor:
    """One DoRA adapter's update of an embedding's running output (PEFT DoraEmbeddingLayer): lora_A [r, vocab],
    lora_B [dim, r]; the norm runs over the vocabulary, one gain per embedding dim; no dropout.
    y = g ⊙ result + g ⊙ s·(A_ᵀ[ids] Bᵀ)·embed_scale; embed(ids, table): the base layer's lookup."""
    g = _gain(a)
    lora = g * (embed(ids, a.lora_A.T) @ a.lora_B.T) * a.scaling
    if embed_scale is not None:  # after the norm, as PEFT (huggingface/peft#2839)
        lora = lora * embed_scale.to(lora.dtype)
    return g * result + lora
