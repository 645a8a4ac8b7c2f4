"""DoRA on nn.Conv1d/2d/3d: one norm and gain per output channel (or, norm_axis "in", per input channel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional, ops
from .base import DoRALayer

__all__ = ["Conv", "CONV_FN"]

CONV_FN = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


class Conv(DoRALayer):
    """DoRA on a frozen nn.Conv1d/2d/3d: one norm and gain per output channel over (C_in/groups, k…).

    groups > 1 follows PEFT: r must be divisible by groups, the norm uses PEFT's reshape of B.view(-1, r) @
    A.view(r, -1) to W's shape (computed densely, in float32), and merging raises NotImplementedError.

    norm_axis "in" (LyCORIS's wd_on_out=False, groups=1 only): one norm and gain per input channel, over
    (C_out, k…); magnitude [1, C_in, 1…], LyCORIS's dora_scale layout, broadcasting over the input it scales.
    """

    input_axis_supported = True

    def __init__(self, base_layer: nn.Module):
        if type(base_layer) not in CONV_FN:
            raise TypeError(f"dora_ext.Conv: expected an nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        self.spec = functional.conv_spec(base_layer)

    @classmethod
    def factor_shapes(cls, base, r):
        ones = (1,) * (base.weight.dim() - 2)
        return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // base.groups, *ones), \
            (1, base.out_channels, *ones)

    @classmethod
    def magnitude_shape(cls, base, axis="out"):
        if axis == "out":
            return super().magnitude_shape(base, axis)
        return (1, base.in_channels) + (1,) * (base.weight.dim() - 2)  # LyCORIS's dora_scale [1, C_in, 1…]

    def _check_input_axis(self, what):
        super()._check_input_axis(what)
        if self.spec.groups > 1:  # a column of W then mixes channels of different groups under one gain
            raise ValueError(f"{what}: norm_axis='in' needs a convolution with groups=1, got groups={self.spec.groups}")

    def input_axis_operands(self, name, weight=None, factors=None):
        _, B = self.factors(name) if factors is None else factors
        return self.weight if weight is None else weight, self.lora_A[name].weight, B

    def weight_2d(self, weight=None):
        weight = self.weight if weight is None else weight
        return weight.view(weight.shape[0], -1)  # a view, so merge_ writes through it

    def factors(self, name):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)

    def _create_factors(self, name, r, factory):
        b, conv = self.base_layer, type(self.base_layer)
        if r % b.groups:
            raise ValueError(f"dora_ext.Conv.add_adapter: expected a rank divisible by groups={b.groups}, got r={r}")
        ones = (1,) * (self.weight.dim() - 2)
        self.lora_A[name] = conv(self.in_features, r, b.kernel_size, b.stride, b.padding, bias=False, **factory)
        self.lora_B[name] = conv(r, self.out_features, ones, ones, groups=b.groups, bias=False, **factory)

    def factor_tensors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def weight_norm(self, name, weight=None, factors=None):
        if self.spec.groups == 1:
            return super().weight_norm(name, weight, factors)
        weight = self.weight if weight is None else weight
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        r = A.shape[0]
        dtype = ops.accum_dtype(weight, A)
        with torch.no_grad():  # PEFT's (grouped) ΔW, dense: merging such layers is not supported anyway
            delta = (B.reshape(-1, r).to(dtype) @ A.reshape(r, -1).to(dtype)).reshape(weight.shape)
            return torch.linalg.vector_norm(weight.to(dtype) + self.scaling[name] * delta, dim=tuple(
                range(1, weight.dim())))

    def current_norm(self, name, factors):
        """The base's, with PEFT's dense norm of a grouped convolution (weight_norm) in the same eval cache."""
        if self.spec.groups == 1:
            return super().current_norm(name, factors)
        return self._norm_cache.norm(name, self._norm_base(), *factors, self.scaling[name], self.training,
                                     inputs=lambda: self.norm_inputs(name), compute=lambda: self.weight_norm(name))

    def _check_mergeable(self):
        if self.spec.groups > 1:
            raise NotImplementedError("dora_ext.Conv.merge: merging is not supported for convolutions with "
                                      f"groups > 1 (got groups={self.spec.groups}), as in PEFT")

    def _forward_factors(self, name, A, B):
        return self.lora_A[name].weight, self.lora_B[name].weight  # the conv kernels themselves

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        adapters = [self._adapter(a) for a in active]
        if adapters[0].norm_axis == "in":  # the only active adapter (check_alone)
            return functional.conv_in(x, self.base_layer, adapters[0], self.spec)
        return functional.conv(x, self.base_layer(x), self.weight, self.base_layer.bias, self.spec, adapters,
                               self.training)
