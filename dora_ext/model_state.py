"""What a model holds besides its modules: its dora_ext layers, the DoRAConfig of each adapter, and PEFT's layers
(which dora_ext's model-level calls leave to PEFT)."""

from __future__ import annotations

from torch import nn

from .layers import DoRALayer
from .modules import DoRALinear

__all__ = ["AdapterConfigs", "ModelChange", "adapter_root", "dora_layers", "refuse_peft_layers", "CONFIGS_ATTR"]

CONFIGS_ATTR = "dora_ext_configs"


class AdapterConfigs(dict):
    """{adapter name: DoRAConfig} of the adapters injected into a model: what save_adapter writes and the allocator
    reads. Kept on the model as the attribute `dora_ext_configs` (a plain attribute: nn.Module keeps it in __dict__,
    outside the state_dict)."""

    @staticmethod
    def of(model: nn.Module) -> "AdapterConfigs":
        """The model's records (empty, and not attached, when it has none)."""
        return getattr(model, CONFIGS_ATTR, None) or AdapterConfigs()

    def attach(self, model: nn.Module) -> None:
        setattr(model, CONFIGS_ATTR, self)

    @staticmethod
    def detach_from(model: nn.Module) -> None:
        if hasattr(model, CONFIGS_ATTR):
            delattr(model, CONFIGS_ATTR)


def adapter_root(model: nn.Module) -> nn.Module:
    """The module whose names PEFT's keys use: the wrapped model for a PeftModel, else the model itself."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional: without it no model is a PeftModel
        return model
    return model.base_model.model if isinstance(model, PeftModel) else model


def dora_layers(model: nn.Module) -> dict[str, DoRALayer]:
    """{name relative to adapter_root(model): layer} for every dora_ext layer in the model, except the layer inside
    each DoRALinear: that single-layer API has no adapter name or config of the model's, and a model-level call
    (merge_and_unload, unload) would replace its layer under the DoRALinear that views it."""
    root = adapter_root(model)
    views = {id(mod.layer) for mod in root.modules() if isinstance(mod, DoRALinear)}
    return {name: mod for name, mod in root.named_modules() if isinstance(mod, DoRALayer) and id(mod) not in views}


def refuse_peft_layers(model: nn.Module, what: str) -> None:
    """Raise when `model` holds PEFT's tuner layers (a PeftModel, or get_peft_model's result): dora_ext's
    model-level calls would build hybrids of the two; PEFT manages such a model and from_peft runs it fused."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional: without it no model holds PEFT layers
        return
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(f"dora_ext.{what}: this model holds PEFT's LoRA layers (a PeftModel or the result of "
                         "get_peft_model); manage it with PEFT's own methods (load_adapter, add_adapter, "
                         "merge_and_unload, ...) and make its DoRA adapters run fused with dora_ext.from_peft(model)")


class ModelChange:
    """A model-level call as one change: each step registers its undo right after it is made, and when the call
    fails every step is undone (last first) and the trainable flags and adapter configs are restored, so a refused
    or failed call leaves the model exactly as it was. Used as `with ModelChange(model) as change: ...`."""

    def __init__(self, model: nn.Module):
        self._undo: list = []
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._model = model
        self._configs = dict(AdapterConfigs.of(model)) if hasattr(model, CONFIGS_ATTR) else None

    def on_undo(self, fn) -> None:
        self._undo.append(fn)

    def __enter__(self) -> "ModelChange":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            for fn in reversed(self._undo):
                fn()
            for p, flag in self._flags:
                p.requires_grad_(flag)
            AdapterConfigs.detach_from(self._model)
            if self._configs is not None:
                AdapterConfigs(self._configs).attach(self._model)
        return False
