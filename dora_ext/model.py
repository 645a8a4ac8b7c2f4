"""Model-level DoRA: inject into any nn.Module, manage named adapters, merge and unload (a live PeftModel is PEFT's
to manage: dora_ext.from_peft, peft_patching.py, makes its DoRA adapters run fused).

The model is changed in place: each targeted layer is replaced by a dora_ext layer (layers.py) that wraps it, and
every parameter outside the adapters is frozen (as PEFT's get_peft_model). The DoRAConfig of each adapter is kept
on the model (attribute `dora_ext_configs`) for save_adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from torch import nn

from . import tensor_parallel

from .config import DoRAConfig
from .layers import DoRALayer, Linear, conv1d_type, layer_class_for
from .model_state import AdapterConfigs, ModelChange, adapter_root, dora_layers, refuse_peft_layers
from .saving import install_save_pretrained, uninstall_save_pretrained

__all__ = ["AdapterConfigs", "inject", "add_adapter", "get_nb_trainable_parameters", "print_trainable_parameters", "set_adapter", "delete_adapter", "disable_adapters",
           "merge_and_unload", "unload", "dora_layers", "adapter_root", "target_plan"]

def _linear_types() -> tuple:
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


# PEFT's warnings (peft/tuners/lora/layer.py dispatch_default) when a wrapped layer's kind overrides fan_in_fan_out
FAN_IN_FAN_OUT_OFF = ("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                      "Setting fan_in_fan_out to False.")
FAN_IN_FAN_OUT_ON = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."


def fan_in_fan_out_of(config: DoRAConfig, plan: dict[str, nn.Module]) -> tuple[bool, list[str]]:
    """(the fan_in_fan_out PEFT's config holds after wrapping `plan`, PEFT's warnings in order). PEFT's
    dispatch_default rewrites the config as it wraps each new target in model order: an nn.Linear turns the flag
    off, a transformers Conv1D on, each change with a warning; layers adapted already (update_layer) and quantized
    linears (bitsandbytes' own dispatchers) leave it alone. The layers themselves take the layout from the base
    layer's type (layers/linear.py); the flag is what the saved adapter_config.json records."""
    flag, messages = config.fan_in_fan_out, []
    conv1d = conv1d_type()
    for mod in plan.values():
        if isinstance(mod, DoRALayer) or layer_class_for(mod) is not Linear:
            continue
        if isinstance(mod, nn.Linear) and flag:
            flag = False
            messages.append(FAN_IN_FAN_OUT_OFF)
        elif conv1d is not None and isinstance(mod, conv1d) and not flag:
            flag = True
            messages.append(FAN_IN_FAN_OUT_ON)
    return flag, messages


def target_plan(model: nn.Module, config: DoRAConfig) -> tuple[DoRAConfig, dict[str, nn.Module]]:
    """(config with "all-linear" resolved and fan_in_fan_out as PEFT records it (fan_in_fan_out_of), {name: module
    to adapt}); raises when nothing or an unsupported type matches. Pure: the model is not touched, so callers can
    validate before changing anything."""
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
        if not cls.supports(config.variant_object()):
            raise ValueError(f"dora_ext.inject: target module {name!r} is a {type(mod).__name__}, which supports "
                             f"variants {[c.label() for c in cls.supported_variants]}; got variant="
                             f"{config.variant!r}, dynamic_rank={config.dynamic_rank}")
        tensor_parallel.check_target(mod.weight, type(config.variant_object()) in cls.tensor_parallel_variants,
                                     f"dora_ext.inject: target module {name!r}")
        plan[name] = mod
    if not plan:
        raise ValueError(f"dora_ext.inject: target_modules={config.target_modules!r} matched no module of the model "
                         f"(exclude_modules={config.exclude_modules!r})")
    flag, _ = fan_in_fan_out_of(config, plan)
    return dataclasses.replace(config, fan_in_fan_out=flag), plan


def _wrap(mod: nn.Module) -> DoRALayer:
    return layer_class_for(mod)(mod)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def inject(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Add a DoRA adapter `adapter_name` to every module `config` targets, in place; returns the model.

    `config`: a DoRAConfig, or PEFT's LoraConfig (converted by DoRAConfig.from_lora_config). Only adapter
    parameters stay trainable (the first adapter is active; later ones are added inactive and frozen, as PEFT's
    add_adapter; use set_adapter to switch). All or nothing: a refused target leaves the model as it was."""
    with ModelChange(model) as change:
        add_to_model(model, config, adapter_name, change)
    return model


def add_to_model(model: nn.Module, config, adapter_name: str, change: ModelChange) -> None:
    """inject()'s work, each step registered on `change` (load_adapter undoes it too if a later step fails)."""
    refuse_peft_layers(model, "inject")
    given = as_dora_config(config, "dora_ext.inject")
    config, plan = target_plan(model, given)
    existing = {n for layer in dora_layers(model).values() for n in layer.adapter_names}
    if adapter_name in existing:
        raise ValueError(f"dora_ext.inject: adapter {adapter_name!r} already exists; delete_adapter() it first or "
                         "pick another name")
    for message in fan_in_fan_out_of(given, plan)[1]:
        warnings.warn(message)
    if not existing:
        model.requires_grad_(False)
    root = adapter_root(model)
    for name, mod in plan.items():
        layer = mod if isinstance(mod, DoRALayer) else _wrap(mod)
        active = list(layer.active_adapters)
        try:
            layer.add_adapter(adapter_name, config.layer_rank_for(name), config.alpha_for(name), config.dropout,
                              config.use_rslora, config.adapter_dtype, variant=config.variant_object(),
                              sigma=config.edora_sigma, activation_memory=config.activation_memory,
                              norm_axis=config.norm_axis)
        except (ValueError, TypeError) as exc:  # name the module: the layer's own message cannot
            raise type(exc)(f"dora_ext.inject: target module {name!r}: {exc}") from exc
        if existing:
            # a layer's first adapter becomes active (layers/base.py add_adapter); in a model that has adapters a
            # later one stays inactive and frozen where no active adapter covers the layer (a newly wrapped one), as
            # PEFT's inject_adapter ends with set_adapter(the model's active adapters)
            layer.set_adapter(active)
        if layer is mod:
            change.on_undo(lambda layer=layer, active=active: layer.forget_adapter(adapter_name, active))
        else:
            _set_submodule(root, name, layer)
            change.on_undo(lambda name=name, mod=mod: _set_submodule(root, name, mod))
    configs = AdapterConfigs.of(model)
    configs[adapter_name] = config
    configs.attach(model)
    install_save_pretrained(model)


def as_dora_config(config, what: str) -> DoRAConfig:
    """A DoRAConfig as given, or PEFT's LoraConfig converted (what PEFT users pass)."""
    if isinstance(config, DoRAConfig):
        return config
    if type(config).__name__ == "LoraConfig" and hasattr(config, "to_dict"):
        return DoRAConfig.from_lora_config(config)
    raise TypeError(f"{what}: expected a dora_ext.DoRAConfig or a peft.LoraConfig, got {type(config).__name__}")


def add_adapter(model: nn.Module, config: DoRAConfig, adapter_name: str) -> nn.Module:
    """inject() for a further named adapter (inactive until set_adapter)."""
    return inject(model, config, adapter_name)


def _layers_or_raise(model: nn.Module, what: str) -> dict[str, DoRALayer]:
    refuse_peft_layers(model, what)
    layers = dora_layers(model)
    if not layers:
        raise ValueError(f"dora_ext.{what}: the model has no DoRA layers (inject() or load_adapter() first)")
    return layers


def set_adapter(model: nn.Module, names: str | list[str], inference_mode: bool = False) -> None:
    """Activate adapter(s) on every layer that has them; active adapters train (unless inference_mode, as PEFT's
    set_adapter), the others are frozen. Several active DoRA adapters compose as PEFT does (dora_ext.functional,
    module docstring)."""
    names = [names] if isinstance(names, str) else list(names)
    layers = _layers_or_raise(model, "set_adapter")
    known = {n for layer in layers.values() for n in layer.adapter_names}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"dora_ext.set_adapter: unknown adapter(s) {unknown}, present: {sorted(known)}")
    for name, layer in layers.items():  # every refusal before the first layer changes
        layer.check_alone(names, f"dora_ext.set_adapter: layer {name!r}")
    for layer in layers.values():
        layer.set_adapter([n for n in names if n in layer.r], inference_mode=inference_mode)


# PEFT's warning (PeftModel.disable_adapter) when some layers are disabled already and others not
IRREGULAR_DISABLE = ("The model contains some adapter layers that are enabled and others that are disabled. This is "
                     "most likely unintentional. After exiting the disable_adapter context, all adapters will be "
                     "enabled")


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes the base model's output (merged adapters are unmerged first) and every
    adapter parameter is frozen; on exit each layer is enabled with its active adapters trainable and the others
    frozen. That is PEFT's disable_adapter: enable_adapters(False) freezes, enable_adapters(True) is
    set_adapter(active adapters); a model whose layers were all disabled before stays disabled."""
    layers = list(_layers_or_raise(model, "disable_adapters").values())
    enabled = [not layer.disable_adapters for layer in layers]
    if any(enabled) and not all(enabled):
        warnings.warn(IRREGULAR_DISABLE)
    for layer in layers:
        for name in layer.adapter_names:
            for p in layer.params_of(name):
                p.requires_grad_(False)
        layer.disable_adapters = True
    try:
        yield model
    finally:
        if any(enabled):
            for layer in layers:
                layer.set_adapter(layer.active_adapters)
                layer.disable_adapters = False


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete an adapter from every layer; where it was the only active one, the first remaining adapter (by name)
    becomes active, with PEFT's warning (BaseTunerLayer.delete_adapter)."""
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
    AdapterConfigs.of(model).pop(adapter_name, None)


def _replace_layers(model: nn.Module, merge: bool, adapter_names: list[str] | None, safe_merge: bool) -> nn.Module:
    what = "merge_and_unload" if merge else "unload"
    layers = _layers_or_raise(model, what)
    root = adapter_root(model)
    if merge:
        if isinstance(adapter_names, str):
            raise TypeError(f"dora_ext.{what}: expected a list of adapter names, got {adapter_names!r}")
        if adapter_names is not None:
            known = {n for layer in layers.values() for n in layer.adapter_names}
            unknown = [n for n in adapter_names if n not in known]
            if unknown:
                raise ValueError(f"dora_ext.{what}: unknown adapter(s) {unknown}, present: {sorted(known)}")
        # every layer merges what it holds of the names (PEFT skips layers an adapter does not target), all of them
        # or none: a refused layer (safe_merge, a grouped convolution) undoes the merges made before it
        per_layer = {name: None if adapter_names is None else [n for n in adapter_names if n in layer.r]
                     for name, layer in layers.items()}
        for name, layer in layers.items():  # every refusal (safe_merge's NaN/inf check included) before any change
            layer.check_merge(layer.to_merge(per_layer[name]), safe_merge)
        with ModelChange(model) as change:  # what can still fail here (out of memory) is undone to rounding
            for name, layer in layers.items():
                merged = layer.merge(per_layer[name])
                change.on_undo(lambda layer=layer, k=len(merged): layer.unmerge_last(k))
    for name, layer in layers.items():
        if not merge:
            layer.unmerge()
        _set_submodule(root, name, layer.base_layer)
    AdapterConfigs.detach_from(model)
    uninstall_save_pretrained(model)
    return root


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters (or `adapter_names`) into the base weights and put the plain layers back; returns
    the base model (the wrapped model of a PeftModel)."""
    return _replace_layers(model, True, adapter_names, safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Put the original layers back without merging (unmerging first where needed); returns the base model."""
    return _replace_layers(model, False, None, False)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts as PEFT's PeftModel.get_nb_trainable_parameters counts them (a
    bitsandbytes 4-bit parameter stores two values per byte of its storage dtype)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's print_trainable_parameters line for a dora_ext model."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
