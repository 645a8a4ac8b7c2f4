"""Multi-adapter DoRA layers with PEFT 0.21's module layout, so state_dict keys, saved keys and from_peft sharing
line up one to one with peft.tuners.lora.{Linear, Conv2d, Embedding} and its bitsandbytes layers
(peft/tuners/lora/layer.py, bnb.py):

    <layer>.base_layer.*                              the frozen wrapped layer
    <layer>.lora_A.<adapter>.weight                   [r, in]  (conv: [r, C_in, k…])
    <layer>.lora_B.<adapter>.weight                   [out, r] (conv: [C_out, r/groups, 1…])
    <layer>.lora_embedding_A.<adapter> / _B.<adapter> [r, vocab] / [dim, r]   (Embedding instead of lora_A/B)
    <layer>.lora_magnitude_vector.<adapter>.weight    [out] (conv: [1, C_out, 1…])

One module per base-layer kind behind the shared base (base.py): linear.py (nn.Linear, Conv1D), conv.py, embedding.py,
quantized_linear.py (bitsandbytes 4-bit / 8-bit linears). The math lives in dora_ext.functional and dora_ext.ops; a layer
holds state (adapters, active set, merges, the eval-time norm cache) and picks tensors.
"""

from __future__ import annotations

from torch import nn

from .. import quantized
from .base import DoRALayer, Magnitude, conv1d_type
from .conv import CONV_FN, Conv
from .embedding import Embedding
from .linear import Linear
from .quantized_linear import QuantizedLinear

__all__ = ["DoRALayer", "Linear", "QuantizedLinear", "Conv", "Embedding", "Magnitude", "conv1d_type",
           "layer_class_for"]


def layer_class_for(module: nn.Module) -> type[DoRALayer] | None:
    """The DoRA layer class that wraps `module`, or None for unsupported types; raises for quantized layers other
    than the supported bitsandbytes ones (dora_ext.quantized.SUPPORTED), never wrapping them densely."""
    if quantized.kind(module):
        return QuantizedLinear
    conv1d = conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return Linear
    if type(module) in CONV_FN:
        return Conv
    if isinstance(module, nn.Embedding):
        return Embedding
    return None
