"""Eager-mode autograd for the fused ops, outside torch.library's wrapper.

Each differentiable op keeps its torch.library.register_autograd registration (ops.register_namespace): direct
torch.ops callers, torch.compile and torch.library.opcheck go through it. In eager mode the ops.py wrappers call
`call` instead, which runs the same setup_context and backward functions inside a plain torch.autograd.Function
around the op dispatched below autograd. The reason is host time per call, which bounds small layers on a GPU:
torch.library's Python wrapper rebuilds the schema's argument list once per argument to fill in defaults
(quadratic in the arity: pytorch/pytorch#195110) and adds its own bookkeeping. Measured on the 2-core EPYC,
dora_linear at 64×64 (T = 8) with gradients: 120 µs through the registered autograd, 78 µs through `call`, of
which the kernels take 17 µs. A Function around the op is the structure PyTorch's custom-op maintainers recommend
for launch-bound ops (meta-pytorch/attention-gym#302).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from . import torch_private


class _OpFunction(torch.autograd.Function):
    """forward(ctx, *inputs, spec): spec = (op, setup_context, backward), last so that ctx.needs_input_grad[i]
    is input i's, as torch.library's setup_context functions expect."""

    @staticmethod
    def forward(ctx, *args):
        *inputs, (op, setup, backward) = args
        with torch_private.below_autograd():
            output = op(*inputs)
        ctx.op_backward = backward
        setup(ctx, tuple(inputs), output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (*ctx.op_backward(ctx, *grads), None)


def is_plain(t: Tensor) -> bool:
    """A tensor the fast path takes as it is: of type Tensor or Parameter and not a functionalization wrapper
    (plain-typed, it may wrap a fake tensor). Anything else (tensor subclasses, FakeTensor, FunctionalTensor,
    DTensor) goes through the registered op, whose dispatch knows them."""
    return type(t) in (Tensor, nn.Parameter) and not torch_private.is_functional_tensor(t)


def call(op, setup: Callable, backward: Callable, *inputs):
    """op(*inputs) with gradients: through `_OpFunction` in eager mode when some input requires grad, else the
    registered op itself (no gradients needed; torch.compile tracing; tensor subclasses, fake tensors and tensors
    under functionalization, whose wrapper is a plain-typed Tensor)."""
    # (is_compiling first: dynamo cannot trace _any_requires_grad)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and torch_private.any_requires_grad(*inputs):
        for t in inputs:  # (a loop, not all(genexpr): this runs once per layer call)
            if isinstance(t, Tensor) and not is_plain(t):
                return op(*inputs)
        return _OpFunction.apply(*inputs, (op, setup, backward))
    return op(*inputs)


def constant(op, *inputs):
    """op(*inputs) for an op that is never differentiated (the norms), dispatched straight below autograd: no
    autograd node, and no pass through torch.library's Python autograd kernel, which even under no_grad redispatches
    in Python (one 64×64 weight_norm call on the 2-core EPYC: 28–36 µs through it, 16–20 µs under no_grad, 10 µs
    here). Under torch.compile tracing: the registered op under no_grad."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            return op(*inputs)
    with torch_private.below_autograd():
        return op(*inputs)
