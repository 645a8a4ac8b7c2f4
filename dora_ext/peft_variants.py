"""dora_ext inside PEFT's own LoRA layers: fused DoRA arithmetic as PEFT 0.21 LoRA variants.

PEFT 0.21 computes every LoRA variant through one small interface (`peft.tuners.lora.layer.LoraVariant`): a layer
resolves each adapter's variant once (`LoraLayer.resolve_lora_variant`, from the layer class's `lora_variants` table,
`("use_dora",) → DoraLinearVariant` for Linear/Conv1D, `DoraEmbeddingVariant`, `DoraConv{1,2,3}dVariant`; the
bitsandbytes, HQQ and GPTQ layers override the method and return `DoraLinearVariant()` themselves) and then calls
`variant.forward(module, active_adapter, x, result)` with `result = base_layer(x)` already computed, from the plain
forward and from `_mixed_batch_forward` alike.

The variants here subclass PEFT's DoRA variants and replace `forward` and the merge (`merge_safe`, `merge_unsafe`,
`unmerge`): the same parameters, the same `lora_magnitude_vector` modules, PEFT's init; the merge is dora_ext's own
layers' one (layer_state.MergeLedger: in place, no dense ΔW, rows of zero gain restored exactly on unmerge) under
PEFT's layer-level merge (its warnings, NaN check, bias); the per-step work is fused: the weight norm is
`ops.weight_norm` (one streaming pass over W, no [out, in] ΔW and no copy of W, which is what makes PEFT's DoRA slow
and large), and for Linear/Conv1D the whole DoRA update of `result` is one op (`ops.dora_rescale`: one elementwise pass forward, one fused reduction backward). Because the
layers stay PEFT's, every PeftModel method (add/load/set/delete adapters, merging, saving, `adapter_names`
batches, FSDP wrapping) sees exactly the objects it expects.

Each variant's forward only maps PEFT's storage of one adapter onto dora_ext.functional (`rescale_one`, `conv_one`,
`embedding_one`: the formulas dora_ext's own layers run too, with the same dtype rule); the norm and its eval cache
(`layer_state.adapter_norm`) and the magnitude at init (`functional.init_magnitude`) are the own layers' as well.

How PEFT's layers get these variants (from_peft, patch_peft) is peft_patching.py; the private PEFT names used
here go through peft_private.py, pinned to the PEFT versions tested (`PEFT_TESTED`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import Tensor, nn

from . import functional, quantized, tensor_parallel
from .activation_policy import DEFAULT_MODE
from .layer_state import MergeLedger, adapter_norm
from .peft_private import peft_modules

__all__ = ["is_fused", "fused_variant", "fused_variant_classes"]

#: A PEFT layer's activation-memory mode (what the fused ops keep for backward: activation_policy), in its instance
#: __dict__: from_peft's choice for its model, or patch_peft's for the layers created while it was on.
MODE_ATTR = "_dora_ext_activation_memory"


def mode_of(module: nn.Module) -> str | None:
    return module.__dict__.get(MODE_ATTR, DEFAULT_MODE)


# ------------------------------------------------------------------------------------------------ the norm
#: the slot of the fused norm in PEFT's per-adapter DoRA cache (its own slots are "weight-norm-<adapter>" and
#: "lora-weight-<adapter>"; a name of our own, so PEFT's code, if it runs for this adapter, never reads our entry)
_NORM_SLOT = "dora_ext-weight-norm-{}"


def _norm(module: nn.Module, adapter: str, base, A2d: Tensor, B2d: Tensor) -> Tensor:
    """The norm of `adapter` for a forward (layer_state.adapter_norm, as dora_ext's own layers get theirs); base,
    A2d, B2d: the layer's storage as functional.weight_norm takes it (the variant's 2-D views, or a bitsandbytes
    layer itself: FusedDoraLinearVariant._norm_args). Kept as PEFT keeps
    DoRA's: in the adapter's `lora_magnitude_vector[adapter]._dora_cache` (outside the state_dict), only in eval
    while PEFT's DoraCaching (or dora_ext.norm_caching) is on; a forward without caching empties it, and train()
    clears it (PEFT's own DoraLinearLayer.train). Unlike PEFT's, an entry is one [out] vector (no dense B·A) and is
    keyed on the tensors' versions, so in-place updates refresh it."""
    slots = getattr(module.lora_magnitude_vector[adapter], "_dora_cache", None)
    if slots is None:  # not PEFT's DoRA module: a dict of our own on the layer
        slots = module.__dict__.setdefault("_dora_ext_norms", {})
    return adapter_norm(slots, _NORM_SLOT.format(adapter), base, A2d, B2d, module.scaling[adapter], module.training)


def linear_norm(module: nn.Module, adapter: str, base_layer: nn.Module | None = None) -> Tensor:
    """The norm of fused DoRA adapter `adapter` of a linear-kind PEFT layer (nn.Linear, Conv1D, or a bitsandbytes
    base, read from its packed weight), as its forward gets it (_norm). base_layer: module.get_base_layer(), where
    the caller has it."""
    if base_layer is None:
        base_layer = module.get_base_layer()
    return _norm(module, adapter, *type(module.lora_variant[adapter])._norm_args(module, adapter, base_layer))


@torch.no_grad()
def _set_magnitude(module: nn.Module, adapter: str, base, A2d: Tensor, B2d: Tensor) -> None:
    """The magnitude of `adapter` from the fused norm of (base, A2d, B2d), as dora_ext's own layers init theirs
    (functional.init_magnitude), written into the Parameter PEFT's init created."""
    magnitude = module.lora_magnitude_vector[adapter].weight
    norm = functional.weight_norm(base, A2d, B2d, module.scaling[adapter])
    magnitude.copy_(functional.init_magnitude(norm, magnitude.shape, magnitude.dtype))


def _dropout_p(module: nn.Module, adapter: str) -> float:
    """The dropout PEFT applies to adapter `adapter`'s input: lora_dropout's p in training, none in eval."""
    return float(getattr(module.lora_dropout[adapter], "p", 0.0)) if module.training else 0.0


def _adapter(module: nn.Module, adapter: str, A: Tensor, B: Tensor, norm: Tensor, p: float) -> functional.Adapter:
    """PEFT's storage of DoRA adapter `adapter` as functional's formulas take it (A, B as the forward applies them)."""
    return functional.Adapter(A, B, module.lora_magnitude_vector[adapter].weight, module.scaling[adapter], p, norm,
                              mode_of(module))


# ------------------------------------------------------------------------------------------------ merging
#: A PEFT layer's merge records (layer_state.MergeLedger: the unmerged norm and the rows a zero gain wipes, per
#: merged adapter), in its instance __dict__: outside the state_dict like PEFT's own `_caches`, and carried by
#: deepcopy and pickling with the layer.
LEDGER_ATTR = "_dora_ext_merges"

#: where PEFT's own DoRA merge keeps the unmerged norm (DoraLinearVariant.merge_unsafe's `_cache_store` key)
_PEFT_NORM_KEY = "{}-weight_norm"


def _ledger(module: nn.Module) -> MergeLedger:
    return module.__dict__.setdefault(LEDGER_ATTR, MergeLedger())


@contextlib.contextmanager
def _unmerged_weight(module: nn.Module, weight: Tensor, safe_merge: bool):
    """The layer's base weight without the adapters already merged into it (the norm of a merge is the unmerged
    weight's, as the forward computes it: PEFT 0.21). `weight` itself when none is merged, no copy; else PEFT's own
    replay (`_unmerged_base_weight`: unmerge them all, copy, merge them again), because the merged adapters may be
    of any kind PEFT has, and so the replay's merges, unmerges and warnings are the ones PEFT's merge makes."""
    if not module.merged_adapters:
        yield weight
        return
    with module._unmerged_base_weight(safe_merge=safe_merge) as base:
        yield base


@torch.no_grad()
def merge_fused(module: nn.Module, adapter: str, weight: Tensor, views, safe_merge: bool) -> Tensor:
    """PEFT's DoRA merge of `adapter` into `weight`, in place through layer_state.MergeLedger (the merge of
    dora_ext's own layers): W ← g ⊙ (W + s·B·A), g = m / ‖W₀ + s·B·A‖ with W₀ the unmerged weight, no dense ΔW; the
    record unmerge_fused needs goes to the layer's ledger. `weight`: the layer's weight (merge_unsafe), or the copy
    or dequantized weight PEFT's merge hands merge_safe. views(module, adapter, W) → (W [out, in], A [r, in],
    B [out, r]), 2-D views sharing W's storage. Returns `weight`."""
    scaling = module.scaling[adapter]
    replayed = bool(module.merged_adapters)
    with _unmerged_weight(module, weight, safe_merge) as base:
        norm = functional.weight_norm(*views(module, adapter, base), scaling)  # the forward's norm
    base_weight = module.get_base_layer().weight
    if replayed and weight is not base_weight:
        from peft.utils.integrations import dequantize_module_weight  # peft is optional: dora_ext imports without

        # the replay rebuilt the layer's weight, which in low precision differs from the copy made before it:
        # carry on from the rebuilt one, as PEFT's merge_safe does
        weight.copy_(dequantize_module_weight(module.get_base_layer()))
    _ledger(module).merge_(adapter, *views(module, adapter, weight), module.lora_magnitude_vector[adapter].weight,
                           norm, scaling)
    return weight


@torch.no_grad()
def unmerge_fused(module: nn.Module, adapter: str, weight: Tensor, views) -> Tensor:
    """The inverse of merge_fused, in place on `weight` (the layer's weight, or PEFT's dequantized one), with the
    norm kept at merge time; rows a zero gain wiped come back exactly. Returns `weight` (PEFT assigns the result)."""
    ledger = _ledger(module)
    if adapter not in ledger:  # merged by PEFT's own DoRA variant, before from_peft: PEFT kept only the norm
        try:
            ledger.adopt(adapter, module._cache_pop(_PEFT_NORM_KEY.format(adapter)))
        except KeyError:
            raise RuntimeError(f"dora_ext: unmerge of adapter {adapter!r} of {type(module).__qualname__}: expected "
                               f"the record of its merge (dora_ext's or PEFT's norm), found none") from None
    ledger.unmerge_(adapter, *views(module, adapter, weight), module.lora_magnitude_vector[adapter].weight,
                    module.scaling[adapter])
    return weight.detach()


class _FusedMerge:
    """merge_safe / merge_unsafe / unmerge of a fused variant, mixed in before PEFT's DoRA variant class: the fused
    merge (merge_fused, unmerge_fused) where _merges_fused says so, PEFT's own (the next class) otherwise. PEFT's
    layer-level merge and unmerge call these; its warnings, safe_merge's NaN check, the bias and the bookkeeping of
    merged adapters stay PEFT's."""

    @staticmethod
    def _merge_views(module, adapter, weight):
        """(W [out, in], A [r, in], B [out, r]) of `weight` and the adapter: 2-D views, W's sharing its storage."""
        raise NotImplementedError

    @classmethod
    def _merges_fused(cls, module, adapter, weight) -> bool:
        """Whether the fused merge applies: the adapter on the weight's device (PEFT's ephemeral GPU offload keeps
        PEFT's merge, which moves tensors as it goes)."""
        _, A, B = cls._merge_views(module, adapter, weight)
        return A.device == B.device == module.lora_magnitude_vector[adapter].weight.device == weight.device

    @classmethod
    def merge_safe(cls, module, active_adapter, orig_weight):
        if not cls._merges_fused(module, active_adapter, orig_weight):
            return super().merge_safe(module, active_adapter, orig_weight)
        return merge_fused(module, active_adapter, orig_weight, cls._merge_views, safe_merge=True)

    @classmethod
    def merge_unsafe(cls, module, active_adapter, orig_weight):
        if not cls._merges_fused(module, active_adapter, orig_weight):
            return super().merge_unsafe(module, active_adapter, orig_weight)
        merge_fused(module, active_adapter, orig_weight, cls._merge_views, safe_merge=False)

    @classmethod
    def unmerge(cls, module, active_adapter, orig_weight):
        if not cls._merges_fused(module, active_adapter, orig_weight):
            return super().unmerge(module, active_adapter, orig_weight)
        return unmerge_fused(module, active_adapter, orig_weight, cls._merge_views)


# --------------------------------------------------------------------------------------------- the variants
def fused_variant_classes():
    """(fused Linear, Embedding, Conv variants), defined on first use so importing dora_ext needs no PEFT."""
    if _VARIANTS:
        return _VARIANTS
    _, pv = peft_modules()
    from peft.utils.other import transpose

    class FusedDoraLinearVariant(_FusedMerge, pv.DoraLinearVariant):
        """PEFT's DoraLinearVariant (nn.Linear, transformers Conv1D, and the quantized layers that dequantize)
        with a fused forward: y = g ⊙ (result − b + s·(x Aᵀ) Bᵀ) + b, or PEFT's dropout form; and the fused
        merge (_FusedMerge; a bitsandbytes layer hands it PEFT's dequantized weight)."""

        @classmethod
        def init(cls, module, adapter_name, **kwargs):
            base_layer = module.get_base_layer()
            quantized.kind(base_layer)  # refuses quantized layers it cannot read (HQQ, GPTQ, torchao, ...) first
            if tensor_parallel.is_sharded(base_layer.weight):
                return cls._init_sharded(module, adapter_name, base_layer)
            pv.DoraLinearVariant.init(module, adapter_name, **kwargs)
            _set_magnitude(module, adapter_name, *cls._norm_args(module, adapter_name, base_layer))

        @classmethod
        def _init_sharded(cls, module, adapter, base_layer):
            """PEFT's DoRA init on a tensor-parallel base (a DTensor weight, where PEFT's own norm fails mixing
            tensors): the factors made whole on every rank (tensor_parallel.whole_factors), the magnitude the
            full rows' norm, whole too, in PEFT's DoraLinearLayer."""
            w2d = cls._merge_views(module, adapter, base_layer.weight)[0]
            tensor_parallel.whole_factors(module.lora_A[adapter], module.lora_B[adapter], w2d,
                                          f"dora_ext: PEFT layer adapter {adapter!r}")
            if not module.lora_magnitude_vector:  # as PEFT's init: the magnitude becomes an adapter tensor
                module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            norm = functional.weight_norm(w2d, A, B, module.scaling[adapter]).full_tensor()
            dora_layer = pv.DoraLinearLayer(fan_in_fan_out=getattr(module, "fan_in_fan_out", False))
            dora_layer.weight = nn.Parameter(functional.init_magnitude(norm, norm.shape, A.dtype))
            module.lora_magnitude_vector[adapter] = dora_layer

        @classmethod
        def _norm_args(cls, module, adapter, base_layer):
            """(base, A, B) as functional.weight_norm takes them: a bitsandbytes layer itself (its packed weight),
            else the merge's 2-D views of the weight."""
            if quantized.kind(base_layer):
                return base_layer, module.lora_A[adapter].weight, module.lora_B[adapter].weight
            return cls._merge_views(module, adapter, base_layer.weight)

        @staticmethod
        def _merge_views(module, adapter, weight):  # Conv1D stores W as [in, out] (fan_in_fan_out)
            return transpose(weight, module.fan_in_fan_out), module.lora_A[adapter].weight, \
                module.lora_B[adapter].weight

        @classmethod
        def forward(cls, module, active_adapter, x, result, **kwargs):
            a = active_adapter
            if module.lora_bias.get(a, False) or module.ephemeral_gpu_offload or \
                    module.lora_B[a].weight.device != result.device:
                # lora_B with a bias, or offloaded adapters: PEFT's own arithmetic. (A base bias that requires grad,
                # trainable or FSDP(use_orig_params=True)'s view of a flat parameter, stays fused: the op's backward
                # gives its gradient.)
                return pv.DoraLinearVariant.forward(module, a, x, result, **kwargs)
            base_layer = module.get_base_layer()
            base, A, B = cls._norm_args(module, a, base_layer)
            adapter = _adapter(module, a, A, B, _norm(module, a, base, A, B), _dropout_p(module, a))
            bias = getattr(base_layer, "bias", None)
            first = bias is None and _result_is_base_output(module, a)
            if isinstance(base, Tensor):  # dense: W·x_d and the recompute of acc from the weight
                return functional.rescale_one(x, result, adapter, bias, module.training, weight=base, first=first)
            # bitsandbytes: W·x_d and the recompute by its own product (PEFT dequantizes the whole W for W·x_d)
            return functional.rescale_one(x, result, adapter, bias, module.training,
                                          base_of=functional.layer_product(base), first=first)

    def _result_is_base_output(module, a) -> bool:
        """Whether the `result` adapter a's variant receives is still the base layer's output (result − bias = x Wᵀ,
        what a recompute of acc rebuilds): a is the layer's first active adapter, as PEFT adds each active adapter's
        update to result in turn. Otherwise the op keeps acc."""
        return next((n for n in module.active_adapters if n in module.lora_A), None) == a

    class FusedDoraEmbeddingVariant(_FusedMerge, pv.DoraEmbeddingVariant):
        """PEFT's DoraEmbeddingVariant with the fused norm (over the vocabulary, one gain per embedding dim) and
        the fused merge (_FusedMerge)."""

        @staticmethod
        def _merge_views(module, adapter, weight):  # [dim, vocab]: the norm runs over the vocabulary
            return weight.T, module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]

        @classmethod
        def init(cls, module, adapter_name, **kwargs):
            pv.DoraEmbeddingVariant.init(module, adapter_name, **kwargs)
            _set_magnitude(module, adapter_name, *cls._merge_views(module, adapter_name,
                                                                   module.get_base_layer().weight))

        @classmethod
        def forward(cls, module, active_adapter, x, result, **kwargs):
            a = active_adapter
            weight, A, B = cls._merge_views(module, a, module.get_base_layer().weight)  # [r, vocab], [dim, r]
            adapter = _adapter(module, a, A, B, _norm(module, a, weight, A, B), 0.0)  # PEFT: no dropout here
            return functional.embedding_one(x, result, adapter, module._embed, module._get_embed_scale())

    class FusedDoraConvNdVariant(_FusedMerge, pv._DoraConvNdVariant):
        """PEFT's DoRA conv variant with the fused norm per output channel and the fused merge (_FusedMerge)
        (groups = 1; grouped convolutions keep PEFT's dense norm and merge, as the reshape of B·A to W's shape only
        holds per group there)."""

        @staticmethod
        def _merge_views(module, adapter, weight):  # [C_out, C_in·k], [r, C_in·k], [C_out, r]
            A = module.lora_A[adapter].weight
            r = A.shape[0]
            return weight.view(weight.shape[0], -1), A.reshape(r, -1), module.lora_B[adapter].weight.reshape(-1, r)

        @classmethod
        def _merges_fused(cls, module, adapter, weight):
            return module.get_base_layer().groups == 1 and super()._merges_fused(module, adapter, weight)

        @classmethod
        def init(cls, module, adapter_name, **kwargs):
            super().init(module, adapter_name, **kwargs)
            base_layer = module.get_base_layer()
            if base_layer.groups == 1:  # grouped convolutions keep PEFT's norm (see forward)
                _set_magnitude(module, adapter_name, *cls._merge_views(module, adapter_name, base_layer.weight))

        @classmethod
        def forward(cls, module, active_adapter, x, result, **kwargs):
            a = active_adapter
            base_layer = module.get_base_layer()
            if base_layer.groups > 1 or module.lora_bias.get(a, False):
                return pv._DoraConvNdVariant.forward(module, a, x, result, **kwargs)
            norm = _norm(module, a, *cls._merge_views(module, a, base_layer.weight))
            # the kernels themselves: the forward applies them as convolutions
            adapter = _adapter(module, a, module.lora_A[a].weight, module.lora_B[a].weight, norm,
                               _dropout_p(module, a))
            return functional.conv_one(x, result, adapter, base_layer.bias, base_layer.weight,
                                       functional.conv_spec(base_layer), module.training)

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
