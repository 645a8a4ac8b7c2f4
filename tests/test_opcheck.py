"""torch.library.opcheck on every op (the eight public ones and the two backward ops), all in this file: schema,
autograd registration, fake tensors, and AOT dispatch (compile)."""

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


@pytest.mark.parametrize("row_group", [0, 32])
@pytest.mark.parametrize("nested", [False, True])
def test_weight_norm_4bit(device, nested, row_group):
    """Synthetic packed codes (no bitsandbytes needed): the op's contract is the layout, not the quantizer."""
    if row_group and device != "cpu":
        pytest.skip("bitsandbytes' CPU layout exists on the CPU only")
    gen = torch.Generator().manual_seed(3)
    out_f, in_f = 32, 128
    packed = torch.randint(0, 256, (out_f * in_f // 2,), generator=gen, dtype=torch.uint8).to(device)
    code = torch.linspace(-1, 1, 16, device=device)
    A, B = torch.randn(2, in_f, device=device), torch.randn(out_f, 2, device=device)
    blocks = out_f * in_f // 64
    if nested:
        absmax = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8).to(device)
        extra = (torch.linspace(0, 1, 256, device=device), torch.rand(2, device=device) + 0.5,
                 torch.tensor([0.25], device=device), blocks // 2)
    else:
        absmax = torch.rand(blocks, generator=gen).to(device) + 0.5
        extra = (None, None, None, 0)
    torch.library.opcheck(_ops.weight_norm_4bit, (packed, absmax, code, 64, *extra, out_f, in_f, torch.bfloat16, A, B,
                                                  0.5, row_group))


def test_weight_norm_int8(device):
    gen = torch.Generator().manual_seed(3)
    CB = torch.randint(-127, 128, (8, 128), generator=gen, dtype=torch.int8).to(device)
    A, B = torch.randn(2, 128, device=device), torch.randn(8, 2, device=device)
    torch.library.opcheck(_ops.weight_norm_int8, (CB, torch.rand(8, device=device) + 0.1, A, B, 0.5))


def test_dora_mixed(device):
    x, W, b, A, B, m = make_dora_inputs(12, 10, 3, device=device, lead=(4, 2))
    norm = ops.weight_norm(W, A, B, 1.5)
    result = torch.nn.functional.linear(x, W, b)
    A2, B2 = torch.randn(2, 12, device=device), torch.randn(10, 2, device=device)
    mags, norms = torch.stack([m, torch.ones_like(m)]), torch.stack([norm, torch.ones_like(norm)])
    index = torch.tensor([0, 1, 2, 0], device=device).repeat_interleave(2)
    torch.library.opcheck(_ops.dora_mixed, (result, b, x, [A, A2], [B, B2], [1.5, 0.5], mags, norms, index))
