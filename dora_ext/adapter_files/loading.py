"""load_lycoris: a LyCORIS / kohya / OneTrainer / ai-toolkit DoRA file onto a model, as dora_ext's own layers.

The file is read and checked against the model (reading.py), turned into the config and tensors of dora_ext's layers
(dora_state) and loaded by checkpoint.load_adapter_state: every check before the model changes, all or nothing, the
same as load_adapter for a PEFT directory.
"""

from __future__ import annotations

import os

from torch import Tensor, nn

from ..checkpoint import load_adapter_state
from ..config import DoRAConfig
from .neutral import ModuleAdapter
from .peft_form import to_layers
from .reading import read_adapter_file

__all__ = ["load_lycoris", "dora_state"]


def dora_state(adapters: dict[str, ModuleAdapter], model: nn.Module, what: str = "dora_ext.load_lycoris"
               ) -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(DoRAConfig targeting exactly their modules of `model`, tensors keyed as dora_ext's layers save them) of
    `adapters` (peft_form.to_layers): output axis in PEFT's layout; input axis (LyCORIS wd_on_out=False,
    OneTrainer's default) with norm_axis="in" and the magnitude in that layer's shape. A file mixing the axes is
    refused: one adapter has one norm_axis."""
    return to_layers(adapters, what, model)


def load_lycoris(model: nn.Module, source: str | os.PathLike | dict[str, Tensor], adapter_name: str = "default", *,
                 prefixes: dict[str, str] | None = None, norm_axis: str | None = None,
                 is_trainable: bool = False) -> nn.Module:
    """Load a LyCORIS / kohya / OneTrainer / ai-toolkit DoRA file (a .safetensors path or a state dict) into `model`
    in place, as adapter `adapter_name` of dora_ext's own layers; returns the model. Output-axis files (LyCORIS's
    default wd_on_out=True, ai-toolkit) load as PEFT's DoRA, input-axis ones (wd_on_out=False, OneTrainer's default)
    as norm_axis="in" adapters (DoRAConfig.norm_axis); one file, one axis.

    prefixes: {file prefix: submodule path} for a file holding several models, e.g. kohya's "lora_unet" and
    "lora_te" for a container of both (module_names.py); norm_axis: decides an axis the shapes leave open (in = out =
    1). The outputs are LyCORIS's at multiplier 1 (its multiplier m ≠ 1 rescales the gain as m·(g − 1) + 1, which a
    DoRA layer does not compute; m = 0 is dora_ext.disable_adapters). is_trainable=False (PEFT's default) freezes the
    adapter. All or nothing: any refused module leaves the model as it was."""
    what = "dora_ext.load_lycoris"
    adapters = read_adapter_file(source, model, prefixes=prefixes, norm_axis=norm_axis, what=what)
    config, tensors = dora_state(adapters, model, what)
    label = "a state dict" if isinstance(source, dict) else str(source)
    return load_adapter_state(model, config, tensors, label, adapter_name, is_trainable)
