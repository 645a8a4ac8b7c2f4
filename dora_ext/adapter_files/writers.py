"""Writing the neutral form (neutral.py) as files: LyCORIS / kohya (.safetensors), ai-toolkit (.safetensors) and PEFT
(an adapter directory). Every write goes to a temporary file or directory and is renamed into place (saving.py), so a
refused or failed write leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..saving import CONFIG_NAME, WEIGHTS_NAME, write_dir_atomically, write_file_atomically
from .module_names import file_names
from .neutral import AXES, IN, ModuleAdapter, lycoris_scale
from .peft_form import to_peft

__all__ = ["save_lycoris", "save_ai_toolkit", "save_peft"]


def _save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, what: str) -> None:
    from safetensors.torch import save_file  # safetensors is optional: only writing a file needs it

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: expected a file path, got {str(path)!r}, which is a directory")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_file_atomically(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def _cast(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None else t.to(dtype)


def save_lycoris(adapters: dict[str, ModuleAdapter], path: str | os.PathLike, *,
                 prefixes: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                 norm_axis: str | None = None) -> None:
    """Write a LyCORIS / kohya DoRA file: `<name>.lora_down.weight`, `.lora_up.weight` (in `dtype`, default as
    held), `.alpha` (a float32 scalar, s = alpha / r) and `.dora_scale` (float32, [out, 1, 1…] on the output axis,
    [1, in, 1…] on the input axis: LyCORIS's wd_on_out True / False). Names are `<prefix>_<path, "." → "_">` under
    `prefixes` ({prefix: submodule path}; default {"lycoris": ""}, LyCORIS's own; kohya: {"lora_unet": ...,
    "lora_te": ...}). norm_axis: refuse unless every module is on that axis (a conversion between the axes is not
    exact, so none is offered)."""
    what = "dora_ext.save_lycoris"
    if norm_axis is not None:
        if norm_axis not in AXES:
            raise ValueError(f"{what}: expected norm_axis in {AXES} or None, got {norm_axis!r}")
        other = sorted(n for n, a in adapters.items() if a.axis != norm_axis)
        if other:
            raise ValueError(f"{what}: norm_axis={norm_axis!r}, but {other[:3]} hold magnitudes on the other axis; "
                             "converting between the output and the input axis is not exact, so it is refused")
    names = file_names(list(adapters), {"lycoris": ""} if prefixes is None else prefixes, what)
    tensors = {}
    for path_, a in adapters.items():
        name = names[path_]
        tensors[f"{name}.lora_down.weight"] = _cast(a.lora_A, dtype)
        tensors[f"{name}.lora_up.weight"] = _cast(a.lora_B, dtype)
        tensors[f"{name}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
        tensors[f"{name}.dora_scale"] = lycoris_scale(a).to(torch.float32)
    _save_safetensors(tensors, path, what)


def save_ai_toolkit(adapters: dict[str, ModuleAdapter], path: str | os.PathLike, *,
                    prefixes: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write an ai-toolkit DoRA file: `<name>.lora_down.weight`, `.lora_up.weight`, `.magnitude` [out] (linear
    layers, output axis: ai-toolkit's DoRA has neither convolutions nor the input axis). ai-toolkit saves no alpha and
    its DoRA is exact at scaling 1 (kohya_reader.py), so the scaling is folded into lora_up: B·s. prefixes: as
    save_lycoris, default {"lora_unet": ""}."""
    what = "dora_ext.save_ai_toolkit"
    refused = sorted(n for n, a in adapters.items() if a.axis == IN or a.lora_A.dim() != 2)
    if refused:
        raise ValueError(f"{what}: {refused[:3]} are convolutions or hold input-axis magnitudes; ai-toolkit's DoRA "
                         "(toolkit/models/DoRA.py) is linear-only and normalises output rows")
    names = file_names(list(adapters), {"lora_unet": ""} if prefixes is None else prefixes, what)
    tensors = {}
    for path_, a in adapters.items():
        name = names[path_]
        tensors[f"{name}.lora_down.weight"] = _cast(a.lora_A, dtype)
        wide = a.lora_B.to(torch.promote_types(a.lora_B.dtype, torch.float32))  # fold s in fp32 at least
        tensors[f"{name}.lora_up.weight"] = (wide * a.scaling).to(dtype or a.lora_B.dtype)
        tensors[f"{name}.magnitude"] = _cast(a.magnitude, dtype)
    _save_safetensors(tensors, path, what)


def save_peft(adapters: dict[str, ModuleAdapter], path: str | os.PathLike,
              base_model_name_or_path: str | None = None, model: nn.Module | None = None) -> None:
    """Write a PEFT DoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained and dora_ext.load_adapter read; output axis only (peft_form.to_peft). model: the model
    the adapters are for, so that the config targets exactly their modules in it (PEFT's names match suffixes too);
    without it, target_modules lists the names alone."""
    from safetensors.torch import save_file  # safetensors is optional: only writing a file needs it

    what = "dora_ext.save_peft"
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}: expected a directory path (new or existing), got {str(path)!r}, which is a file")
    config, tensors = to_peft(adapters, what, model)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = config.to_peft_dict(base_model_name_or_path)
    write_dir_atomically(path, {
        WEIGHTS_NAME: lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        CONFIG_NAME: lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True)),
    })

