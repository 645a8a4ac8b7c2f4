"""read_adapter_file: any supported DoRA adapter file (or state dict) into the neutral form (neutral.py), the format
detected from the keys: a PEFT adapter directory (peft_form.py), or a LyCORIS / kohya / OneTrainer / ai-toolkit
.safetensors file or state dict (kohya_reader.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from .kohya_reader import read_kohya_state
from .neutral import ModuleAdapter
from .peft_form import read_peft_dir

__all__ = ["read_adapter_file", "read_state"]


def read_state(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, with errors that name `what` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected an adapter file, {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"{what}: {path} is not a .safetensors file (only safetensors adapter files are read: a "
                         "pickled .pt/.ckpt could run code on load)")
    from safetensors.torch import load_file  # safetensors is optional: only reading a file needs it

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated / corrupt headers
        raise ValueError(f"{what}: {path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc


def read_adapter_file(source: str | os.PathLike | dict[str, Tensor], model: nn.Module | None = None, *,
                      prefixes: dict[str, str] | None = None, norm_axis: str | None = None,
                      what: str = "dora_ext.read_adapter_file") -> dict[str, ModuleAdapter]:
    """{module path: ModuleAdapter} of a DoRA adapter: `source` is a PEFT adapter directory, a LyCORIS / kohya /
    OneTrainer / ai-toolkit .safetensors file, or such a state dict. The kohya-named formats need `model` (the file
    names modules with "." replaced by "_", so the model's own names resolve them; every shape is checked against
    its module) and take `prefixes` ({file prefix: submodule path}, module_names.py) and `norm_axis` ("out" / "in":
    decides the axis of a magnitude whose shape fits both, i.e. in = out = 1, and must agree with every other)."""
    if not isinstance(source, dict) and Path(source).is_dir():
        return read_peft_dir(source, what)
    state = source if isinstance(source, dict) else read_state(source, what)
    if model is None:
        raise ValueError(f"{what}: reading a kohya-named file needs the model it was made for (model=...): its module "
                         "names are resolved through the model's own")
    return read_kohya_state(state, model, prefixes=prefixes, norm_axis=norm_axis, what=what)
