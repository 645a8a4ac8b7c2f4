"""The neutral form (neutral.py) ↔ PEFT's: a DoRAConfig (adapter_config.json) and tensors keyed as PEFT saves them
(`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`), which are also the keys of
dora_ext's own layers (saving.py writes them, checkpoint.py reads them).

To PEFT: exact for output-axis adapters. Each module's rank and alpha go into rank_pattern / alpha_pattern (the most
common ones become r and lora_alpha), so PEFT's scaling lora_alpha / r is the file's alpha / r, computed the same
way; the magnitude [out, 1…] becomes [out] (conv [1, out, 1…]). An input-axis adapter is refused: PEFT's DoRA
normalises output rows, and no PEFT adapter computes a per-input-column gain.
From PEFT: any DoRA adapter directory (use_rslora: alpha = lora_alpha·√r, so that alpha / r is PEFT's scaling), and
the adapters of a model built by dora_ext (inject / load_adapter / load_lycoris), through save_adapter's own tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import Counter
from pathlib import Path

from torch import Tensor, nn

from ..checkpoint import read_adapter_dir
from ..config import DoRAConfig
from ..model_state import adapter_root, dora_layers
from ..saving import KEY_PREFIX, adapter_files
from .neutral import IN, OUT, ModuleAdapter, layer_magnitude

__all__ = ["to_layers", "to_peft", "from_peft", "read_peft_dir", "model_adapters"]

_A, _B, _M = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"


def _exact(config: DoRAConfig, adapters: dict[str, ModuleAdapter], model: nn.Module, what: str) -> DoRAConfig:
    """`config` whose targets in `model` are exactly the adapters' modules: PEFT's list matching also takes every
    module whose name ends in ".<entry>" (a top-level `proj_out` would catch `blocks.0.proj_out`), so those go into
    exclude_modules."""
    held = tuple(n + "." for n in adapters)  # the inside of a layer adapted already is not a module of the model
    extra = sorted(n for n, _ in adapter_root(model).named_modules()
                   if n and n not in adapters and not n.startswith(held) and config.is_target(n))
    if not extra:
        return config
    config = dataclasses.replace(config, exclude_modules=extra)
    lost = sorted(n for n in adapters if not config.is_target(n))
    if lost:
        raise ValueError(f"{what}: PEFT's name matching cannot target {lost[:3]} without also targeting {extra[:3]} "
                         "(a name that ends another); no exact adapter_config.json exists for these modules")
    return config


def to_layers(adapters: dict[str, ModuleAdapter], what: str = "dora_ext.load_lycoris",
              model: nn.Module | None = None) -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(DoRAConfig, tensors keyed as dora_ext's layers save them) of adapters on one axis. Output axis: PEFT's
    config and layout. Input axis: the same keys, the config's norm_axis "in" and each magnitude in the input-axis
    layer's shape (layer_magnitude). With the `model` they are for, the config targets exactly their modules in it
    (_exact). Both axes at once are refused: one adapter (one DoRAConfig) has one norm_axis."""
    if not adapters:
        raise ValueError(f"{what}: no adapters to write")
    by_axis: dict[str, list[str]] = {}
    for name, a in sorted(adapters.items()):
        by_axis.setdefault(a.axis, []).append(name)
    if len(by_axis) > 1:
        raise ValueError(f"{what}: the modules mix the output axis ({len(by_axis[OUT])} module(s), e.g. "
                         f"{by_axis[OUT][:3]}) and the input axis ({len(by_axis[IN])}, e.g. {by_axis[IN][:3]}); one "
                         "dora_ext adapter has one norm_axis (DoRAConfig.norm_axis), so such a file is not loaded "
                         "as one: split it by axis and load each part under its own adapter name (they hold "
                         "different layers, so set_adapter(model, [both]) runs them together)")
    (axis,) = by_axis
    r = Counter(a.rank for a in adapters.values()).most_common(1)[0][0]
    alpha = Counter(a.alpha for a in adapters.values()).most_common(1)[0][0]
    # re.escape(name) matches exactly that module (PEFT's get_pattern_key: `(.*\.)?{pattern}$`, as saving.py writes)
    config = DoRAConfig(r=r, alpha=alpha, target_modules=sorted(adapters), norm_axis=axis,
                        rank_pattern={re.escape(n): a.rank for n, a in adapters.items() if a.rank != r},
                        alpha_pattern={re.escape(n): a.alpha for n, a in adapters.items() if a.alpha != alpha})
    if model is not None:
        config = _exact(config, adapters, model, what)
    tensors = {}
    for name, a in adapters.items():
        tensors[f"{KEY_PREFIX}{name}.{_A}"] = a.lora_A
        tensors[f"{KEY_PREFIX}{name}.{_B}"] = a.lora_B
        tensors[f"{KEY_PREFIX}{name}.{_M}"] = layer_magnitude(a)
    return config, tensors


def to_peft(adapters: dict[str, ModuleAdapter], what: str = "dora_ext.save_peft", model: nn.Module | None = None
            ) -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(DoRAConfig, PEFT-keyed tensors) of output-axis adapters (to_layers); input-axis ones are refused (not
    exact)."""
    inputs = sorted(name for name, a in adapters.items() if a.axis == IN)
    if inputs:
        raise ValueError(f"{what}: {len(inputs)} module(s) hold input-axis magnitudes ({inputs[:3]}...): PEFT's DoRA "
                         "normalises output rows, so the conversion would not be exact; refused (load them with "
                         "dora_ext, or keep the LyCORIS file)")
    return to_layers(adapters, what, model)


def from_peft(config: DoRAConfig, tensors: dict[str, Tensor], what: str = "dora_ext.read_adapter_file",
              axes: dict[str, str] | None = None) -> dict[str, ModuleAdapter]:
    """{module path: ModuleAdapter} of a DoRA adapter in PEFT's layout (config + PEFT-keyed tensors); axes: {module
    path: "out" / "in"} (model_adapters: what each layer computes), default the config's norm_axis (a PEFT
    adapter_config.json: always "out")."""
    if config.variant != "dora" or config.dynamic_rank:
        raise ValueError(f"{what}: the adapter is {config.variant_object().label()}, not DoRA; only DoRA adapters have "
                         "a LyCORIS / ai-toolkit DoRA form")
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        suffix = next((s for s in (_A, _B, _M) if key.endswith("." + s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[len(KEY_PREFIX):-len(suffix) - 1], {})[suffix] = t
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} key(s) outside DoRA's lora_A / lora_B / lora_magnitude_vector "
                         f"(embedding adapters, saved base layers): {unknown[:5]}; not supported here")
    out = {}
    for name, g in groups.items():
        missing = [s for s in (_A, _B, _M) if s not in g]
        if missing:
            raise ValueError(f"{what}: module {name!r} has no {missing}")
        r = g[_A].shape[0]
        lora_alpha = config.alpha_for(name)
        # the neutral alpha is scaling·r: PEFT's lora_alpha/√r under rsLoRA (not bit-exact then), else lora_alpha
        alpha = float(lora_alpha * math.sqrt(r)) if config.use_rslora else float(lora_alpha)
        axis = config.norm_axis if axes is None else axes[name]
        out[name] = ModuleAdapter(g[_A], g[_B], alpha, g[_M].reshape(-1), axis)
    return out


def read_peft_dir(path: str | os.PathLike, what: str = "dora_ext.read_adapter_file") -> dict[str, ModuleAdapter]:
    """The adapters of a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    config, tensors = read_adapter_dir(Path(path), what)
    return from_peft(config, tensors, what)


def model_adapters(model: nn.Module, adapter_name: str = "default") -> dict[str, ModuleAdapter]:
    """{module path: ModuleAdapter} of adapter `adapter_name` of a model built by dora_ext (inject, load_adapter,
    load_lycoris): the tensors save_adapter would write (EDoRA exported as DoRA, dynamic rank folded), detached,
    each on the axis its layer normalises (input-axis adapters too: save_lycoris writes them, save_peft and
    save_ai_toolkit refuse them). The paths are relative to the model, as its adapter files name them."""
    holders = {name: layer for name, layer in dora_layers(model).items() if adapter_name in layer.r}
    if not holders:
        raise ValueError(f"dora_ext.model_adapters: the model has no adapter {adapter_name!r} of dora_ext's layers")
    config, tensors = adapter_files(model, adapter_name, as_dora=True, save_embedding_layers=False,
                                    allow_input_axis=True)
    axes = {name: layer.norm_axis[adapter_name] for name, layer in holders.items()}
    return from_peft(config, {k: t.detach() for k, t in tensors.items()}, "dora_ext.model_adapters", axes)
