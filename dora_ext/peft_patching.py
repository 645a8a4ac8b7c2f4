"""How PEFT's LoRA layers get dora_ext's fused DoRA variants (peft_variants.py), two ways, both reversible:

  * `from_peft(model)` / `convert_peft_model(model)`: this model's DoRA adapters, the ones later added to its layers,
    and the layers its PEFT tuner creates later (an adapter that targets new modules) run fused; other models are
    untouched.
  * `patch_peft()` / `unpatch_peft()` (or `with peft_patched():`): every DoRA layer PEFT creates from then on is
    fused, for code that builds the PeftModel itself (`get_peft_model`, TRL's `SFTTrainer(peft_config=...)`),
    including layer classes PEFT defines later (its bitsandbytes layers are imported on first use).

Both go through one hook on PEFT's `resolve_lora_variant` (LoraLayer's and every subclass's own override, hooked
as the subclass is defined), installed only while patch_peft is on or a converted model's tuner creates a layer.
Converted layers also serve mixed-adapter batches (`adapter_names`) with DoRA adapters in them (mixed_batch.py).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading

from torch import nn

from . import quantized
from .activation_policy import DEFAULT_MODE, check_mode
from .mixed_batch import mixed_output
from .peft_private import peft_modules, variant_kwarg_keys
from .peft_variants import MODE_ATTR, fused_variant, fused_variant_classes, linear_norm

__all__ = ["from_peft", "patch_peft", "unpatch_peft", "peft_patched"]

#: patch_peft's choice, given to each layer it fuses when the layer resolves its first adapter
_PATCH_MODE: str | None = DEFAULT_MODE


def _serves_mixed(layer, names) -> bool:
    """Whether this converted layer runs a mixed batch of `names` itself: a linear layer (nn.Linear, Conv1D or a
    bitsandbytes base) whose named adapters are fused DoRA or plain LoRA, in eval, without the cases the fused
    variant leaves to PEFT (lora_B bias, offloading). Otherwise PEFT's own mixed-batch code (and checks) apply."""
    lora_layer, _ = peft_modules()
    bnb_layer = any(c.__module__ == "peft.tuners.lora.bnb" for c in type(layer).__mro__)
    if not (isinstance(layer, lora_layer.Linear) or bnb_layer):
        return False
    if layer.training or getattr(layer, "ephemeral_gpu_offload", False):
        return False
    fused = set(fused_variant_classes().values())
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
    (`adapter_names`) with DoRA adapters in them, which PEFT refuses (dora_ext.mixed_batch).

    The methods below override PEFT's own by name, private ones included: each is an entry of
    peft_private.PRIVATE, which tests/test_private_apis.py checks against the installed PEFT."""

    def resolve_lora_variant(self, *, config, **kwargs):
        return fused_variant(super().resolve_lora_variant(config=config, **kwargs))

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
        for key in variant_kwarg_keys(self):  # the variants' keywords: not for the base layer
            kwargs.pop(key, None)
        base_layer = self.get_base_layer()

        def adapter_of(name):
            A, B, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            if name not in self.lora_variant:  # plain LoRA: gain 1
                return A, B, scaling, None, None
            return A, B, scaling, self.lora_magnitude_vector[name].weight, linear_norm(self, name)

        return mixed_output(x, self.base_layer(x, *args, **kwargs), getattr(base_layer, "bias", None),
                            adapter_names, self.lora_A, adapter_of)


_FUSED_CLASSES: dict[tuple[type, type], type] = {}  # (mixin, PEFT class) -> the subclass of both


def _with_mixin(mixin: type, cls: type) -> type:
    """`cls` (a PEFT layer or tuner class) with `mixin` first in its MRO, made once per pair. repr stays PEFT's
    ("lora.Linear(...)"); the class is importable by name from this module, for pickling and deepcopy."""
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _FUSED_CLASSES:
        name = f"Fused{cls.__name__}"
        new = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, new)
        _FUSED_CLASSES[mixin, cls] = new
    return _FUSED_CLASSES[mixin, cls]


def _fuse_layer(layer: nn.Module, mode: str | None) -> None:
    """Give a PEFT LoRA layer the fused layer class, the activation-memory mode and its DoRA adapters the fused
    variants (a variant resolved fused already is kept: _fused maps only PEFT's DoRA classes)."""
    layer.__class__ = _with_mixin(_FusedResolve, type(layer))
    layer.__dict__[MODE_ATTR] = mode
    for name, variant in list(layer.lora_variant.items()):
        layer.lora_variant[name] = fused_variant(variant)


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
        lora_layer, _ = peft_modules()
        mode = self.__dict__.get(MODE_ATTR, DEFAULT_MODE)
        for layer in module.modules():
            if isinstance(layer, lora_layer.LoraLayer) and not isinstance(layer, _FusedResolve):
                _fuse_layer(layer, mode)
        return module




def from_peft(peft_model: nn.Module, *, activation_memory: str | None = DEFAULT_MODE) -> nn.Module:
    """Make a live PeftModel's DoRA adapters (or those of any model holding PEFT LoRA layers) run dora_ext's fused
    arithmetic, in place, and keep every PeftModel method working: the layers stay PEFT's own, with the fused
    variants (peft_variants.py), so parameters, state_dict keys, save_pretrained, load_adapter/add_adapter (new DoRA
    adapters are fused too, also on modules no adapter targeted before: _FusedTuner), set_adapter, delete_adapter,
    disable_adapter, merging and `adapter_names` batches are PEFT's. Nothing is copied or re-created: same modules,
    same Parameter objects (optimizers keep working). Plain LoRA adapters stay PEFT's LoRA (already LoRA's speed).
    activation_memory: what the fused forward keeps for backward, for this model's layers, those created later
    included ("fast", "balanced", "min_memory", "acc"; None: the context's mode; dora_ext.activation_policy).
    Returns the model."""
    check_mode(activation_memory, "dora_ext.from_peft", allow_none=True)
    lora_layer, _ = peft_modules()
    layers = [m for m in peft_model.modules() if isinstance(m, lora_layer.LoraLayer)]
    if not layers:
        raise ValueError("dora_ext.from_peft: no PEFT LoRA layers in this model")
    for layer in layers:  # first every check, so a refused model is left as it was
        if any(type(v) in fused_variant_classes() for v in layer.lora_variant.values()):
            quantized.kind(layer.get_base_layer())  # refuses quantized layers it cannot read (HQQ, torchao, ...)
    for layer in layers:
        _fuse_layer(layer, activation_memory)
    from peft.tuners.lora import LoraModel  # peft is optional: importing dora_ext never needs it

    for tuner in [m for m in peft_model.modules() if isinstance(m, LoraModel)]:
        tuner.__class__ = _with_mixin(_FusedTuner, type(tuner))
        tuner.__dict__[MODE_ATTR] = activation_memory  # the mode of the layers it creates later
    return peft_model


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
            self.__dict__.setdefault(MODE_ATTR, _PATCH_MODE)  # (from_peft's choice, if any, stays)
        elif not getattr(_creating, "depth", 0):
            return variant
        return fused_variant(variant)

    _PATCHED[cls] = original
    cls.resolve_lora_variant = resolve_lora_variant


def _install_hooks() -> None:
    """Hook resolve_lora_variant on LoraLayer and on every subclass with its own (bitsandbytes, HQQ, GPTQ), those
    loaded now and those defined later: PEFT imports peft.tuners.lora.bnb only when it first dispatches a
    bitsandbytes layer, so LoraLayer.__init_subclass__ hooks each class as it is defined. Under _HOOK_LOCK."""
    lora_layer, _ = peft_modules()
    fused_variant_classes()
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
