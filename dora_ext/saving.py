"""Writing adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, keys as PEFT saves them
(peft/utils/save_and_load.py get_peft_model_state_dict): `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector` (Embedding: `.lora_embedding_A`, `.lora_embedding_B`), adapter name stripped; and, by PEFT's
save_embedding_layers="auto" rule, the base weights of targeted input/output embeddings (`.base_layer.weight`).

save_adapter writes into a temporary directory next to the target and renames, so a failed save leaves no
half-written adapter. `save_pretrained` is what a transformers model built by dora_ext.inject answers to
`model.save_pretrained` / `Trainer.save_model`: the adapters in PEFT's layout, as a PeftModel saves them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DoRAConfig
from .layers import DoRALayer
from .model_state import AdapterConfigs, adapter_root, dora_layers

__all__ = ["save_adapter", "adapter_files", "adapter_state_dict", "adapter_tensors", "write_dir_atomically",
           "write_file_atomically", "embedding_base_layers", "install_save_pretrained",
           "uninstall_save_pretrained", "CONFIG_NAME", "WEIGHTS_NAME", "KEY_PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# PEFT's names and messages for saving embedding layers (peft/utils/constants.py EMBEDDING_LAYER_NAMES,
# peft/utils/save_and_load.py get_peft_model_state_dict)
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
SAVE_EMBEDDINGS = "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`."
NOT_TRANSFORMERS = "Could not identify embedding layer(s) because the model is not a 🤗 transformers model."


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a parameter: FSDP2 shards are DTensors (full_tensor() is a collective: every rank calls)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[Tensor, bool]]:
    """{saved key: (parameter, trainable)} of one adapter as the model holds it (unfolded)."""
    return {f"{KEY_PREFIX}{name}.{suffix}": (p, trainable)
            for name, layer in dora_layers(model).items() if adapter_name in layer.r
            for (_, suffix, trainable), p in zip(layer.tensor_specs(adapter_name), layer.params_of(adapter_name))}


def _embedding_is_targeted(root: nn.Module, target_modules) -> bool:
    """PEFT's test (get_peft_model_state_dict): a target_modules list holds one of EMBEDDING_LAYER_NAMES as an
    entry, or a target_modules regex (other than "all-linear") matches a module whose name ends in one."""
    if isinstance(target_modules, str):
        return target_modules != "all-linear" and any(
            re.fullmatch(target_modules, k) for k, _ in root.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return bool(target_modules) and any(k in target_modules for k in EMBEDDING_LAYER_NAMES)


def embedding_base_layers(root: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """{name of its base layer: base layer} for each of `layers` ({name: a dora_ext layer, or a module about to be
    wrapped}) that is the model's input or output embedding (get_input_embeddings / get_output_embeddings) over an
    nn.Embedding or nn.Linear: the base layers whose tensors PEFT saves next to a targeted embedding's adapter
    (get_peft_model_state_dict, has_valid_embedding_base_layer), under `<layer>.base_layer.`."""
    if not hasattr(root, "get_input_embeddings"):
        return {}
    embeddings = {id(root.get_input_embeddings()), id(root.get_output_embeddings())}
    out = {}
    for name, mod in layers.items():
        base = mod.base_layer if isinstance(mod, DoRALayer) else mod
        if id(mod) in embeddings and isinstance(base, (nn.Linear, nn.Embedding)):
            out[f"{name}.base_layer"] = base
    return out


def _embedding_tensors(model: nn.Module, target_modules, save_embedding_layers) -> dict[str, Tensor]:
    """The base-layer tensors PEFT's get_peft_model_state_dict adds for save_embedding_layers: "auto" turns it on,
    with PEFT's warning, when an embedding is targeted; True saves the targeted embeddings' base layers."""
    root = adapter_root(model)
    targeted = _embedding_is_targeted(root, target_modules)
    if save_embedding_layers == "auto":
        # PEFT's other "auto" case, a vocabulary resized since the base checkpoint (found by reading the base's
        # config.json, from the Hub if need be), saves whole untargeted embedding layers; dora_ext writes and reads
        # adapters only and does not implement it
        if not targeted:
            return {}
        warnings.warn(SAVE_EMBEDDINGS)
    elif not save_embedding_layers:
        return {}
    elif not targeted:
        raise ValueError("dora_ext.save_adapter: save_embedding_layers=True saves the base weights of targeted "
                         "embedding layers (embed_tokens / lm_head in target_modules); no embedding is targeted here")
    if not hasattr(root, "get_input_embeddings"):
        warnings.warn(NOT_TRANSFORMERS)
        return {}
    return {f"{KEY_PREFIX}{name}.{k}": _full(v.detach())
            for name, base in embedding_base_layers(root, dora_layers(model)).items()
            for k, v in base.state_dict().items()}


def adapter_state_dict(model: nn.Module, adapter_name: str = "default", as_dora: bool = False,
                       save_embedding_layers: bool | str = "auto"
                       ) -> tuple[dict[str, Tensor], dict[str, int], dict[str, float]]:
    """({saved key: whole tensor}, rank_pattern, alpha_pattern) of one adapter, as save_adapter writes it.
    save_embedding_layers: PEFT's rule (get_peft_model_state_dict): with "auto" (PEFT's default) or True, and an
    embedding targeted (embed_tokens / lm_head in target_modules), the base weights of the targeted input/output
    embeddings are saved too (`<layer>.base_layer.weight`), with PEFT's warning for "auto".

    Dynamic-rank adapters are written as ordinary DoRA/LoRA adapters: the gates are folded into B (B·diag(c)), pruned
    components are dropped, and each layer's rank and scaling go into rank_pattern / alpha_pattern (alpha = s·r, so
    that alpha/r is the fixed s = alpha/r₀ of training). as_dora=True writes an EDoRA adapter the same way, as a
    PEFT DoRA adapter with B·R folded (for serving with PEFT; training EDoRA further needs the EDoRA file)."""
    out = {key: _full(p.detach()) for key, (p, _) in adapter_tensors(model, adapter_name).items()}
    ranks, alphas = {}, {}
    for name, layer in dora_layers(model).items():
        if adapter_name not in layer.r:
            continue
        variant = layer.variants[adapter_name]
        full = {c: _full(t.detach()) for c, t in layer.extras(adapter_name).items()}
        A, B = (_full(t.detach()) for t in layer.factor_tensors(adapter_name))
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
    config = AdapterConfigs.of(model).get(adapter_name)
    if config is not None:  # without a recorded config (save_adapter refuses it) there is no target_modules to test
        out.update(_embedding_tensors(model, config.target_modules, save_embedding_layers))
    return out, ranks, alphas


def adapter_files(model: nn.Module, adapter_name: str = "default", as_dora: bool = False,
                  save_embedding_layers: bool | str = "auto", allow_input_axis: bool = False
                  ) -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(the config, {saved key: whole tensor}) that save_adapter writes for `adapter_name`: adapter_state_dict's
    tensors, and the recorded config with folded adapters' per-layer ranks and scalings in rank_pattern /
    alpha_pattern. Under torch.distributed every rank must call it (sharded tensors are gathered). An input-axis
    adapter is refused (refuse_input_axis: PEFT's format cannot hold it) unless allow_input_axis, for writers of
    formats that hold it (adapter_files.model_adapters → LyCORIS)."""
    if not allow_input_axis:
        refuse_input_axis(model, adapter_name)
    config = AdapterConfigs.of(model).get(adapter_name)
    state, ranks, alphas = adapter_state_dict(model, adapter_name, as_dora, save_embedding_layers)
    if config is None:
        raise ValueError(f"dora_ext.save_adapter: no DoRAConfig recorded for adapter {adapter_name!r} (was it added "
                         "with dora_ext.inject or load_adapter?)")
    if ranks:  # folded: an ordinary adapter with per-layer ranks and scalings
        variant = "dora" if config.variant == "edora" else config.variant
        config = dataclasses.replace(config, variant=variant, dynamic_rank=False, use_rslora=False,
                                     r=max(ranks.values()), rank_pattern=ranks, alpha_pattern=alphas)
    return config, state


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, as_dora: bool = False,
                 save_embedding_layers: bool | str = "auto") -> None:
    """Write `adapter_name` as an adapter directory (adapter_config.json + adapter_model.safetensors).

    DoRA, LoRA and dynamic-rank adapters are PEFT adapters that PeftModel.from_pretrained loads with the same
    outputs (dynamic rank: folded, see adapter_state_dict). EDoRA keeps its own keys (lora_A/lora_B frozen SVD
    factors, lora_R, lora_magnitude_vector) under peft_type "DORA_EXT"; as_dora=True exports it as PEFT DoRA.
    save_embedding_layers: PEFT's save_pretrained argument (adapter_state_dict).
    Under torch.distributed every rank must call it (sharded tensors are gathered); rank 0 writes."""
    path = Path(path)
    if path.exists() and not path.is_dir():  # checked before anything is written or gathered
        raise ValueError(f"dora_ext.save_adapter: expected a directory path (new or existing), got {str(path)!r}, "
                         "which is an existing file")
    if not dora_layers(model) and adapter_root(model) is not model:
        raise ValueError("dora_ext.save_adapter: this PeftModel's layers are PEFT's (from_peft keeps them): save it "
                         "with its own PeftModel.save_pretrained, which writes the same files")
    if not dora_layers(model) and any(type(m).__name__ == "DoRALinear" for m in model.modules()):
        raise ValueError("dora_ext.save_adapter: this model holds DoRALinear modules (the single-layer API), which "
                         "carry no adapter name or config; save them with the model's state_dict, or build the "
                         "model with dora_ext.inject(model, DoRAConfig(...)) to get PEFT's adapter files")
    config, state = adapter_files(model, adapter_name, as_dora, save_embedding_layers)
    if not _is_writer():
        return
    from safetensors.torch import save_file  # safetensors is optional: only writing an adapter needs it

    tensors = {k: v.to("cpu").contiguous() for k, v in state.items()}
    meta = config.to_peft_dict(base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path",
                                                                   None))
    write_dir_atomically(path, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
    })


def refuse_input_axis(model: nn.Module, adapter_name: str) -> None:
    """PEFT's format has no input-axis DoRA (its norm is per output row, and PeftModel would load the file as such,
    silently wrong): refuse such an adapter before anything is gathered or written."""
    layers = [n for n, layer in dora_layers(model).items() if layer.norm_axis.get(adapter_name) == "in"]
    if layers:
        raise ValueError(f"dora_ext.save_adapter: adapter {adapter_name!r} takes its norm per input column "
                         f"(norm_axis='in', LyCORIS's wd_on_out=False) in {len(layers)} layer(s) ({layers[:3]}), "
                         "which PEFT's adapter format cannot represent (PEFT's DoRA norm is per output row); save it "
                         "in LyCORIS's format, or the model's state_dict with torch.save")


def write_dir_atomically(path: Path, writers: dict) -> None:
    """Write the directory `path` from {file name: writer(file path)}: into a temporary directory next to it, then
    renamed, so a failed write leaves no half-written directory."""
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


def write_file_atomically(path: Path, write) -> None:
    """Write the file `path` by write(temporary path) next to it, then rename: a failed write leaves no half-written
    file, and an existing one stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------- model.save_pretrained / Trainer.save_model
class _SavePretrained:
    """What `model.save_pretrained` does on a transformers model built by dora_ext.inject (Trainer.save_model and
    checkpointing call it): the adapters in PEFT's layout, as PeftModel.save_pretrained writes them (the adapter
    "default" in the directory, any other under a subdirectory of its name), so PeftModel.from_pretrained,
    dora_ext.load_adapter and transformers' adapter loading read them back. transformers' own save would write the
    wrapped layers' keys (`q_proj.base_layer.weight`, ...), which its from_pretrained cannot map back: the adapted
    projections would reload randomly initialised. Refused when parameters outside the adapters are trainable: an
    adapter-only save would lose them."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, is_main_process: bool = True, selected_adapters=None, **kwargs):
        model = self.model
        adapters = AdapterConfigs.of(model)
        names = list(adapters) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in adapters]
        if unknown:
            raise ValueError(f"dora_ext (model.save_pretrained): unknown adapter(s) {unknown}, present: "
                             f"{sorted(adapters)}")
        held = {id(p) for layer in dora_layers(model).values() for a in layer.adapter_names
                for p in layer.params_of(a)}
        extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        if extra:
            raise ValueError(f"dora_ext (model.save_pretrained): {len(extra)} trainable parameter(s) outside the "
                             f"adapters ({extra[:3]}...) would be lost by an adapter-only save; save the adapters "
                             "with dora_ext.save_adapter and those parameters with torch.save(state_dict), or "
                             "dora_ext.merge_and_unload(model) first to save the whole merged model")
        for name in names:  # refused before the first directory is written
            refuse_input_axis(model, name)
        if not is_main_process:
            return
        for name in names:
            path = Path(save_directory) if name == "default" else Path(save_directory) / name
            save_adapter(model, path, adapter_name=name,
                         save_embedding_layers=kwargs.get("save_embedding_layers", "auto"))


def install_save_pretrained(model: nn.Module) -> None:
    """Give a transformers model (one with a class-level save_pretrained) the adapter-only save above."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrained(model)


def uninstall_save_pretrained(model: nn.Module) -> None:
    """Back to the class's own save_pretrained (after merge_and_unload / unload: the model is plain again)."""
    if isinstance(vars(model).get("save_pretrained"), _SavePretrained):
        del model.save_pretrained
