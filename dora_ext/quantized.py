"""Quantized base layers: what dora_ext supports (bitsandbytes 4-bit and LLM.int8 linears), how their DoRA norm is
read straight from the packed weight, and the one-off dequantize / requantize that merging needs.

The per-step norm ‖dequant(W) + s·B·A‖_row runs in `ops.weight_norm_4bit` / `ops.weight_norm_int8` over the packed
storage in row blocks (csrc/quantized_weights.h decodes each format exactly as bitsandbytes' own dequantize does),
so no [out, in] dequantized copy ever exists in a forward or backward; the base product stays bitsandbytes' own
kernel (the layer's forward). Only init-time work that needs W itself (EDoRA's SVD) and merging dequantize, as
PEFT does (dequantize, merge, requantize, with PEFT's warning about rounding).

Everything else that looks quantized (other libraries' layers and tensor subclasses, bitsandbytes modes not listed)
is refused with an error naming it (`kind`): never a silent dense fallback. bitsandbytes is optional:
nothing here imports it unless a bitsandbytes layer is handed in.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["SUPPORTED", "kind", "weight_norm", "dequantize", "requantize_", "dequantized_dtype", "storage",
           "is_quantized"]

class _OptionalCpuKernelNotice(logging.Filter):
    """Drops one record of bitsandbytes' CPU backend, logged as a warning whenever bitsandbytes is imported (PEFT
    and transformers import it at their own import) on a CPU with AVX512-BF16 without the optional `kernels` package:
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'…". bitsandbytes then
    runs its own CPU 4-bit kernel, which is what dora_ext is tested against; a user reads "Failed" as a failure of
    the run. Every other record of that logger passes."""

    PREFIX = "Failed to load CPU gemm_4bit_forward from kernels-community"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX))


# (on the logger by name: this imports nothing of bitsandbytes, and holds for an import that comes later)
_BNB_CPU_LOGGER = logging.getLogger("bitsandbytes.backends.cpu.ops")
if not any(isinstance(f, _OptionalCpuKernelNotice) for f in _BNB_CPU_LOGGER.filters):
    _BNB_CPU_LOGGER.addFilter(_OptionalCpuKernelNotice())

SUPPORTED = ("bitsandbytes Linear4bit (nf4 or fp4, with or without double quantization) and Linear8bitLt "
             "(has_fp16_weights=False)")

#: top-level packages of quantization libraries whose layers dora_ext does not read (refused, not dequantized;
#: bitsandbytes' supported layers are recognised before this applies); optimum.quanto's too.
_QUANT_PACKAGES = frozenset({"bitsandbytes", "hqq", "auto_gptq", "gptqmodel", "awq", "quanto", "eetq", "aqlm",
                             "torchao", "fbgemm_gpu", "compressed_tensors", "transformer_engine", "vptq"})


@functools.lru_cache(maxsize=None)
def _library(cls: type) -> str:
    """The top-level package of a layer class, "optimum.quanto" for quanto's (cached: kind() runs every forward)."""
    path = cls.__module__
    return "optimum.quanto" if path.startswith("optimum.quanto") else path.split(".")[0]


def _is_bnb(module: nn.Module) -> bool:
    return _library(type(module)) == "bitsandbytes"


def kind(module: nn.Module) -> str | None:
    """"4bit" or "8bit" for a supported bitsandbytes layer, None for an unquantized one; raises for anything else
    that is quantized, naming the layer type and what is supported."""
    weight = getattr(module, "weight", None)
    if _is_bnb(module) and weight is not None:
        cls = type(weight).__name__
        if cls == "Params4bit":
            if getattr(weight, "quant_state", None) is None:
                raise TypeError(f"dora_ext: the bitsandbytes {type(module).__name__} is not quantized yet "
                                "(bitsandbytes quantizes when the layer is moved to its device: call .to(device) "
                                "first, or load the model with a BitsAndBytesConfig)")
            return "4bit"
        if cls == "Int8Params":
            if weight.dtype != torch.int8:
                raise TypeError(f"dora_ext: expected a bitsandbytes Linear8bitLt with int8 weights "
                                f"(has_fp16_weights=False), got a {weight.dtype} weight; supported quantized base "
                                f"layers: {SUPPORTED}")
            return "8bit"
    if is_quantized(module):
        raise TypeError(f"dora_ext: {type(module).__module__}.{type(module).__qualname__} is a quantized layer "
                        f"dora_ext does not read; supported quantized base layers: {SUPPORTED}")
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` looks quantized: a layer of a quantization library, a weight that is not floating point,
    or a weight that is a tensor subclass (torchao's AffineQuantizedTensor and the like)."""
    library = _library(type(module))
    if library in _QUANT_PACKAGES or library == "optimum.quanto":
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        return False
    if not weight.is_floating_point():
        return True
    if type(weight) is nn.Parameter:  # a Parameter of a tensor subclass has the subclass's type: this one is plain
        return False
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    if type(data) is Tensor:  # the common case, decided without importing anything
        return False
    from torch.distributed.tensor import DTensor  # FSDP2 shards: a subclass, not a quantization

    return not isinstance(data, DTensor)


def storage(module: nn.Module) -> list[Tensor]:
    """The tensors the dequantized weight depends on (the eval-time norm cache keys on them)."""
    weight = module.weight
    if kind(module) == "4bit":
        qs = weight.quant_state
        return [weight.data, qs.absmax] + ([qs.state2.absmax] if qs.nested else [])
    return [weight.data, _scb(module)]


def _scb(module: nn.Module) -> Tensor:
    scb = getattr(module.weight, "SCB", None)
    return module.state.SCB if scb is None else scb


def dequantized_dtype(module: nn.Module) -> torch.dtype:
    """The dtype bitsandbytes dequantizes this layer's weight to (the QuantState's dtype; float32 for int8)."""
    return module.weight.quant_state.dtype if kind(module) == "4bit" else torch.float32


def weight_norm(module: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """‖dequant(W) + s·B·A‖ per output row of a supported quantized layer, from its packed weight (no [out, in]
    dequantized copy). Equal to ops.weight_norm on bitsandbytes' dequantized weight (the same values, summed by the
    same kernels)."""
    weight = module.weight
    if kind(module) == "8bit":
        return ops.weight_norm_int8(weight.data, _scb(module), lora_A, lora_B, scaling)
    qs = weight.quant_state
    packed = weight.data.reshape(-1).view(torch.uint8)  # any quant_storage dtype holds the same bytes
    shape = tuple(qs.shape)
    if getattr(qs, "packing_format_for_cpu", False):
        # bitsandbytes' CPU layout (Linear4bit switches to it in an inference forward on CPUs with AVX512-BF16):
        # codes interleaved per 32 rows, absmax [in/blocksize, out] in bfloat16 (back to the standard order here:
        # 1/blocksize of W's size), values rounded to bfloat16 (qs.dtype), as bitsandbytes' kernel then computes.
        absmax = qs.absmax.T.float().contiguous()
        return ops.weight_norm_4bit(packed, absmax, qs.code, qs.blocksize, shape, qs.dtype, lora_A, lora_B, scaling,
                                    row_group=32)
    if not qs.nested:
        return ops.weight_norm_4bit(packed, qs.absmax, qs.code, qs.blocksize, shape, qs.dtype, lora_A, lora_B, scaling)
    return ops.weight_norm_4bit(packed, qs.absmax, qs.code, qs.blocksize, shape, qs.dtype, lora_A, lora_B, scaling,
                                absmax_code=qs.state2.code, absmax_scale=qs.state2.absmax,
                                absmax_offset=qs.offset.reshape(1).float(), absmax_blocksize=qs.state2.blocksize)


def dequantize(module: nn.Module) -> Tensor:
    """The dense [out, in] weight (bitsandbytes' own dequantize): for one-off work only (EDoRA's SVD, merging)."""
    import bitsandbytes.functional as bnbF

    weight = module.weight
    if kind(module) == "4bit":
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            _restore_standard_layout(weight)
        return bnbF.dequantize_4bit(weight.data, weight.quant_state)
    return bnbF.int8_vectorwise_dequant(weight.data, _scb(module))


def _restore_standard_layout(weight) -> None:
    """bitsandbytes' dequantize reads the standard layout only: restore it from the CPU layout, as bitsandbytes does
    on .cuda() and on saving (the next inference forward re-makes the CPU layout). bitsandbytes 0.50.2's inverse
    leaves a non-nested absmax in the CPU layout's [in/blocksize, out] order; it is put back in block order here."""
    import bitsandbytes.functional as bnbF

    nested = weight.quant_state.original_nested
    weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if not nested:
        weight.quant_state.absmax = weight.quant_state.absmax.T.reshape(-1).float()


def requantize_(module: nn.Module, dense: Tensor) -> None:
    """Replace the layer's weight by `dense` quantized the way it was (PEFT's merge rule, its warning included)."""
    import bitsandbytes as bnb

    weight = module.weight
    bits = kind(module)
    warnings.warn(f"Merge lora module to {bits[0]}-bit linear may get different generations due to rounding errors.")
    if bits == "8bit":
        module.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                          has_fp16_weights=weight.has_fp16_weights).to(weight.device)
        if getattr(module, "state", None) is not None:
            module.state.reset_grads()
        return
    kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
    kwargs.update(bnb_quantized=False, requires_grad=False)
    module.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)
