"""The two autograd routes of the fused ops give the same results bit for bit: the eager one (ops.py wrappers →
eager_autograd.call, a torch.autograd.Function around the op) and the registered one (torch.ops.dora_ext.* →
torch.library.register_autograd), which direct callers, torch.compile and opcheck use. Both run the same
setup_context and backward functions, so any difference is a wiring bug (an input's needs_input_grad read at the
wrong index, a gradient returned for the wrong input)."""

from __future__ import annotations

import pytest
import torch

from dora_ext import ops
from helpers import make_dora_inputs

_ops = torch.ops.dora_ext


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    return out, [t.grad for t in leaves], type(out.grad_fn).__name__


def _assert_same(a, b):
    (out_a, grads_a, _), (out_b, grads_b, _) = a, b
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None and gb is None) or torch.equal(ga, gb)


@pytest.mark.parametrize("case", ["plain", "bias", "dropout", "no magnitude grad", "frozen x"])
def test_dora_linear_eager_route_matches_the_registered_one(case, device):
    x, W, b, A, B, m = make_dora_inputs(24, 40, 4, device=device, lead=(3, 7), bias=case == "bias",
                                        requires_grad=True)
    if case == "no magnitude grad":
        m.requires_grad_(False)
    if case == "frozen x":
        x.requires_grad_(False)
    norm = ops.weight_norm(W, A, B, 0.7)
    dropped = (lambda x: x * 0.5) if case == "dropout" else (lambda x: None)  # x's gradient then has both terms

    def eager(x, A, B, m):
        return ops.dora_linear(x, W, b, A, B, m, 0.7, x_drop=dropped(x), weight_norm=norm)

    def registered(x, A, B, m):
        return _ops.dora_linear(x, dropped(x), W, b, A, B, m, norm, 0.7)[0]

    got, want = _grads(eager, (x, A, B, m)), _grads(registered, (x, A, B, m))
    assert got[2] == "_OpFunctionBackward" and want[2].startswith("GeneratedBackwardFor_dora_ext_dora_linear")
    _assert_same(got, want)


@pytest.mark.parametrize("case", ["recover from x and W", "base (dropout)", "bias"])
def test_dora_rescale_eager_route_matches_the_registered_one(case, device):
    x, W, b, A, B, m = make_dora_inputs(24, 40, 4, device=device, lead=(9,), bias=case == "bias", requires_grad=True)
    norm = ops.weight_norm(W, A, B, 0.7)
    base = (x.detach() * 0.5) @ W.T if case == "base (dropout)" else None
    kw = dict(x=x.detach(), weight=W) if case == "recover from x and W" else {}

    def eager(x, A, B, m):
        result = x @ W.T + (b if b is not None else 0)
        return ops.dora_rescale(result, x @ A.T, B, m, norm, 0.7, bias=b, base=base, **kw)

    def registered(x, A, B, m):
        result = x @ W.T + (b if b is not None else 0)
        return _ops.dora_rescale(result, base, b, x @ A.T, B, m, norm, 0.7, kw.get("x"), kw.get("weight"))[0]

    got, want = _grads(eager, (x, A, B, m)), _grads(registered, (x, A, B, m))
    assert got[2] == "_OpFunctionBackward" and want[2].startswith("GeneratedBackwardFor_dora_ext_dora_rescale")
    _assert_same(got, want)


def test_without_gradients_the_op_runs_directly():
    x, W, b, A, B, m = make_dora_inputs(8, 8, 2)
    assert ops.dora_linear(x, W, b, A, B, m, 0.5).grad_fn is None
    x.requires_grad_()
    with torch.no_grad():
        assert ops.dora_linear(x, W, b, A, B, m, 0.5).grad_fn is None


def test_norms_are_dispatched_below_autograd_with_the_registered_ops_values(device):
    """ops.weight_norm runs the op straight below autograd (eager_autograd.constant): the registered op's value,
    no graph node, whatever requires grad."""
    x, W, b, A, B, m = make_dora_inputs(24, 40, 4, device=device, requires_grad=True)
    got = ops.weight_norm(W, A, B, 0.7)
    assert got.grad_fn is None and not got.requires_grad
    assert torch.equal(got, _ops.weight_norm(W, A, B, 0.7))
