"""bitsandbytes weights for the QDoRA tests: quantizing, an independent float64 oracle of the dequantized weight, and
small models whose linears are bitsandbytes layers (bitsandbytes is imported only by the helpers that need it:
the oracle also serves synthetic packed weights on machines without it).

The oracle decodes the packed format in plain torch from the definition that bitsandbytes' quantize_4bit writes
(flat blocks of the row-major weight, the first element of each byte in the high nibble, the nested absmax as
code2[q] · absmax2 + offset). It is checked against bitsandbytes' own dequantize_4bit where that is right: the
bitsandbytes 0.50.2 CPU dequantize kernel reads the wrong absmax when in_features is not a multiple of the blocksize
(it picks blocks per row; its own quantize_4bit blocks the flattened weight), so shapes the models use keep
in_features a multiple of 64, and odd shapes are held to the oracle alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

#: (quant_type, double quantization) of every 4-bit format bitsandbytes writes
FORMATS_4BIT = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


def fmt_id(fmt) -> str:
    return f"{fmt[0]}{'-dq' if fmt[1] else ''}"


def quantize_4bit(W: torch.Tensor, quant_type: str, nested: bool, blocksize: int = 64):
    """(packed uint8 codes, QuantState) of W, as a bitsandbytes Linear4bit stores it."""
    import bitsandbytes.functional as bnbF

    return bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def norm_args(qs) -> dict:
    """The nested-absmax keyword arguments of ops.weight_norm_4bit for QuantState qs."""
    if not qs.nested:
        return {}
    return dict(absmax_code=qs.state2.code, absmax_scale=qs.state2.absmax, absmax_offset=qs.offset.reshape(1).float(),
                absmax_blocksize=qs.state2.blocksize)


def dequant_oracle(packed: torch.Tensor, qs) -> torch.Tensor:
    """The dequantized [out, in] weight in float64, each value rounded to qs.dtype first (as bitsandbytes)."""
    b = packed.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)
    n = qs.shape[0] * qs.shape[1]
    if qs.nested:
        blocks = qs.absmax.numel()
        scale = qs.state2.absmax.repeat_interleave(qs.state2.blocksize)[:blocks]
        absmax = qs.state2.code[qs.absmax.long()] * scale + qs.offset
    else:
        absmax = qs.absmax
    flat = torch.arange(n)
    values = qs.code[codes[:n]] * absmax.float()[flat // qs.blocksize]
    return values.to(qs.dtype).double().reshape(tuple(qs.shape))


def int8_oracle(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """LLM.int8's dequantized weight CB · SCB / 127 in float64 (from the float32 product bitsandbytes computes)."""
    return ((CB.float() * SCB.view(-1, 1)) * 7.874015718698502e-3).double()


def quantized_copy(model: nn.Module, bits: int, names: list[str], quant_type: str = "nf4", nested: bool = False,
                   compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `model` whose linears `names` are bitsandbytes Linear4bit / Linear8bitLt with the same weights,
    flagged the way transformers flags a quantized model (PEFT dispatches its bitsandbytes layers on the flags)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        if bits == 4:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=quant_type, compress_statistics=nested)
        else:
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False)
        q.load_state_dict(lin.state_dict())
        setattr(parent, child, q.to(lin.weight.device))  # bitsandbytes quantizes on the move to the device
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = bits == 4, bits == 8
    return model


class TwoLinears(nn.Module):
    """x → q (with bias) → k (without): both bias paths of the quantized layers; in_features multiples of 64."""

    def __init__(self, d_in: int = 64, d_mid: int = 128, d_out: int = 64):
        super().__init__()
        self.q = nn.Linear(d_in, d_mid)
        self.k = nn.Linear(d_mid, d_out, bias=False)

    def forward(self, x):
        return self.k(self.q(x))
