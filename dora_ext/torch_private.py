"""Every private PyTorch API dora_ext touches, each bound here once, so a torch upgrade that removes or renames one
breaks in one place, by name: tests/test_private_apis.py fails naming it, and a call raises naming it (never a
silent fallback). The names below are aliases, not wrappers: the hot paths (one call per layer) pay nothing.

| private API | what dora_ext needs it for | used in |
|---|---|---|
| `torch._C._AutoDispatchBelowAutograd` | run a fused op below autograd in eager mode (host time per call) | eager_autograd |
| `torch._C._any_requires_grad` | one C call to ask whether any input requires grad | eager_autograd |
| `torch._is_functional_tensor` | a functionalization wrapper is plain-typed yet must take the registered op | eager_autograd |
| `torch._subclasses.fake_tensor.is_fake` | fake tensors (compile, opcheck) have no data to alias | ops |
| `torch._C._autograd._top_saved_tensors_default_hooks` | whether saved-tensor hooks (checkpointing) are active | activation_policy |
| `torch._C._current_graph_task_id` | whether this thread is inside a backward pass | activation_policy |
| `Tensor._version` | the version counter: in-place changes of a kept output or a cached norm's inputs | activation_policy, layer_state |
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

__all__ = ["REQUIRED", "missing", "below_autograd", "any_requires_grad", "is_functional_tensor", "is_fake",
           "saved_tensors_hooked", "in_backward", "version"]


def _lookup(path: str):
    """The object at dotted `path` (an attribute of an importable module, or of torch's attributes), or None."""
    module, _, name = path.rpartition(".")
    try:
        owner = importlib.import_module(module)
    except ImportError:  # torch._C._autograd is an attribute of torch._C, not an importable module
        owner = torch
        for part in module.split(".")[1:]:
            owner = getattr(owner, part, None)
    return getattr(owner, name, None)


def _missing(path: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"dora_ext: this torch ({torch.__version__}) has no {path}, a private API dora_ext uses "
                           "(dora_ext/torch_private.py lists them); use the torch version dora_ext was tested with")
    return fail


#: every private API above, by its path
REQUIRED = ("torch._C._AutoDispatchBelowAutograd", "torch._C._any_requires_grad", "torch._is_functional_tensor",
            "torch._subclasses.fake_tensor.is_fake", "torch._C._autograd._top_saved_tensors_default_hooks",
            "torch._C._current_graph_task_id")


def missing() -> list[str]:
    """The private APIs of REQUIRED this torch lacks (and Tensor._version, checked on a tensor)."""
    absent = [path for path in REQUIRED if _lookup(path) is None]
    if not isinstance(getattr(torch.zeros(1), "_version", None), int):
        absent.append("Tensor._version")
    return absent


def _bind(path: str):
    obj = _lookup(path)
    return _missing(path) if obj is None else obj


below_autograd = _bind("torch._C._AutoDispatchBelowAutograd")
any_requires_grad = _bind("torch._C._any_requires_grad")
is_functional_tensor = _bind("torch._is_functional_tensor")
is_fake = _bind("torch._subclasses.fake_tensor.is_fake")
_top_saved_tensors_hooks = _bind("torch._C._autograd._top_saved_tensors_default_hooks")
_current_graph_task_id = _bind("torch._C._current_graph_task_id")


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, save_on_cpu) are active on this thread."""
    return _top_saved_tensors_hooks(False) is not None


def in_backward() -> bool:
    """Whether this thread is running a backward pass (the autograd engine's current graph task)."""
    return _current_graph_task_id() != -1


def version(t: Tensor) -> int:
    """t's version counter (bumped by every in-place change through autograd-visible ops, not through .data)."""
    return t._version
