"""Model-level DoRA: inject into any nn.Module, manage named adapters, merge and unload, convert a live PeftModel.

The model is changed in place: each targeted layer is replaced by a dora_ext layer (layers.py) that wraps it, and
every parameter outside the adapters is frozen (as PEFT's get_peft_model). The DoRAConfig of each adapter is kept
on the model (attribute `dora_ext_configs`) for save_adapter.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .config import DoRAConfig
from .layers import DoRALayer, Embedding, conv1d_type, layer_class_for

__all__ = ["inject", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters", "merge_and_unload",
           "unload", "dora_layers", "from_peft", "adapter_root", "target_plan"]

CONFIGS_ATTR = "dora_ext_configs"


def adapter_root(model: nn.Module) -> nn.Module:
    """The module whose names PEFT's keys use: the wrapped model for a PeftModel, else the model itself."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    if inner is not None and type(model).__name__.startswith("Peft"):
        return inner
    return model


def dora_layers(model: nn.Module) -> dict[str, DoRALayer]:
    """{name relative to adapter_root(model): layer} for every dora_ext layer in the model."""
    return {name: mod for name, mod in adapter_root(model).named_modules() if isinstance(mod, DoRALayer)}


def _linear_types() -> tuple:
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def target_plan(model: nn.Module, config: DoRAConfig) -> tuple[DoRAConfig, dict[str, nn.Module]]:
    """(config with "all-linear" resolved, {name: module to adapt}); raises when nothing or an unsupported type
    matches. Pure: the model is not touched, so callers can validate before changing anything."""
    root = adapter_root(model)
    config = config.resolve_all_linear(root, _linear_types())
    plan = {}
    for name, mod in root.named_modules():
        if not name or not config.is_target(name):
            continue
        if any(name.startswith(p + ".") for p in plan):  # inside a layer adapted already (e.g. its base_layer)
            continue
        cls = type(mod) if isinstance(mod, DoRALayer) else layer_class_for(mod)
        if cls is None:
            raise ValueError(f"dora_ext.inject: target module {name!r} is a {type(mod).__name__}; supported are "
                             "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding")
        if config.variant not in cls.variants or (config.dynamic_rank and not cls.supports_dynamic):
            raise ValueError(f"dora_ext.inject: target module {name!r} is a {type(mod).__name__}, which supports "
                             f"variants {cls.variants}{'' if cls.supports_dynamic else ' without dynamic rank'}; "
                             f"got variant={config.variant!r}, dynamic_rank={config.dynamic_rank}")
        plan[name] = mod
    if not plan:
        raise ValueError(f"dora_ext.inject: target_modules={config.target_modules!r} matched no module of the model "
                         f"(exclude_modules={config.exclude_modules!r})")
    return config, plan


def _wrap(mod: nn.Module) -> DoRALayer:
    return layer_class_for(mod)(mod)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def inject(model: nn.Module, config: DoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add a DoRA adapter `adapter_name` to every module `config` targets, in place; returns the model.

    Only adapter parameters stay trainable (the first adapter is active; later ones are added inactive and frozen,
    as PEFT's add_adapter; use set_adapter to switch)."""
    config, plan = target_plan(model, config)
    existing = {n for layer in dora_layers(model).values() for n in layer.adapter_names}
    if adapter_name in existing:
        raise ValueError(f"dora_ext.inject: adapter {adapter_name!r} already exists; delete_adapter() it first or "
                         "pick another name")
    first = not existing
    if first:
        model.requires_grad_(False)
    root = adapter_root(model)
    for name, mod in plan.items():
        layer = mod if isinstance(mod, DoRALayer) else _wrap(mod)
        layer.add_adapter(adapter_name, config.layer_rank_for(name), config.alpha_for(name), config.dropout,
                          config.use_rslora, config.adapter_dtype, variant=config.variant,
                          dynamic=config.dynamic_rank, sigma=config.edora_sigma)
        if layer is not mod:
            _set_submodule(root, name, layer)
    configs = getattr(model, CONFIGS_ATTR, {})
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)  # plain dict attribute: nn.Module keeps it in __dict__
    return model


def add_adapter(model: nn.Module, config: DoRAConfig, adapter_name: str) -> nn.Module:
    """inject() for a further named adapter (inactive until set_adapter)."""
    return inject(model, config, adapter_name)


def _layers_or_raise(model: nn.Module, what: str) -> dict[str, DoRALayer]:
    layers = dora_layers(model)
    if not layers:
        raise ValueError(f"dora_ext.{what}: the model has no DoRA layers (inject() or load_adapter() first)")
    return layers


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Activate adapter(s) on every layer that has them; active adapters train, the others are frozen. Several
    active DoRA adapters compose as PEFT does (dora_ext.functional, module docstring)."""
    names = [names] if isinstance(names, str) else list(names)
    layers = _layers_or_raise(model, "set_adapter")
    known = {n for layer in layers.values() for n in layer.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"dora_ext.set_adapter: unknown adapter(s) {unknown}, present: {sorted(known)}")
    for layer in layers.values():
        layer.set_adapter([n for n in names if n in layer.r])


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes the base model's output (merged adapters are unmerged first)."""
    layers = list(_layers_or_raise(model, "disable_adapters").values())
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, previous):
            layer.disable_adapters = flag


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    layers = _layers_or_raise(model, "delete_adapter")
    holders = [layer for layer in layers.values() if adapter_name in layer.r]
    if not holders:
        raise ValueError(f"dora_ext.delete_adapter: unknown adapter {adapter_name!r}")
    merged = [n for n, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"dora_ext.delete_adapter: adapter {adapter_name!r} is merged in {merged[:3]}…; "
                           "unmerge first")
    for layer in holders:
        layer.delete_adapter(adapter_name)
    getattr(model, CONFIGS_ATTR, {}).pop(adapter_name, None)


def _replace_layers(model: nn.Module, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
    root = adapter_root(model)
    layers = _layers_or_raise(model, "merge_and_unload" if merge else "unload")
    if merge:  # merge everything first: a failure (e.g. safe_merge) must not leave a half-unloaded model
        for layer in layers.values():
            layer.merge(adapter_names, safe_merge=safe_merge)
    for name, layer in layers.items():
        if not merge:
            layer.unmerge()
        _set_submodule(root, name, layer.base_layer)
    if hasattr(model, CONFIGS_ATTR):
        delattr(model, CONFIGS_ATTR)
    return root


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters (or `adapter_names`) into the base weights and put the plain layers back; returns
    the base model (the wrapped model of a PeftModel)."""
    return _replace_layers(model, True, adapter_names, safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Put the original layers back without merging (unmerging first where needed); returns the base model."""
    return _replace_layers(model, False, None, False)


# ------------------------------------------------------------------------------------------------- from PEFT
def from_peft(peft_model: nn.Module) -> nn.Module:
    """Swap every DoRA layer of a live PeftModel for a dora_ext layer in place, sharing its parameters (same
    Parameter objects, so an optimizer built before the swap keeps working). Outputs and gradients stay PEFT's
    up to rounding; PeftModel.save_pretrained keeps working (same state_dict keys). Merged PEFT layers are
    unmerged first. Layers with a plain-LoRA adapter are refused: a layer computes one kind of adapter here."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:
        raise ImportError("dora_ext.from_peft needs peft installed") from exc
    # PEFT finds its layers with isinstance(m, BaseTunerLayer) (saving, set_adapter, disabling, merging); an
    # unregistered layer would make PeftModel.save_pretrained silently write an empty adapter.
    BaseTunerLayer.register(DoRALayer)
    root = adapter_root(peft_model)
    found = {name: mod for name, mod in root.named_modules() if isinstance(mod, LoraLayer)}
    if not found:
        raise ValueError("dora_ext.from_peft: no PEFT LoRA layers in this model")
    for name, mod in found.items():
        names = list(mod.r)
        plain = [a for a in names if not mod.use_dora.get(a, False)]
        if plain:
            raise ValueError(f"dora_ext.from_peft: layer {name!r} has non-DoRA adapter(s) {plain}; only DoRA "
                             "adapters convert")
        if layer_class_for(mod.base_layer) is None:
            raise ValueError(f"dora_ext.from_peft: layer {name!r} wraps a {type(mod.base_layer).__name__}, which "
                             "dora_ext does not support")
    configs = {}  # parsed first: nothing is swapped if this raises
    for adapter, cfg in getattr(peft_model, "peft_config", {}).items():
        try:
            configs[adapter] = DoRAConfig.from_peft_dict(_config_dict(cfg), f"peft_config[{adapter!r}]")
        except ValueError as exc:  # e.g. modules_to_save: the layers convert, save_adapter will refuse (says why)
            configs[adapter] = exc
    for name, mod in found.items():
        if mod.merged:
            mod.unmerge()
        layer = _wrap(mod.base_layer)
        _adopt(layer, mod)
        _set_submodule(root, name, layer)
    setattr(peft_model, CONFIGS_ATTR, configs)
    return peft_model


def _adopt(layer: DoRALayer, peft_layer: nn.Module) -> None:
    """Point `layer` at peft_layer's adapter tensors and state (no copies)."""
    from .layers import Magnitude

    if isinstance(layer, Embedding):
        layer.lora_embedding_A = peft_layer.lora_embedding_A
        layer.lora_embedding_B = peft_layer.lora_embedding_B
    else:
        layer.lora_A = peft_layer.lora_A
        layer.lora_B = peft_layer.lora_B
    layer.lora_dropout = peft_layer.lora_dropout
    for a, dora in peft_layer.lora_magnitude_vector.items():
        layer.lora_magnitude_vector[a] = Magnitude(dora.weight)
    layer.r, layer.lora_alpha = dict(peft_layer.r), dict(peft_layer.lora_alpha)
    layer.scaling, layer.use_rslora = dict(peft_layer.scaling), dict(peft_layer.use_rslora)
    layer.variant = {a: "dora" for a in peft_layer.r}  # from_peft converts DoRA adapters only
    layer.dynamic = {a: False for a in peft_layer.r}
    layer.active_adapters = list(peft_layer.active_adapters)
    layer.disable_adapters = bool(peft_layer.disable_adapters)
    layer.train(peft_layer.training)


def _config_dict(cfg) -> dict:
    d = cfg.to_dict()
    d["peft_type"] = "LORA" if str(d.get("peft_type")).endswith("LORA") else d.get("peft_type")
    return d
