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

Two ways in, both reversible:
  * `convert_peft_model(model)` (what `dora_ext.from_peft` does): this model's DoRA adapters, the ones later
    added to its layers, and the layers its PEFT tuner creates later (an adapter that targets new modules) run
    fused; other models are untouched.
  * `patch_peft()` / `unpatch_peft()` (or `with peft_patched():`): every DoRA layer PEFT creates from then on is
    fused, for code that builds the PeftModel itself (`get_peft_model`, TRL's `SFTTrainer(peft_config=...)`),
    including layer classes PEFT defines later (its bitsandbytes layers are imported on first use).

Both go through one hook on PEFT's `resolve_lora_variant` (LoraLayer's and every subclass's own override, hooked
as the subclass is defined), installed only while patch_peft is on or a converted model's tuner creates a layer.

The variant API is private to PEFT ("prone to change"): it is pinned to the range tested here (`PEFT_TESTED`) and
refused outside it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, quantized
from .activation_policy import DEFAULT_MODE, check_mode
from .layer_state import cached_norm

__all__ = ["convert_peft_model", "patch_peft", "unpatch_peft", "peft_patched", "is_fused", "PEFT_TESTED"]

#: PEFT versions whose LoraVariant API this module was written against and tested with (>= first, < second).
PEFT_TESTED = ("0.21.0", "0.22.0")

#: A PEFT layer's activation-memory mode (what the fused ops keep for backward: activation_policy), in its instance
#: __dict__: from_peft's choice for its model, or patch_peft's for the layers created while it was on.
_MODE_ATTR = "_dora_ext_activation_memory"
#: patch_peft's choice, given to each layer it fuses when the layer resolves its first adapter
_PATCH_MODE: str | None = DEFAULT_MODE


def _mode_of(module: nn.Module) -> str | None:
    return module.__dict__.get(_MODE_ATTR, DEFAULT_MODE)


def _peft():
    """PEFT's lora layer and variant modules, after checking the version (the variant API is private)."""
    try:
        import peft
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora import variants as lora_variants
    except ImportError as exc:
        raise ImportError("dora_ext: the PEFT integration needs peft installed (pip install 'peft==0.21.0')") from exc
    from packaging.version import Version

    low, high = PEFT_TESTED
    if not Version(low) <= Version(peft.__version__) < Version(high):
        raise RuntimeError(f"dora_ext: the PEFT integration uses PEFT's private LoraVariant API and is tested with "
                           f"peft >= {low}, < {high}; got peft {peft.__version__}")
    return lora_layer, lora_variants


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


def _linear_norm(module: nn.Module, adapter: str, base_layer: nn.Module | None = None) -> Tensor:
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
def _variant_classes():
    """(fused Linear, Embedding, Conv variants), defined on first use so importing dora_ext needs no PEFT."""
    if _VARIANTS:
        return _VARIANTS
    lora_layer, pv = _peft()
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
                                        scaling, base=base, activation_memory=_mode_of(module))
            if bias is None and _result_is_base_output(module, a):  # the magnitude gradient from the output
                return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm,
                                        scaling, x=x, weight=weight, activation_memory=_mode_of(module))
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    bias=None if bias is None else bias.to(dtype), activation_memory=_mode_of(module))

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
        norm = _linear_norm(module, a, base_layer)
        magnitude = module.lora_magnitude_vector[a].weight
        if _dropout_active(module, a):
            x = module.lora_dropout[a](x)
            base = base_layer(x)
            base = (base if bias is None else base - bias).to(dtype)
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    base=base, activation_memory=_mode_of(module))
        if bias is None and _result_is_base_output(module, a):
            return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                    x=x, base_fn=lambda: base_layer(x), activation_memory=_mode_of(module))
        return ops.dora_rescale(result.to(dtype), lora_A(x).to(dtype), lora_B.weight, magnitude, norm, scaling,
                                bias=None if bias is None else bias.to(dtype), activation_memory=_mode_of(module))

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


def _fused(variant):
    """The fused counterpart of a PEFT variant instance (or the variant itself: LoRA, other variants, ours)."""
    cls = _variant_classes().get(type(variant))
    return variant if cls is None else cls()


def is_fused(layer: nn.Module, adapter: str) -> bool:
    """Whether adapter `adapter` of PEFT layer `layer` runs dora_ext's fused arithmetic."""
    return type(layer.lora_variant.get(adapter)) in set(_variant_classes().values())


def _serves_mixed(layer, names) -> bool:
    """Whether this converted layer runs a mixed batch of `names` itself: a linear layer (nn.Linear, Conv1D or a
    bitsandbytes base) whose named adapters are fused DoRA or plain LoRA, in eval, without the cases the fused
    variant leaves to PEFT (lora_B bias, offloading). Otherwise PEFT's own mixed-batch code (and checks) apply."""
    lora_layer, _ = _peft()
    bnb_layer = any(c.__module__ == "peft.tuners.lora.bnb" for c in type(layer).__mro__)
    if not (isinstance(layer, lora_layer.Linear) or bnb_layer):
        return False
    if layer.training or getattr(layer, "ephemeral_gpu_offload", False):
        return False
    fused = set(_variant_classes().values())
    for name in set(names):
        if name not in layer.lora_A:
            continue
        if layer.lora_bias.get(name, False):
            return False
        variant = layer.lora_variant.get(name)
        if variant is not None and type(variant) not in fused:
            return False
    return True


# ------------------------------------------------------------------------------ per model: fused layer classes
class _FusedResolve:
    """Mixin for a PEFT LoRA layer class: adapters added later (add_adapter, load_adapter, a second
    get_peft_model call) resolve to the fused variants too; and linear layers serve mixed-adapter batches
    (`adapter_names`) with DoRA adapters in them, which PEFT refuses (dora_ext.serving)."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return _fused(super().resolve_lora_variant(config=config, **kwargs))

    def _check_forward_args(self, x, *args, **kwargs):
        names = kwargs.get("adapter_names")
        if names is None or not _serves_mixed(self, names):
            return super()._check_forward_args(x, *args, **kwargs)
        # PEFT's own checks (peft/tuners/lora/layer.py LoraLayer._check_forward_args), without its DoRA refusal
        if len(x) != len(names):
            raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                             f"{len(names)} and {len(x)} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")

    def _mixed_batch_forward(self, x, *args, adapter_names, **kwargs):
        if not _serves_mixed(self, adapter_names):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        from .serving import mixed_output

        for key in ("alora_offsets",):  # PEFT's VARIANT_KWARG_KEYS: not for the base layer
            kwargs.pop(key, None)
        base_layer = self.get_base_layer()

        def adapter_of(name):
            A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            if name not in self.lora_variant:  # plain LoRA: gain 1
                return A, B, scaling, None, None
            return A, B, scaling, self.lora_magnitude_vector[name].weight, _linear_norm(self, name)

        return mixed_output(x, self.base_layer(x, *args, **kwargs), getattr(base_layer, "bias", None),
                            adapter_names, self.lora_A, adapter_of)


_FUSED_LAYER_CLASSES: dict[type, type] = {}


def _fused_layer_class(cls: type) -> type:
    if issubclass(cls, _FusedResolve):
        return cls
    if cls not in _FUSED_LAYER_CLASSES:
        name = f"Fused{cls.__name__}"
        new = type(name, (_FusedResolve, cls), {"__module__": __name__, "__qualname__": name})
        # repr stays PEFT's ("lora.Linear(...)"); the class is importable by name for pickling
        setattr(sys.modules[__name__], name, new)
        _FUSED_LAYER_CLASSES[cls] = new
    return _FUSED_LAYER_CLASSES[cls]


def _fuse_layer(layer: nn.Module, mode: str | None) -> None:
    """Give a PEFT LoRA layer the fused layer class, the activation-memory mode and its DoRA adapters the fused
    variants (a variant resolved fused already is kept: _fused maps only PEFT's DoRA classes)."""
    layer.__class__ = _fused_layer_class(type(layer))
    layer.__dict__[_MODE_ATTR] = mode
    for name, variant in list(layer.lora_variant.items()):
        layer.lora_variant[name] = _fused(variant)


class _FusedTuner:
    """Mixin for a converted model's PEFT tuner (its LoraModel): a layer it creates later, for an adapter loaded or
    added that targets a module no adapter targeted before, is fused like the converted ones. PEFT resolves the new
    layer's variants inside its constructor, before the layer can get another class, so the construction runs with
    this thread's "fuse new layers" flag on, which the resolve hook consults (_creating_fused_layers): its DoRA
    adapters get the fused variants, whose init takes the magnitude from the fused norm (as at conversion); then
    the layer gets the fused class (mixed batches, later adapters) and the model's activation-memory mode."""

    def _create_new_module(self, lora_config, adapter_name, target, **kwargs):
        with _creating_fused_layers():
            module = super()._create_new_module(lora_config, adapter_name, target, **kwargs)
        lora_layer, _ = _peft()
        mode = self.__dict__.get(_MODE_ATTR, DEFAULT_MODE)
        for layer in module.modules():
            if isinstance(layer, lora_layer.LoraLayer) and not isinstance(layer, _FusedResolve):
                _fuse_layer(layer, mode)
        return module


_FUSED_TUNER_CLASSES: dict[type, type] = {}


def _fused_tuner_class(cls: type) -> type:
    if issubclass(cls, _FusedTuner):
        return cls
    if cls not in _FUSED_TUNER_CLASSES:
        name = f"Fused{cls.__name__}"
        new = type(name, (_FusedTuner, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, new)  # importable by name: pickling, deepcopy
        _FUSED_TUNER_CLASSES[cls] = new
    return _FUSED_TUNER_CLASSES[cls]


def convert_peft_model(model: nn.Module, activation_memory: str | None = DEFAULT_MODE) -> nn.Module:
    """Make every DoRA adapter of a live PeftModel (or any model holding PEFT LoRA layers) run fused, in place, and
    the adapters later added to those layers too; the model's PEFT tuner (LoraModel) fuses the layers it creates
    later (an adapter loaded or added that targets other modules: _FusedTuner). Nothing is copied or re-created:
    same modules, same Parameter objects (optimizers keep working), same state_dict keys, and every PeftModel
    method keeps working. Plain LoRA adapters stay PEFT's (LoRA already runs at LoRA's speed). activation_memory:
    the mode of this model's fused layers, those created later included (activation_policy). Returns the model."""
    check_mode(activation_memory, "dora_ext.from_peft", allow_none=True)
    lora_layer, _ = _peft()
    layers = [m for m in model.modules() if isinstance(m, lora_layer.LoraLayer)]
    if not layers:
        raise ValueError("dora_ext.from_peft: no PEFT LoRA layers in this model")
    for layer in layers:  # first every check, so a refused model is left as it was
        if any(type(v) in _variant_classes() for v in layer.lora_variant.values()):
            quantized.kind(layer.get_base_layer())  # refuses quantized layers it cannot read (HQQ, torchao, ...)
    for layer in layers:
        _fuse_layer(layer, activation_memory)
    from peft.tuners.lora import LoraModel

    for tuner in [m for m in model.modules() if isinstance(m, LoraModel)]:
        tuner.__class__ = _fused_tuner_class(type(tuner))
        tuner.__dict__[_MODE_ATTR] = activation_memory  # the mode of the layers it creates later
    return model


# ------------------------------------------------------------------------- the hook on PEFT's variant resolution
_PATCHED: dict[type, object] = {}  # hooked class -> its own resolve_lora_variant (empty: PEFT untouched)
_SUBCLASS_HOOK: list[tuple[type, object]] = []  # [(LoraLayer, its own __init_subclass__ or None)] while hooked
_HOOK_LOCK = threading.RLock()
_patch_on = False  # patch_peft is on: every layer fuses
_creations = 0  # converted tuners creating layers now, on any thread (the hooks stay while > 0)
_creating = threading.local()  # .depth > 0: a converted tuner creates layers on this thread


def _hook_resolve(cls: type) -> None:
    original = cls.__dict__["resolve_lora_variant"]

    @functools.wraps(original)
    def resolve_lora_variant(self, *, config, **kwargs):
        variant = original(self, config=config, **kwargs)
        if _patch_on:
            self.__dict__.setdefault(_MODE_ATTR, _PATCH_MODE)  # (from_peft's choice, if any, stays)
        elif not getattr(_creating, "depth", 0):
            return variant
        return _fused(variant)

    _PATCHED[cls] = original
    cls.resolve_lora_variant = resolve_lora_variant


def _install_hooks() -> None:
    """Hook resolve_lora_variant on LoraLayer and on every subclass with its own (bitsandbytes, HQQ, GPTQ), those
    loaded now and those defined later: PEFT imports peft.tuners.lora.bnb only when it first dispatches a
    bitsandbytes layer, so LoraLayer.__init_subclass__ hooks each class as it is defined. Under _HOOK_LOCK."""
    lora_layer, _ = _peft()
    _variant_classes()
    for cls in _resolving_classes(lora_layer):
        if cls not in _PATCHED:
            _hook_resolve(cls)
    if _SUBCLASS_HOOK:
        return
    base = lora_layer.LoraLayer
    own = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if own is not None:
            own.__get__(None, cls)(**kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        with _HOOK_LOCK:
            if "resolve_lora_variant" in cls.__dict__ and not issubclass(cls, _FusedResolve) and cls not in _PATCHED:
                _hook_resolve(cls)

    base.__init_subclass__ = classmethod(__init_subclass__)
    _SUBCLASS_HOOK.append((base, own))


def _remove_hooks() -> None:
    """PEFT's classes as they were (layers created meanwhile keep their variants). Under _HOOK_LOCK."""
    while _PATCHED:
        cls, original = _PATCHED.popitem()
        cls.resolve_lora_variant = original
    while _SUBCLASS_HOOK:
        base, own = _SUBCLASS_HOOK.pop()
        if own is None:
            del base.__init_subclass__
        else:
            base.__init_subclass__ = own


@contextlib.contextmanager
def _creating_fused_layers():
    """The layers PEFT constructs in this block, on this thread, resolve fused DoRA variants (_FusedTuner)."""
    global _creations
    with _HOOK_LOCK:
        _install_hooks()
        _creations += 1
    _creating.depth = getattr(_creating, "depth", 0) + 1
    try:
        yield
    finally:
        _creating.depth -= 1
        with _HOOK_LOCK:
            _creations -= 1
            if not _creations and not _patch_on:
                _remove_hooks()


def _resolving_classes(lora_layer) -> list[type]:
    """LoraLayer and every loaded subclass that defines its own resolve_lora_variant (bnb, HQQ, GPTQ layers)."""
    seen, stack, out = set(), [lora_layer.LoraLayer], []
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if "resolve_lora_variant" in cls.__dict__ and not issubclass(cls, _FusedResolve):
            out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def patch_peft(activation_memory: str | None = DEFAULT_MODE) -> None:
    """From now on every DoRA adapter PEFT creates (get_peft_model, PeftModel.from_pretrained, add_adapter,
    trainers that build the PeftModel themselves) runs fused. Layers created before keep what they have
    (convert those with from_peft). activation_memory: the mode of the layers fused from now on (activation_policy;
    a layer keeps the one it got first). Idempotent; undo with unpatch_peft()."""
    global _PATCH_MODE, _patch_on
    mode = check_mode(activation_memory, "dora_ext.patch_peft", allow_none=True)
    with _HOOK_LOCK:
        _install_hooks()  # (refuses an untested PEFT before anything changes)
        _PATCH_MODE, _patch_on = mode, True


def unpatch_peft() -> None:
    """Undo patch_peft(): PEFT creates its own DoRA variants again (existing layers keep theirs), and its classes
    are as they were (the hooks stay only while a converted model's tuner is creating a layer)."""
    global _patch_on
    with _HOOK_LOCK:
        _patch_on = False
        if not _creations:
            _remove_hooks()


@contextlib.contextmanager
def peft_patched(activation_memory: str | None = DEFAULT_MODE):
    """patch_peft(activation_memory) for the duration of a with-block (restores the previous state, patched or not,
    and patch_peft's previous mode)."""
    global _PATCH_MODE
    was, mode = _patch_on, _PATCH_MODE
    patch_peft(activation_memory)
    try:
        yield
    finally:
        _PATCH_MODE = mode
        if not was:
            unpatch_peft()
