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
from .neutral import IN, ModuleAdapter
from .peft_form import to_peft
from .reading import read_adapter_file

__all__ = ["load_lycoris", "dora_state"]


def dora_state(adapters: dict[str, ModuleAdapter], model: nn.Module, what: str = "dora_ext.load_lycoris"
               ) -> tuple[DoRAConfig, dict[str, Tensor]]:
    """(DoRAConfig targeting exactly their modules of `model`, tensors keyed as dora_ext's layers save them) of
    `adapters`. Output axis: PEFT's layout, which is dora_ext's (peft_form.to_peft)."""
    inputs = sorted(name for name, a in adapters.items() if a.axis == IN)
    if inputs:
        # INPUT AXIS: the place to wire dora_ext's input-axis layers (DoRAConfig / add_adapter norm_axis="in"): give
        # these modules a config with norm_axis="in" and their magnitude in that layer's shape, keyed
        # `base_model.model.<module>.lora_magnitude_vector` like the output axis; everything else stays as it is.
        raise NotImplementedError(f"{what}: {len(inputs)} module(s) hold input-axis magnitudes (LyCORIS "
                                  f"wd_on_out=False / OneTrainer's default), e.g. {inputs[:3]}; dora_ext's layers do "
                                  "not load the input axis yet")
    return to_peft(adapters, what, model)


def load_lycoris(model: nn.Module, source: str | os.PathLike | dict[str, Tensor], adapter_name: str = "default", *,
                 prefixes: dict[str, str] | None = None, norm_axis: str | None = None,
                 is_trainable: bool = False) -> nn.Module:
    """Load a LyCORIS / kohya / OneTrainer / ai-toolkit DoRA file (a .safetensors path or a state dict) into `model`
    in place, as adapter `adapter_name` of dora_ext's own layers; returns the model.

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
