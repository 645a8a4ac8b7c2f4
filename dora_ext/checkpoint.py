"""Adapter files in PEFT's format: adapter_config.json + adapter_model.safetensors, keys as PEFT saves them
(peft/utils/save_and_load.py get_peft_model_state_dict): `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (Embedding: `.lora_embedding_A`, `.lora_embedding_B`), adapter name stripped.

load_adapter checks everything (config, file integrity, key set, shapes, dtypes, finiteness) before it changes the
model, so a bad checkpoint raises and leaves the model as it was. save_adapter writes into a temporary directory
next to the target and renames, so a failed save leaves no half-written adapter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DoRAConfig
from .layers import DoRALayer, layer_class_for
from .model import AdapterConfigs, adapter_root, delete_adapter, dora_layers, inject, target_plan, unload

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a parameter: FSDP2 shards are DTensors (full_tensor() is a collective: every rank calls)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, bool]]:
    """{saved key: (parameter, trainable)} of one adapter as the model holds it (unfolded)."""
    return {f"{KEY_PREFIX}{name}.{suffix}": (p, trainable)
            for name, layer in dora_layers(model).items() if adapter_name in layer.r
            for (_, suffix, trainable), p in zip(layer.tensor_specs(adapter_name), layer.params_of(adapter_name))}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default",
                       as_dora: bool = False) -> tuple[dict[str, Tensor], dict[str, int], dict[str, float]]:
    """({saved key: whole tensor}, rank_pattern, alpha_pattern) of one adapter, as save_adapter writes it.

    Dynamic-rank adapters are written as ordinary DoRA/LoRA adapters: the gates are folded into B (B·diag(c)), pruned
    components are dropped, and each layer's rank and scaling go into rank_pattern / alpha_pattern (alpha = s·r, so
    that alpha/r is the fixed s = alpha/r₀ of training). as_dora=True writes an EDoRA adapter the same way, as a
    PEFT DoRA adapter with B·R folded (for serving with PEFT; training EDoRA further needs the EDoRA file)."""
    out = {key: _full(p.detach()) for key, (p, _) in _adapter_tensors(model, adapter_name).items()}
    ranks, alphas = {}, {}
    for name, layer in dora_layers(model).items():
        if adapter_name not in layer.r:
            continue
        variant = layer.variants[adapter_name]
        full = {c: _full(t.detach()) for c, t in layer.extras(adapter_name).items()}
        A, B = (_full(t.detach()) for t in layer._factor_tensors(adapter_name))
        exported = variant.export(A, B, full, as_dora)  # the variant's own fold (B·R, gates), or None
        if exported is None:
            continue
        prefix = f"{KEY_PREFIX}{name}."
        for _, suffix, _ in variant.extra_specs():
            out.pop(prefix + suffix)
        out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"] = exported
        rank = exported[0].shape[0]
        ranks[re.escape(name)] = rank
        alphas[re.escape(name)] = layer.scaling[adapter_name] * rank
    if not out:
        raise ValueError(f"dora_ext.save_adapter: the model has no adapter {adapter_name!r}")
    return out, ranks, alphas


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, as_dora: bool = False) -> None:
    """Write `adapter_name` as an adapter directory (adapter_config.json + adapter_model.safetensors).

    DoRA, LoRA and dynamic-rank adapters are PEFT adapters that PeftModel.from_pretrained loads with the same
    outputs (dynamic rank: folded, see adapter_state_dict). EDoRA keeps its own keys (lora_A/lora_B frozen SVD
    factors, lora_R, lora_magnitude_vector) under peft_type "DORA_EXT"; as_dora=True exports it as PEFT DoRA.
    Under torch.distributed every rank must call it (sharded tensors are gathered); rank 0 writes."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # checked before anything is written or gathered
        raise ValueError(f"dora_ext.save_adapter: expected a directory path (new or existing), got {str(path)!r}, "
                         "which is an existing file")
    if not dora_layers(model) and adapter_root(model) is not model:
        raise ValueError("dora_ext.save_adapter: this PeftModel's layers are PEFT's (from_peft keeps them): save it "
                         "with its own PeftModel.save_pretrained, which writes the same files")
    config = AdapterConfigs.of(model).get(adapter_name)
    state, ranks, alphas = adapter_state_dict(model, adapter_name, as_dora)
    if config is None:
        raise ValueError(f"dora_ext.save_adapter: no DoRAConfig recorded for adapter {adapter_name!r} (was it added "
                         "with dora_ext.inject or load_adapter?)")
    if ranks:  # folded: an ordinary adapter with per-layer ranks and scalings
        variant = "dora" if config.variant == "edora" else config.variant
        config = dataclasses.replace(config, variant=variant, dynamic_rank=False, use_rslora=False,
                                     r=max(ranks.values()), rank_pattern=ranks, alpha_pattern=alphas)
    if not _is_writer():
        return
    from safetensors.torch import save_file

    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    meta = config.to_peft_dict(base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path",
                                                                   None))
    _write_dir_atomically(path, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
    })


def _write_dir_atomically(path: Path, writers: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, write in writers.items():
            write(tmp / name)
        if not path.exists():
            os.rename(tmp, path)  # the whole directory appears at once
        else:  # weights first: a config never points at weights that are not there yet
            for name in writers:
                os.replace(tmp / name, path / name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------ loading
def _read(path: Path) -> tuple[DoRAConfig, dict[str, Tensor]]:
    what = "dora_ext.load_adapter"
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
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error type for truncated / corrupt headers
        raise ValueError(f"{what}: {weights_file} is not a readable safetensors file (truncated or corrupt?): "
                         f"{exc}") from exc
    return config, tensors


def _expected(model: nn.Module, config: DoRAConfig, adapter_name: str) -> tuple[DoRAConfig | None, dict]:
    """(config to inject with, or None when the adapter exists; {saved key: shape})."""
    existing = _adapter_tensors(model, adapter_name)
    if existing:
        return None, {key: tuple(p.shape) for key, (p, _) in existing.items()}
    config, plan = target_plan(model, config)
    shapes = {}
    for name, mod in plan.items():
        base = mod.base_layer if isinstance(mod, DoRALayer) else mod
        shapes_of = layer_class_for(base).adapter_shapes(base, config.layer_rank_for(name), config.variant_object())
        for suffix, shape in shapes_of.items():
            shapes[f"{KEY_PREFIX}{name}.{suffix}"] = tuple(shape)
    return config, shapes


def _validate(tensors: dict, shapes: dict, source: Path) -> None:
    what = f"dora_ext.load_adapter: {source}"
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
    an existing one gets its tensors overwritten. is_trainable=False (PEFT's default) freezes the loaded adapter.
    Every check runs before the model changes; on any error the model is left as it was."""
    path = Path(path)
    config, tensors = _read(path)
    inject_config, shapes = _expected(model, config, adapter_name)
    _validate(tensors, shapes, path)
    had_layers = bool(dora_layers(model))
    if inject_config is not None:
        inject(model, inject_config, adapter_name)
    try:
        params = _adapter_tensors(model, adapter_name)
        with torch.no_grad():
            for key, (p, _) in params.items():
                _copy_into(p, tensors[key])
            for p, trainable in params.values():
                p.requires_grad_(is_trainable and trainable and p.requires_grad)
    except BaseException:
        if inject_config is not None:  # undo our own injection
            delete_adapter(model, adapter_name) if had_layers else unload(model)
        raise
    for layer in dora_layers(model).values():
        layer.clear_cache()
    return model


def _copy_into(p: Tensor, value: Tensor) -> None:
    if hasattr(p, "device_mesh"):  # FSDP2 DTensor shard: distribute the full tensor the same way
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements)
    p.copy_(value)
