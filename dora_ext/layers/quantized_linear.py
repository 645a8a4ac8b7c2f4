"""DoRA on bitsandbytes' quantized linears (Linear4bit: nf4/fp4, double quantization or not; Linear8bitLt): QDoRA.

The base product is bitsandbytes' own kernel (the wrapped layer's forward, and its backward for dx: no dequantized
copy outlives it); DoRA's part is one ops.dora_rescale on that output per adapter (functional.rescale), and the
norm ‖dequant(W) + s·B·A‖_row is read straight from the packed weight (dora_ext.quantized.weight_norm), cached in
eval like every layer's. Merging follows PEFT: dequantize, merge, requantize (with PEFT's rounding warning); so does
any init that reads W itself (EDoRA's SVD), once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional, quantized
from .linear import Linear

__all__ = ["QuantizedLinear"]


class QuantizedLinear(Linear):
    """Linear's adapters, variants and keys over a frozen bitsandbytes Linear4bit / Linear8bitLt."""

    input_axis_supported = False  # the packed weight has no column view for the fused norm

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer, fan_in_fan_out)
        self.fan_in_fan_out = False  # bitsandbytes layers hold nn.Linear's [out, in] layout

    def _check_base(self, base_layer):
        if not quantized.kind(base_layer):
            raise TypeError(f"dora_ext.QuantizedLinear: expected one of {quantized.SUPPORTED}, got "
                            f"{type(base_layer).__name__}")

    @classmethod
    def factor_shapes(cls, base, r):
        return (r, base.in_features), (base.out_features, r), (base.out_features,)

    def _default_adapter_dtype(self):
        return torch.float32  # PEFT's quantized layers: float32 adapters

    def _norm_base(self):
        return self.base_layer  # the norm reads the packed weight (functional.weight_norm)

    def weight_2d(self, weight: Tensor | None = None) -> Tensor:
        """The dense [out, in] weight: `weight` itself, or the base layer dequantized (a one-off copy, for work
        that needs W itself; the forward and the norm never call this)."""
        return quantized.dequantize(self.base_layer) if weight is None else weight

    def _init_adapter(self, name, sigma):
        weight = self.weight_2d() if self.variants[name].reads_weight else None
        self.variants[name].reset_(weight, *self.factor_tensors(name), self.extras(name), sigma)

    def _merge_target(self):
        return quantized.dequantize(self.base_layer)

    def _commit_merge(self, weight):
        quantized.requantize_(self.base_layer, weight)
        self.clear_cache()

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        base = self.base_layer
        return functional.rescale(x, base(x, *args, **kwargs), base.bias, [self._adapter(a) for a in active],
                                  self.training, functional.layer_product(base))
