"""Reading adapters in PEFT's format (saving.py writes them). load_adapter checks everything (config, file integrity,
key set, shapes, dtypes, finiteness, and the config of an adapter that already exists) before it changes the model,
so a refused checkpoint leaves the model exactly as it was. Besides the adapter's own tensors, a file may hold the base
weights of targeted input/output embeddings (PEFT's save_embedding_layers, saving.py); they are copied into the base
layers, as PEFT's load does.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DoRAConfig
from .layers import DoRALayer, layer_class_for
from .model import add_to_model, target_plan
from .model_state import ModelChange, adapter_root, dora_layers, refuse_peft_layers
from .saving import (CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, adapter_state_dict, adapter_tensors,
                     embedding_base_layers, save_adapter)

__all__ = ["save_adapter", "load_adapter", "load_adapter_state", "read_adapter_dir", "adapter_state_dict",
           "CONFIG_NAME", "WEIGHTS_NAME"]


# ------------------------------------------------------------------------------------------------------ loading
def read_adapter_dir(path: Path, what: str = "dora_ext.load_adapter") -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(config, {saved key: tensor}) of a PEFT adapter directory, the config checked (DoRAConfig.from_peft_dict) and
    the weights file read whole; errors name `what`."""
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            hint = " (only .safetensors adapters are read)" if f is weights_file and (path / "adapter_model.bin"
                                                                                       ).exists() else ""
            raise FileNotFoundError(f"{what}: expected {f}, which does not exist{hint}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {cfg_file} is not valid JSON ({exc})") from exc
    config = DoRAConfig.from_peft_dict(raw, str(cfg_file))
    from safetensors.torch import load_file  # safetensors is optional: only reading an adapter needs it

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error type for truncated / corrupt headers
        raise ValueError(f"{what}: {weights_file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{exc}") from exc
    return config, tensors


def _expected(model: nn.Module, config: DoRAConfig, adapter_name: str) -> tuple[bool, dict, dict]:
    """(whether the adapter is new; {saved key: shape} of its tensors; {saved key: base tensor} a file may add: the
    base layers of the targeted layers that are the model's input/output embeddings, as PEFT saves them)."""
    existing = adapter_tensors(model, adapter_name)
    if existing:
        holders = {name: layer for name, layer in dora_layers(model).items() if adapter_name in layer.r}
        return False, {key: tuple(p.shape) for key, (p, _) in existing.items()}, _base_tensors(model, holders)
    config, plan = target_plan(model, config)
    shapes = {}
    for name, mod in plan.items():
        base = mod.base_layer if isinstance(mod, DoRALayer) else mod
        shapes_of = layer_class_for(base).adapter_shapes(base, config.layer_rank_for(name), config.variant_object(),
                                                         config.norm_axis)
        for suffix, shape in shapes_of.items():
            shapes[f"{KEY_PREFIX}{name}.{suffix}"] = tuple(shape)
    return True, shapes, _base_tensors(model, plan)


def _base_tensors(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """{saved key: tensor} of the embedding base layers among `layers` (saving.embedding_base_layers): the same
    tensor objects before and after the layer is wrapped, since wrapping keeps the base module."""
    return {f"{KEY_PREFIX}{name}.{k}": t
            for name, base in embedding_base_layers(adapter_root(model), layers).items()
            for k, t in base.state_dict(keep_vars=True).items()}


def _validate(tensors: dict, shapes: dict, source, optional: dict | None = None) -> None:
    """Refuse a file whose keys are not `shapes` (plus any of `optional`) or whose tensors are not finite floating
    point tensors of the expected shapes."""
    what = f"dora_ext.load_adapter: {source}"
    shapes = {**shapes, **{key: shape for key, shape in (optional or {}).items() if key in tensors}}
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{what} does not match the model: {len(missing)} missing key(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")
    for key, shape in shapes.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: {key} has shape {tuple(t.shape)}, the model expects {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{what}: {key} has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {key} holds NaN or inf values")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT DoRA adapter directory (PeftModel.save_pretrained or save_adapter) into `model` in place.

    A new adapter name is injected with the saved config (active if it is the model's first adapter, as PEFT);
    an existing one gets its tensors overwritten when its config equals the file's (PEFT would keep the old config
    silently; here a different one is refused, and so is an adapter merged into the base weights).
    is_trainable=False (PEFT's default) freezes the loaded adapter. Every check runs before the model changes; on
    any error the model is left as it was."""
    refuse_peft_layers(model, "load_adapter")
    path = Path(path)
    config, tensors = read_adapter_dir(path)
    return load_adapter_state(model, config, tensors, path, adapter_name, is_trainable)


def load_adapter_state(model: nn.Module, config: DoRAConfig, tensors: dict[str, Tensor], source: str | os.PathLike,
                       adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
    """load_adapter's work on an adapter already read: `config` and `tensors` keyed as PEFT saves them
    (`base_model.model.<module>.lora_A.weight`, ...); `source` names where they came from in messages. The same checks
    before the model changes, the same all-or-nothing change (dora_ext.adapter_files loads other formats through
    it)."""
    refuse_peft_layers(model, "load_adapter")
    new, shapes, bases = _expected(model, config, adapter_name)
    if not new:
        _check_existing(model, config, adapter_name, source)
    _validate(tensors, shapes, source, {key: tuple(t.shape) for key, t in bases.items()})
    merged = [name for name, layer in dora_layers(model).items() if layer.merged
              and any(key.startswith(f"{KEY_PREFIX}{name}.base_layer.") for key in bases if key in tensors)]
    if merged:
        raise ValueError(f"dora_ext.load_adapter: {source} holds the base weights of {merged}, whose base weights hold "
                         "merged adapters (unmerging after the copy would corrupt them): unmerge first")
    if config.variant == "lora" and not config.dynamic_rank:
        warnings.warn(f"dora_ext.load_adapter: {source} holds a plain LoRA adapter (use_dora is false in its "
                      "config); it is loaded as LoRA, without a magnitude")
    with ModelChange(model) as change:
        if new:
            add_to_model(model, config, adapter_name, change)
        params = adapter_tensors(model, adapter_name)
        targets = {key: t for key, t in bases.items() if key in tensors}
        targets.update({key: p for key, (p, _) in params.items()})
        with torch.no_grad():
            for key, p in targets.items():
                old = p.detach().clone()
                _copy_into(p, tensors[key])
                change.on_undo(lambda p=p, old=old: _restore(p, old))
            for p, trainable in params.values():
                p.requires_grad_(is_trainable and trainable and p.requires_grad)
    for layer in dora_layers(model).values():
        layer.clear_cache()
    return model


def _check_existing(model: nn.Module, config: DoRAConfig, adapter_name: str, source) -> None:
    """Refuse to load over an existing adapter whose config differs from the file's (the layers would keep their
    own scaling, rank or variant: wrong outputs) or that is merged (the new tensors would unmerge wrongly, corrupting
    the base weight for good)."""
    what = f"dora_ext.load_adapter: {source}"
    layers = {name: layer for name, layer in dora_layers(model).items() if adapter_name in layer.r}
    merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"{what}: adapter {adapter_name!r} is merged into the base weights of {merged[:3]}; "
                         "loading other tensors into it would corrupt those weights when it is unmerged: unmerge "
                         "first, or load under another adapter name")
    variant = config.variant_object()
    for name, layer in layers.items():
        r = config.layer_rank_for(name)
        scaling = config.alpha_for(name) / (math.sqrt(r) if config.use_rslora else r)
        differences = []
        if type(layer.variants[adapter_name]) is not type(variant):
            differences.append(f"variant {layer.variants[adapter_name].label()} vs the file's {variant.label()}")
        if not math.isclose(layer.scaling[adapter_name], scaling, rel_tol=1e-9):
            differences.append(f"scaling {layer.scaling[adapter_name]} vs the file's {scaling}")
        if layer.norm_axis[adapter_name] != config.norm_axis:
            differences.append(f"norm_axis {layer.norm_axis[adapter_name]!r} vs the file's {config.norm_axis!r}")
        if not math.isclose(layer.dropout_p(adapter_name), config.dropout):
            differences.append(f"dropout {layer.dropout_p(adapter_name)} vs the file's {config.dropout}")
        if differences:
            raise ValueError(f"{what}: adapter {adapter_name!r} exists with another config ({'; '.join(differences)} "
                             f"in {name!r}); delete_adapter() it first or load under another adapter name")


@torch.no_grad()
def _restore(p: Tensor, old: Tensor) -> None:
    p.copy_(old)


def _copy_into(p: Tensor, value: Tensor) -> None:
    if hasattr(p, "device_mesh"):  # FSDP2 DTensor shard: distribute the full tensor the same way
        from torch.distributed.tensor import distribute_tensor  # optional in torch builds: only for FSDP2 shards

        value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
    p.copy_(value)
