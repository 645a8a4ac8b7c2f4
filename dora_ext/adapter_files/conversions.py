"""Exact conversions between the formats, through the neutral form: LyCORIS / kohya output-axis DoRA ↔ PEFT. An
input-axis file has no PEFT form (peft_form.to_peft refuses it), and no conversion between the axes is offered (the
per-row and per-column normalisations are different adapters, not two layouts of one).
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from .neutral import ModuleAdapter
from .peft_form import read_peft_dir
from .reading import read_adapter_file
from .writers import save_lycoris, save_peft

__all__ = ["lycoris_to_peft", "peft_to_lycoris"]


def lycoris_to_peft(source: str | os.PathLike | dict[str, Tensor], model: nn.Module, path: str | os.PathLike, *,
                    prefixes: dict[str, str] | None = None, norm_axis: str | None = None,
                    base_model_name_or_path: str | None = None) -> dict[str, ModuleAdapter]:
    """Write the LyCORIS / kohya / OneTrainer DoRA file `source` (made for `model`) as a PEFT adapter directory at
    `path`, which PeftModel.from_pretrained(model, path) and dora_ext.load_adapter load with the file's outputs.
    Output axis only. Returns the adapters written."""
    adapters = read_adapter_file(source, model, prefixes=prefixes, norm_axis=norm_axis, what="dora_ext.lycoris_to_peft")
    save_peft(adapters, path, base_model_name_or_path, model)
    return adapters


def peft_to_lycoris(source: str | os.PathLike, path: str | os.PathLike, *, prefixes: dict[str, str] | None = None,
                    dtype=None) -> dict[str, ModuleAdapter]:
    """Write the PEFT DoRA adapter directory `source` as a LyCORIS / kohya file at `path` (save_lycoris: prefixes,
    dtype). Returns the adapters written."""
    adapters = read_peft_dir(source, "dora_ext.peft_to_lycoris")
    save_lycoris(adapters, path, prefixes=prefixes, dtype=dtype)
    return adapters
