"""DoRA on linear maps: nn.Linear and transformers' Conv1D (weight stored [in, out]), with every family variant."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .. import functional, mixed_batch, tensor_parallel
from ..variants import DoRA, DynamicDoRA, DynamicLoRA, EDoRA, LoRA
from .base import DoRALayer, conv1d_type

__all__ = ["Linear"]


class Linear(DoRALayer):
    """DoRA on a frozen nn.Linear, or on a transformers Conv1D (weight stored [in, out]: fan_in_fan_out); also the
    family variants: plain LoRA, EDoRA (lora_R between frozen SVD factors) and dynamic rank (lora_gate).

    The variants reach the kernels as an ordinary (A, B) pair: EDoRA's B·R and the gated B·diag(c) are [out, r]
    products folded before the op (autograd carries the gradients to R and c), so the norm, the fused forward and
    backward, and merging never build the [out, in] ΔW and need no kernels of their own.
    """

    supported_variants = (DoRA, LoRA, EDoRA, DynamicDoRA, DynamicLoRA)
    input_axis_supported = True  # columns of the [out, in] view: transposed views of W, B, A

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        conv1d = conv1d_type()
        is_conv1d = conv1d is not None and isinstance(base_layer, conv1d)
        if not (isinstance(base_layer, nn.Linear) or is_conv1d):
            raise TypeError(f"dora_ext.Linear: expected an nn.Linear or transformers Conv1D, got "
                            f"{type(base_layer).__name__}")
        super().__init__(base_layer)
        # PEFT overrides a wrong flag with a warning; the layer type decides.
        self.fan_in_fan_out = is_conv1d
        (_, self.in_features), (self.out_features, _), _ = self.factor_shapes(base_layer, 1)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_R = nn.ParameterDict()  # EDoRA: the trainable r×r matrix
        self.lora_gate = nn.ParameterDict()  # dynamic rank: one gate per rank-1 component

    @classmethod
    def factor_shapes(cls, base, r):
        w = base.weight
        conv1d = conv1d_type()
        out, inp = (w.shape[1], w.shape[0]) if conv1d is not None and isinstance(base, conv1d) else w.shape
        return (r, inp), (out, r), (out,)

    def weight_2d(self, weight=None):
        weight = self.weight if weight is None else weight
        return weight.T if self.fan_in_fan_out else weight

    def factor_tensors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    def factors(self, name):
        return self.variants[name].fold(*self.factor_tensors(name), self.extras(name))

    def _create_factors(self, name, r, factory):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)

    @torch.no_grad()
    def keep_components(self, name: str, keep: Tensor, swap: Callable[[nn.Parameter, int, Tensor], nn.Parameter]):
        """Keep only the rank-1 components `keep` of dynamic-rank adapter `name`: lora_A rows, lora_B columns and
        gates are replaced by `swap(param, dim, keep)` (the allocator's: a new Parameter, optimizer state sliced
        alike). The scaling s = alpha/r₀ stays as trained."""
        A, B = self.factor_tensors(name)
        self.lora_A[name].weight = swap(A, 0, keep)
        self.lora_B[name].weight = swap(B, 1, keep)
        self.lora_gate[name] = swap(self.lora_gate[name], 0, keep)
        self.lora_A[name].out_features = self.lora_B[name].in_features = keep.numel()
        self.r[name] = int(keep.numel())
        self.clear_cache()

    tensor_parallel_variants = (DoRA, LoRA)

    def _shard_factors(self, name, layout):
        A, B = self.factor_tensors(name)
        sharded = tensor_parallel.shard_like_base(layout, {"A": A, "B": B})
        self.lora_A[name].weight = nn.Parameter(sharded["A"], requires_grad=A.requires_grad)
        self.lora_B[name].weight = nn.Parameter(sharded["B"], requires_grad=B.requires_grad)

    def _adapted_forward(self, x: Tensor, active: list[str], *args, **kwargs) -> Tensor:
        adapters = [self._adapter(a) for a in active]
        layout = self.tp_layout(f"dora_ext.{type(self).__name__}")
        if layout is None:
            return functional.linear(x, self.weight_2d(), self.base_layer.bias, adapters, self.training)
        # sharded: take and return what the sharded base layer does (its TP hooks), compute on local tensors
        return tensor_parallel.run_with_base_hooks(
            self.base_layer, x, layout,
            lambda x_local: functional.linear(x_local, self.weight_2d(), self.base_layer.bias, adapters,
                                              self.training))

    def _mixed_forward(self, x: Tensor, names: list[str], *args, **kwargs) -> Tensor:
        if tensor_parallel.is_sharded(self.weight):
            raise ValueError(f"dora_ext.{type(self).__name__}: mixed-adapter batches (dora_ext.mixed_adapters / "
                             "adapter_names) do not run on tensor-parallel (sharded) layers")
        if any(self.norm_axis.get(n) == "in" for n in names):  # its gain scales x: no shared base product
            return super()._mixed_forward(x, names, *args, **kwargs)
        mixed_batch.check_names(names, x.shape[0], f"dora_ext.{type(self).__name__}")
        return mixed_batch.linear_mixed(x, self.base_layer(x, *args, **kwargs), self.base_layer.bias, names, self)
