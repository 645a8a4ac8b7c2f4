"""dora_ext: fused DoRA (weight-decomposed low-rank adaptation) for PyTorch, CPU and CUDA.

    layer = dora_ext.DoRALinear.from_linear(linear, r=16, alpha=32)          # one layer
    model = dora_ext.inject(model, dora_ext.DoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
    dora_ext.save_adapter(model, "out/"); model = dora_ext.merge_and_unload(model)    # PEFT's file format

Ops live in torch.ops.dora_ext (see dora_ext.ops); dora_ext.reference holds the plain-PyTorch semantics.
"""

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against, before _C itself)

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.dora_ext.*)
except ImportError as exc:  # a half-loaded package would hide a broken build, so fail here with the fix
    raise ImportError(
        "dora_ext's compiled extension (dora_ext._C) is missing or does not match this torch. Rebuild it with\n"
        "    pip install --no-build-isolation -e .      (or: python setup.py build_ext --inplace)\n"
        f"Original error: {exc}"
    ) from exc

from . import adapter_files, functional, layers, ops, quantized, reference, serving  # noqa: E402
from .adapter_files import (  # noqa: E402
    ModuleAdapter, load_lycoris, lycoris_to_peft, model_adapters, peft_to_lycoris, read_adapter_file, save_ai_toolkit,
    save_lycoris, save_peft,
)
from .checkpoint import adapter_state_dict, load_adapter, save_adapter  # noqa: E402
from .config import DoRAConfig  # noqa: E402
from .dynamic_rank import DynamicRankAllocator  # noqa: E402
from .layer_state import norm_caching  # noqa: E402
from .loraplus import create_loraplus_optimizer, loraplus_param_groups  # noqa: E402
from .lycoris_patching import lycoris_fusion, lycoris_patched, patch_lycoris, unpatch_lycoris  # noqa: E402
from .model import (  # noqa: E402
    add_adapter, delete_adapter, disable_adapters, dora_layers, get_nb_trainable_parameters, inject,
    merge_and_unload, print_trainable_parameters, set_adapter, unload,
)
from .modules import DoRALinear  # noqa: E402
from .peft_patching import from_peft, patch_peft, peft_patched, unpatch_peft  # noqa: E402
from .serving import mixed_adapters  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "DoRALinear", "DoRAConfig", "inject", "add_adapter", "set_adapter", "delete_adapter", "disable_adapters",
    "merge_and_unload", "unload", "dora_layers", "get_nb_trainable_parameters", "print_trainable_parameters", "from_peft", "save_adapter", "load_adapter", "adapter_state_dict",
    "patch_peft", "unpatch_peft", "peft_patched", "mixed_adapters", "norm_caching", "DynamicRankAllocator",
    "loraplus_param_groups", "create_loraplus_optimizer", "functional", "layers", "ops", "quantized", "reference", "serving", "__version__",
    "adapter_files", "ModuleAdapter", "read_adapter_file", "model_adapters", "load_lycoris", "save_lycoris",
    "save_ai_toolkit", "save_peft", "lycoris_to_peft", "peft_to_lycoris",
    "patch_lycoris", "unpatch_lycoris", "lycoris_patched", "lycoris_fusion",
]
