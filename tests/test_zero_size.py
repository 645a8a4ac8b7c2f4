"""Every op and DoRALinear with 0 and 1 in each dimension (tokens, in, out; r = 1): a result of the right shape
(zero gradients where a sum is empty, as PEFT's eager code gives), or a clear error for r = 0; never a crash of the
process (a division by a zero feature count once killed it with SIGFPE)."""

import itertools

import pytest
import torch
from torch import nn

import dora_ext
from dora_ext import ops, reference as ref
from helpers import as64

SIZES = (0, 1, 3)


@pytest.mark.parametrize("T,in_f,out_f", list(itertools.product(SIZES, SIZES, SIZES)))
@pytest.mark.parametrize("dropout", [False, True])
def test_ops_forward_backward_merge_with_empty_dims(device, T, in_f, out_f, dropout):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    x, W, b, A, B = mk(T, in_f), mk(out_f, in_f), mk(out_f), mk(1, in_f), mk(out_f, 1)
    m = (mk(out_f).abs() + 1).requires_grad_()
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    x_drop = (x * 0.5) if dropout else None
    y = ops.dora_linear(x, W, b, A, B, m, 0.7, x_drop=x_drop)
    assert y.shape == (T, out_f) and y._base is None
    expected = ref.dora_linear(*as64(x, W, b, A, B, m), 0.7, x_drop=x_drop, eps=ops.NORM_EPS)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    y.sum().backward()
    for t in (x, A, B, m):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()
    if T == 0:  # empty sums over tokens: zero gradients
        assert not A.grad.any() and not B.grad.any() and not m.grad.any()
    norm = ops.weight_norm(W, A, B, 0.7)
    assert norm.shape == (out_f,)
    W2 = W.clone()
    ops.merge_(W2, A.detach(), B.detach(), m.detach(), norm, 0.7)
    ops.unmerge_(W2, A.detach(), B.detach(), m.detach(), norm, 0.7)
    torch.testing.assert_close(W2, W, atol=1e-12, rtol=1e-12)
    out = ops.dora_rescale(torch.nn.functional.linear(x, W, b), x @ A.T, B, m, norm, 0.7, bias=b)
    assert out.shape == (T, out_f)
    out.sum().backward()


@pytest.mark.parametrize("in_f,out_f", [(4, 0), (0, 5), (0, 0), (1, 1)])
def test_dora_linear_module_with_empty_features(in_f, out_f):
    layer = dora_ext.DoRALinear.from_linear(nn.Linear(in_f, out_f), r=2)
    x = torch.randn(3, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, out_f)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_rank_zero_is_a_clear_error():
    W, A, B = torch.randn(3, 4), torch.randn(0, 4), torch.randn(3, 0)
    with pytest.raises(RuntimeError, match=r"dora_ext::weight_norm: expected lora_A of shape \[r, 4\] with r >= 1"):
        ops.weight_norm(W, A, B, 1.0)
