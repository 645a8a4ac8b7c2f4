"""dora_ext inside PEFT's own LoRA layers: fused DoRA arithmetic as PEFT 0.21 LoRA variants.

PEFT 0.21 computes every LoRA variant through one small interface (`peft.tuners.lora.layer.LoraVariant`): a layer
resolves each adapter's variant once (`LoraLayer.resolve_lora_variant`, from the layer class's `lora_variants` table,
`("use_dora",) → DoraLinearVariant` for Linear/Conv1D, `DoraEmbeddingVariant`, `DoraConv{1,2,3}dVariant`; the
bitsandbytes, HQQ and GPTQ layers override the method and return `DoraLinearVariant()` themselves) and then calls
`variant.forward(module, active_adapter, x, result)` with `result = base_layer(x)` already computed, from the plain
forward and from `_mixed_batch_forward` alike.

The variants here subclass PEFT's DoRA variants and replace only `forward`: the same parameters, the same
`lora_magnitude_vector` modules, PEFT's init and PEFT's merge/unmerge (one-off, dense, bit-compatible), but the
per-step work is fused: the weight norm is `ops.weight_norm` (one streaming pass over W, no [out, in] ΔW and no
copy of W, which is what makes PEFT's DoRA slow and large), and for Linear/Conv1D the whole DoRA update of
`result` is one op (`ops.dora_rescale`: one elementwise pass forward, one fused reduction backward). Because the
layers stay PEFT's, every PeftModel method (add/load/set/delete adapters, merging, saving, `adapter_names`
batches, FSDP wrapping) sees exactly the objects it expects.

How PEFT's layers get these variants (from_peft, patch_peft) is peft_patching.py; the private PEFT names used
here go through peft_private.py, pinned to the PEFT versions tested (`PEFT_TESTED`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, quantized
from .activation_policy import DEFAULT_MODE
from .layer_state import cached_norm
from .peft_private import peft_modules

__all__ = ["is_fused", "fused_variant", "fused_variant_classes"]

#: A PEFT layer's activation-memory mode (what the fused ops keep for backward: activation_policy), in its instance
#: __dict__: from_peft's choice for its model, or patch_peft's for the layers created while it was on.
MODE_ATTR = "_dora_ext_activation_memory"


def mode_of(module: nn.Module) -> str | None:
    return module.__dict__.get(MODE_ATTR, DEFAULT_MODE)


# ------------------------------------------------------------------------------------------------ the norm
def _weight_norm(module: nn.Module, adapter: str, weight2d: Tensor, A2d: Tensor, B2d: Tensor, scaling: float):
    """‖W + s·B·A‖ per output row, fused; with caching on and in eval, reused until W, A, B or the scaling change
    (_cached_norm)."""
    return _cached_norm(module, adapter, lambda: (weight2d, A2d, B2d), scaling,
                        lambda: ops.weight_norm(weight2d, A2d, B2d, scaling))


#: the slot of the fused norm in PEFT's per-adapter DoRA cache (its own slots are "weight-norm-<adapter>" and
#: "lora-weight-<adapter>"; a name of our own, so PEFT's code, if it runs for this adapter, never reads our entry)
_NORM_SLOT = "dora_ext-weight-norm-{}"


def _cached_norm(module: nn.Module, adapter: str, key_tensors, scaling: float, compute):
    """The norm of `adapter`, cached as PEFT caches DoRA's: in the adapter's `lora_magnitude_vector[adapter]
    ._dora_cache` (outside the state_dict), only in eval while PEFT's DoraCaching (or dora_ext.norm_caching) is on;
    a forward without caching empties it, and train() clears it (PEFT's own DoraLinearLayer.train). Unlike PEFT's,
    an entry is one [out] vector (no dense B·A) and is keyed on the tensors' versions, so in-place updates refresh
    it (layer_state.cached_norm)."""
    slots = getattr(module.lora_magnitude_vector[adapter], "_dora_cache", None)
    if slots is None:  # not PEFT's DoRA module: a dict of our own on the layer
        slots = module.__dict__.setdefault("_dora_ext_norms", {})
    return cached_norm(slots, _NORM_SLOT.format(adapter), key_tensors, scaling, module.training, compute)


def linear_norm(module: nn.Module, adapter: str, base_layer: nn.Module | None = None) -> Tensor:
    """The norm of adapter `adapter` of a linear-kind PEFT layer (nn.Linear, Conv1D, or a bitsandbytes base, read
    from its packed weight: dora_ext.quantized), cached as _cached_norm says. base_layer: module.get_base_layer(),
    where the caller has it."""
    from peft.utils.other import transpose

    if base_layer is None:
        base_layer = module.get_base_layer()
    A, B, scaling = module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter]
    if quantized.kind(base_layer):
        return _cached_norm(module, adapter, lambda: (*quantized.storage(base_layer), A, B), scaling,
                            lambda: quantized.weight_norm(base_layer, A, B, scaling))
    return _weight_norm(module, adapter, transpose(base_layer.weight, module.fan_in_fan_out), A, B, scaling)


@torch.no_grad()
def _set_magnitude(module: nn.Module, adapter: str, norm: Tensor) -> None:
    magnitude = module.lora_magnitude_vector[adapter].weight
    magnitude.copy_(norm.reshape(magnitude.shape).to(magnitude.dtype))


def _dropout_active(module: nn.Module, adapter: str) -> bool:
    return module.training and not isinstance(module.lora_dropout[adapter], nn.Identity)


# --------------------------------------------------------------------------------------------- the variants
def fused_variant_classes():
    """(fused Linear, Embedding, Conv variants), defined on first use so importing dora_ext needs no PEFT."""
    if _VARIANTS:
        return _VARIANTS
    _, pv = peft_modules()
    from peft.utils.other import transpose

    class FusedDoraLinearVariant(pv.DoraLinearVariant):
        """PEFT's DoraLinearVariant (nn.Linear, transformers Conv1D, and the quantized layers that dequantize)
        with a fused forward: y = g ⊙ (result − b + s·(x Aᵀ) Bᵀ) + b, or PEFT's dropout form."""

        @staticmethod
        def init(module, adapter_name, **kwargs):
            base_layer = module.get_base_layer()
            bits = quantized.kind(base_layer)  # refuses quantized layers it cannot read (HQQ, GPTQ, torchao, ...)
            pv.DoraLinearVariant.init(module, adapter_name, **kwargs)
            # The magnitude from the same fused norm the forward computes, so an untrained adapter has g = 1
            # exactly and returns the base output bit for bit, as PEFT's own init does with its own norm.
            A, B, scaling = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight, \
                module.scaling[adapter_name]
            if bits:
                norm = quantized.weight_norm(base_layer, A, B, scaling)
            else:
                norm = ops.weight_norm(transpose(base_layer.weight, module.fan_in_fan_out), A, B, scaling)
            _set_magnitude(module, adapter_name, norm)

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            a = active_adapter
            lora_A, lora_B = module.lora_A[a], module.lora_B[a]
            base_layer = module.get_base_layer()
            bias = getattr(base_layer, "bias", None)
            if module.lora_bias.get(a, False) or module.ephemeral_gpu_offload or lora_B.weight.device != result.device:
                # lora_B with a bias, or offloaded adapters: PEFT's own arithmetic. (A base bias that requires grad,
                # trainable or FSDP(use_orig_params=True)'s view of a flat parameter, stays fused: the op's backward
                # gives its gradient.)
                return pv.DoraLinearVariant.forward(module, a, x, result, **kwargs)
            scaling = module.scaling[a]
            magnitude = module.lora_magnitude_vector[a].weight
            dtype = torch.promote_types(result.dtype, x.dtype)  # as PEFT: result + (fp32 DoRA term)
            if quantized.kind(base_layer):
                return _quantized_forward(module, a, base_layer, x, result, dtype)
            weight = transpose(base_layer.weight, module.fan_in_fan_out)  # [out, in] (a view)
            norm = _weight_norm(module, a, weight, lora_A.weight, lora_B.weight, scaling)
            if _dropout_active(module, a):
                x = module.lora_dropout[a](x)
                base = F.linear(x, weight.to(x.dtype)).to(dtype)  # W·x_d, no bias: PEFT recomputes it too
                return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm,
                                        scaling, base=base, activation_memory=mode_of(module))
            if bias is None and _result_is_base_output(module, a):  # the magnitude gradient from the output
                return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm,
                                        scaling, x=x, weight=weight, activation_memory=mode_of(module))
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    bias=None if bias is None else bias.to(dtype), activation_memory=mode_of(module))

    def _result_is_base_output(module, a) -> bool:
        """Whether the `result` adapter a's variant receives is still the base layer's output (result − bias = x Wᵀ,
        what a recompute of acc rebuilds): a is the layer's first active adapter, as PEFT adds each active adapter's
        update to result in turn. Otherwise the op keeps acc."""
        return next((n for n in module.active_adapters if n in module.lora_A), None) == a

    def _quantized_forward(module, a, base_layer, x, result, dtype):
        """A bitsandbytes base layer: the norm from the packed weight; with dropout, W·x_d is bitsandbytes' own
        product (PEFT dequantizes the whole W for it); without, result − bias as for nn.Linear, and without a bias
        the magnitude gradient comes from the output, with bitsandbytes' product of x to recompute acc."""
        lora_A, lora_B = module.lora_A[a], module.lora_B[a]
        scaling, bias = module.scaling[a], base_layer.bias
        norm = linear_norm(module, a, base_layer)
        magnitude = module.lora_magnitude_vector[a].weight
        if _dropout_active(module, a):
            x = module.lora_dropout[a](x)
            base = base_layer(x)
            base = (base if bias is None else base - bias).to(dtype)
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    base=base, activation_memory=mode_of(module))
        if bias is None and _result_is_base_output(module, a):
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    x=x, base_fn=lambda: base_layer(x), activation_memory=mode_of(module))
        return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                bias=None if bias is None else bias.to(dtype), activation_memory=mode_of(module))

    class FusedDoraEmbeddingVariant(pv.DoraEmbeddingVariant):
        """PEFT's DoraEmbeddingVariant with the fused norm (over the vocabulary, one gain per embedding dim)."""

        @staticmethod
        def init(module, adapter_name, **kwargs):
            pv.DoraEmbeddingVariant.init(module, adapter_name, **kwargs)
            _set_magnitude(module, adapter_name, ops.weight_norm(
                module.get_base_layer().weight.T, module.lora_embedding_A[adapter_name],
                module.lora_embedding_B[adapter_name], module.scaling[adapter_name]))

        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            a = active_adapter
            A, B = module.lora_embedding_A[a], module.lora_embedding_B[a]  # [r, vocab], [dim, r]
            scaling = module.scaling[a]
            norm = _weight_norm(module, a, module.get_base_layer().weight.T, A, B, scaling)
            magnitude = module.lora_magnitude_vector[a].weight
            g = magnitude / norm.clamp_min(ops.NORM_EPS).to(magnitude.dtype)
            lora = g * (module._embed(x, A.T) @ B.T) * scaling
            embed_scale = module._get_embed_scale()
            if embed_scale is not None:  # after the norm, as PEFT (huggingface/peft#2839)
                lora = lora * embed_scale.to(lora.dtype)
            return g * result + lora

    class FusedDoraConvNdVariant(pv._DoraConvNdVariant):
        """PEFT's DoRA conv variant with the fused norm per output channel (groups = 1; grouped convolutions keep
        PEFT's dense norm, as the reshape of B·A to W's shape only holds per group there)."""

        @staticmethod
        def _norm_args(module, a):
            """(W, A, B) as the fused norm takes them: [C_out, C_in·k], [r, C_in·k], [C_out, r]."""
            weight, A = module.get_base_layer().weight, module.lora_A[a].weight
            r = A.shape[0]
            return weight.view(weight.shape[0], -1), A.view(r, -1), module.lora_B[a].weight.view(-1, r)

        @classmethod
        def init(cls, module, adapter_name, **kwargs):
            super().init(module, adapter_name, **kwargs)
            if module.get_base_layer().groups == 1:  # grouped convolutions keep PEFT's norm (see forward)
                _set_magnitude(module, adapter_name, ops.weight_norm(*cls._norm_args(module, adapter_name),
                                                                     module.scaling[adapter_name]))

        @classmethod
        def forward(cls, module, active_adapter, x, result, **kwargs):
            a = active_adapter
            base_layer = module.get_base_layer()
            if base_layer.groups > 1 or module.lora_bias.get(a, False):
                return pv._DoraConvNdVariant.forward(module, a, x, result, **kwargs)
            lora_A, lora_B = module.lora_A[a], module.lora_B[a]
            weight, scaling = base_layer.weight, module.scaling[a]
            norm = _weight_norm(module, a, *cls._norm_args(module, a), scaling)
            view = (1, -1) + (1,) * (result.dim() - 2)
            magnitude = module.lora_magnitude_vector[a].weight  # [1, C_out, 1…]
            g = magnitude / norm.clamp_min(ops.NORM_EPS).to(magnitude.dtype).view(view)
            if _dropout_active(module, a):
                x = module.lora_dropout[a](x)
                base = module.lora_magnitude_vector[a].conv_fn(  # W * x_d without bias, as PEFT
                    x, weight, bias=None, stride=base_layer.stride, padding=base_layer.padding,
                    dilation=base_layer.dilation, groups=base_layer.groups)
            else:
                base = result if base_layer.bias is None else result - base_layer.bias.view(view)
            return result + (g - 1) * base + g * lora_B(lora_A(x)) * scaling

    table = {pv.DoraLinearVariant: FusedDoraLinearVariant, pv.DoraEmbeddingVariant: FusedDoraEmbeddingVariant}
    for name in ("DoraConv1dVariant", "DoraConv2dVariant", "DoraConv3dVariant"):  # PEFT's init per conv kind
        peft_cls = getattr(pv, name)
        table[peft_cls] = type("Fused" + name, (FusedDoraConvNdVariant, peft_cls), {"__module__": __name__})
    for cls in table.values():
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        setattr(sys.modules[__name__], cls.__name__, cls)  # importable by name: pickling, deepcopy
    _VARIANTS.update(table)
    return _VARIANTS


_VARIANTS: dict[type, type] = {}  # PEFT's DoRA variant class -> ours


def fused_variant(variant):
    """The fused counterpart of a PEFT variant instance (or the variant itself: LoRA, other variants, ours)."""
    cls = fused_variant_classes().get(type(variant))
    return variant if cls is None else cls()


def is_fused(layer: nn.Module, adapter: str) -> bool:
    """Whether adapter `adapter` of PEFT layer `layer` runs dora_ext's fused arithmetic."""
    return type(layer.lora_variant.get(adapter)) in set(fused_variant_classes().values())
