"""torch.library.opcheck on every op: schema, autograd registration, fake tensors, and AOT dispatch (compile)."""

import pytest
import torch

from dora_ext import ops
from helpers import make_dora_inputs

_ops = torch.ops.dora_ext


def dora_linear_samples(device):
    for dropout in (False, True):
        for bias in (True, False):
            for requires_grad in (False, True):
                x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, bias=bias, lead=(2, 4),
                                                    requires_grad=requires_grad)
                if b is not None:
                    b.requires_grad_(requires_grad)
                norm = ops.weight_norm(W, A, B, 1.5)
                x_drop = torch.randn_like(x, requires_grad=requires_grad) if dropout else None
                yield (x, x_drop, W, b, A, B, m, norm, 1.5)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_weight_norm(device, requires_grad):
    _, W, _, A, B, _ = make_dora_inputs(12, 10, 3, device=device, requires_grad=requires_grad)
    torch.library.opcheck(_ops.weight_norm, (W, A, B, 0.5))


def test_dora_linear(device):
    for args in dora_linear_samples(device):
        torch.library.opcheck(_ops.dora_linear, args)


@pytest.mark.parametrize("dropout", [False, True])
def test_dora_linear_backward(device, dropout):
    x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, lead=(2, 4))
    norm = ops.weight_norm(W, A, B, 1.5)
    x_src = torch.randn_like(x) if dropout else x
    _, acc, u = _ops.dora_linear(x, x_src if dropout else None, W, b, A, B, m, norm, 1.5)
    grad = torch.randn(2, 4, 10, device=device)
    for mask in ([True, dropout, True, True, True, True], [False, False, False, False, True, False],
                 [True, False, False, True, False, False]):
        torch.library.opcheck(_ops.dora_linear_backward, (grad, x_src, W, A, B, m, norm, acc, u, 1.5, dropout, mask))


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_ops(device, op):
    _, W, _, A, B, m = make_dora_inputs(12, 10, 3, device=device)
    norm = ops.weight_norm(W, A, B, 1.5)
    torch.library.opcheck(getattr(_ops, op), (W.clone(), A, B, m, norm, 1.5))


def dora_rescale_samples(device, requires_grad):
    x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, lead=(2, 4), requires_grad=requires_grad)
    norm = ops.weight_norm(W, A, B, 1.5)
    result = torch.nn.functional.linear(x, W, b)
    u = x @ A.T
    base = torch.nn.functional.linear(x * 0.5, W)
    yield (result, None, b, u, B, m, norm, 1.5)
    yield (result, None, None, u, B, m, norm, 1.5)
    yield (result, base, None, u, B, m, norm, 1.5)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_dora_rescale(device, requires_grad):
    for args in dora_rescale_samples(device, requires_grad):
        torch.library.opcheck(_ops.dora_rescale, args)


@pytest.mark.parametrize("has_base", [False, True])
def test_dora_rescale_backward(device, has_base):
    x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, lead=(2, 4))
    norm = ops.weight_norm(W, A, B, 1.5)
    u = x @ A.T
    base = torch.nn.functional.linear(x, W) if has_base else None
    _, acc = _ops.dora_rescale(torch.nn.functional.linear(x, W, b), base, None if has_base else b, u, B, m, norm, 1.5)
    u = u.reshape(8, 3)  # the backward takes the [T, r] rows, as acc
    grad = torch.randn(2, 4, 10, device=device)
    for mask in ([not has_base, has_base, True, True, True], [False, False, False, False, True]):
        torch.library.opcheck(_ops.dora_rescale_backward, (grad, u, B, m, norm, acc, 1.5, has_base, mask))
